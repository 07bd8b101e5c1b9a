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
from peft import LoraConfig, get_peft_model

from lorabound.analysis import analyze
from lorabound.data import encode_pairs, first_reference_pairs, load_task, split_task
from lorabound.greedy import greedy_path
from lorabound.model import load_adapter, load_model
from lorabound.surgery import lora_params_per_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", help="a LoRA adapter; default: random LoRA (r=16, all-linear) on every layer")
    parser.add_argument("--data", default="e2e")
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--no-greedy", action="store_true", help="skip the greedy path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    else:
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    model.eval()
    task = load_task(args.data)
    examples = split_task(task, train=0, validation=args.examples, test=0, seed=0).validation
    encoded = encode_pairs(tokenizer, task, first_reference_pairs(examples), 256)
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
