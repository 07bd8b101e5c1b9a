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

from common import random_adapter
from lorabound.analysis import analyze, truncation_curve_plain
from lorabound.data import encode_pairs, first_reference_pairs, load_task, split_task
from lorabound.model import load_adapter, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", help="a LoRA adapter; default: random LoRA (r=16, all-linear) on every layer")
    parser.add_argument("--data", default="e2e")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--exact-all", action="store_true", help="also time the three curves with --exact-curves")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop (time the analysis against "
                        "the sweep only)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    else:
        model = random_adapter(model)
    model.eval()
    task = load_task(args.data)
    examples = split_task(task, train=0, validation=args.examples, test=0, seed=0).validation
    encoded = encode_pairs(tokenizer, task, first_reference_pairs(examples), 256)
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
