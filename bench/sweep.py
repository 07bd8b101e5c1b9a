"""Benchmark: the shared-work truncation sweep against the plain loop, side by side in one process.

    python bench/sweep.py [--adapter DIR] [--examples 16] [--batch-size 8] [--threads N] [--exact-all] [--no-plain]

The plain loop toggles adapters and runs the whole model for every boundary, with logits at every
position. The sweep runs the full adapter once, then only each boundary's base-only upper layers,
and applies the output head at target positions only. Both must give the same curve (within 1e-6: the
sweep computes the log-softmax normaliser in float32, the plain loop in float64). Then the default
analysis of `run` (the sweep, plus the logit lens and the ablation on a quarter of the batches) against
the sweep alone.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import analysis_arguments, analysis_setup
from lorabound.analysis.curves import analyze, truncation_curve_plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    analysis_arguments(parser, examples=16, batch_size=8)
    parser.add_argument("--exact-all", action="store_true", help="also time the three curves with --exact-curves")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop (time the analysis against "
                        "the sweep only)")
    args = parser.parse_args()
    model, tokenizer, encoded = analysis_setup(args)
    pad = tokenizer.pad_token_id
    print(f"{args.model}, {len(encoded.input_ids)} {args.data} examples, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")

    kwargs = dict(batch_size=args.batch_size, pad_token_id=pad, progress=False)
    if not args.no_plain:
        start = time.perf_counter()
        plain = truncation_curve_plain(model, encoded, batch_size=args.batch_size, pad_token_id=pad)
        plain_s = time.perf_counter() - start

    start = time.perf_counter()
    fast = analyze(model, encoded, curves=("truncation",), **kwargs)["truncation"]
    fast_s = time.perf_counter() - start

    start = time.perf_counter()
    analyze(model, encoded, **kwargs)
    default_s = time.perf_counter() - start

    print(f"shared sweep (float32 normaliser):                  {fast_s:8.1f} s")
    print(f"default analysis (sweep + logit lens and ablation on a quarter of the batches): {default_s:8.1f} s")
    same = True
    if not args.no_plain:
        worst = max(abs(a - b) for key in ("mean_prob", "nll") for a, b in zip(fast[key], plain[key]))
        same = fast["boundary"] == plain["boundary"] and worst < 1e-6
        print(f"plain loop ({len(plain['boundary'])} boundaries, float64 log-softmax): {plain_s:8.1f} s")
        print(f"speedup of the sweep: {plain_s / fast_s:.2f}x; curves equal within 1e-6: {same} "
              f"(largest difference {worst:.2e})")
    print(f"default analysis / sweep alone: {default_s / fast_s:.2f}x")
    if args.exact_all:
        start = time.perf_counter()
        analyze(model, encoded, exact=True, **kwargs)
        exact_s = time.perf_counter() - start
        print(f"all three curves exact (--exact-curves): {exact_s:8.1f} s, {exact_s / fast_s:.2f}x the sweep")
    if not same:
        raise SystemExit("the sweep and the plain loop disagree")

if __name__ == "__main__":
    main()
