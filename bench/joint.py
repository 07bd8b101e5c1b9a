"""Benchmark: the joint (Ba, Bm) curve and the greedy-drop path against the truncation sweep, side by side.

    python bench/joint.py [--adapter DIR] [--examples 4] [--batch-size 4] [--threads N] [--no-greedy]

All three share work the same way (one full-adapter pass, then only the layers that differ). The truncation
sweep runs sum over layers i of (i + 2) layer passes per batch, the joint curve sum of (i + 2)^2 (every pair),
the greedy path L + sum over l in S of (L - l) per removal step (the path counts its own). The script prints each one's wall time, its
ratio to the sweep, the predicted ratio in layer passes, and checks that the joint curve's diagonal is the
truncation curve (a random r=16 LoRA on every linear layer has no module outside attention and MLP).
"""

from __future__ import annotations

import argparse
import time

import torch

from common import analysis_arguments, analysis_setup
from lorabound.analysis.curves import analyze
from lorabound.analysis.greedy import greedy_path
from lorabound.lora.masking import lora_params_per_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    analysis_arguments(parser, examples=4, batch_size=4)
    parser.add_argument("--no-greedy", action="store_true", help="skip the greedy path")
    args = parser.parse_args()
    model, tokenizer, encoded = analysis_setup(args)
    kwargs = dict(batch_size=args.batch_size, pad_token_id=tokenizer.pad_token_id, progress=False)
    layers = len(lora_params_per_layer(model))
    print(f"{args.model}, {len(encoded.input_ids)} {args.data} examples, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {layers} LoRA layers")

    start = time.perf_counter()
    sweep = analyze(model, encoded, curves=("truncation",), **kwargs)["truncation"]
    sweep_s = time.perf_counter() - start
    start = time.perf_counter()
    joint = analyze(model, encoded, curves=("joint",), **kwargs)["joint"]
    joint_s = time.perf_counter() - start

    one = sum(i + 2 for i in range(layers))  # layer i runs once per distinct selection of layers 0..i
    two = sum((i + 2) ** 2 for i in range(layers))
    diagonal = [joint["mean_prob"][i][i] for i in range(len(sweep["mean_prob"]))]
    worst = max(abs(a - b) for a, b in zip(diagonal, sweep["mean_prob"]))
    print(f"truncation sweep ({len(sweep['boundary'])} boundaries):   {sweep_s:8.1f} s")
    print(f"joint curve ({len(diagonal)} x {len(diagonal)} pairs):       {joint_s:8.1f} s, "
          f"{joint_s / sweep_s:.1f}x the sweep (layer passes: {two / one:.1f}x predicted)")
    print(f"joint diagonal == truncation curve: {worst < 1e-9} (largest difference {worst:.1e})")
    if not args.no_greedy:
        start = time.perf_counter()
        path = greedy_path(model, encoded, params_per_layer=lora_params_per_layer(model), **kwargs)
        greedy_s = time.perf_counter() - start
        passes = path["layer_passes_per_batch"]
        print(f"greedy path ({len(path['steps']) - 1} removals):           {greedy_s:8.1f} s, "
              f"{greedy_s / sweep_s:.1f}x the sweep (layer passes: {passes / one:.1f}x measured)")
    if worst >= 1e-9:
        raise SystemExit("the joint curve's diagonal differs from the truncation curve")


if __name__ == "__main__":
    main()
