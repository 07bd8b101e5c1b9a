"""Benchmark: the shared-work truncation sweep against the plain loop, side by side in one process.

    python bench/sweep.py [--adapter DIR] [--examples 16] [--batch-size 8]

The plain loop toggles adapters and runs the whole model for every boundary, with logits at every
position. The sweep runs the full adapter once, then only each boundary's base-only upper layers,
and applies the output head at target positions only. Both must give the same curve.
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import LoraConfig, get_peft_model

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
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    else:
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)  # a trained-looking adapter: B is not zero
    model.eval()
    task = load_task(args.data)
    examples = split_task(task, train=0, validation=args.examples, test=0, seed=0).validation
    encoded = encode_pairs(tokenizer, task, first_reference_pairs(examples), 256)
    pad = tokenizer.pad_token_id
    print(f"{args.model}, {len(encoded.input_ids)} {args.data} examples, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")

    start = time.perf_counter()
    plain = truncation_curve_plain(model, encoded, batch_size=args.batch_size, pad_token_id=pad)
    plain_s = time.perf_counter() - start

    start = time.perf_counter()
    fast = analyze(model, encoded, batch_size=args.batch_size, pad_token_id=pad, curves=("truncation",),
                   progress=False)["truncation"]
    fast_s = time.perf_counter() - start

    start = time.perf_counter()
    analyze(model, encoded, batch_size=args.batch_size, pad_token_id=pad, progress=False)
    all_s = time.perf_counter() - start

    worst = max(abs(a - b) for key in ("mean_prob", "nll") for a, b in zip(fast[key], plain[key]))
    same = fast["boundary"] == plain["boundary"] and worst < 1e-4
    print(f"plain loop ({len(plain['boundary'])} boundaries): {plain_s:8.1f} s")
    print(f"shared sweep:                     {fast_s:8.1f} s")
    print(f"all three curves (sweep + lens + ablation): {all_s:8.1f} s")
    print(f"speedup of the sweep: {plain_s / fast_s:.2f}x; curves identical: {same} (largest difference {worst:.2e})")
    if not same:
        raise SystemExit("the sweep and the plain loop disagree")


if __name__ == "__main__":
    main()
