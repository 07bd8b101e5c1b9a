"""Benchmark: the generation batch size (`--generation-batch-size`), side by side in one process.

    python bench/generation_batch.py [--adapter DIR] [--examples 64] [--batch-sizes 16 32 64] [--threads N]

Three variants (base model, LoRA on layers 0..24, full adapter) of one adapter generated together, as
`evaluate` does, once per batch size on the same E2E test prompts (48 new tokens); prints each time, the ratio
to the first batch size, and how many outputs equal the first batch size's. Pass the demo's adapter
(lorabound-demo/adapter) to time what the demo generates; the default is a random r=16 LoRA.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import random_adapter
from lorabound.data import load_task, split_task
from lorabound.generation.decode import generate_variants
from lorabound.lora.selection import Selection
from lorabound.lora.variants import Variant
from lorabound.model import load_adapter, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", help="a LoRA adapter; default: random LoRA (r=16, all-linear) on every layer")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    model = load_adapter(model, args.adapter) if args.adapter else random_adapter(model)
    task = load_task("e2e")
    prompts = [task.prompt(e) for e in split_task(task, train=0, validation=0, test=args.examples, seed=0).test]
    variants = [Variant("base", None), Variant("LoRA on 0..24", Selection.layers(range(25))), Variant("full")]
    generate_variants(model, tokenizer, prompts[:4], variants, max_new_tokens=4, progress=False)  # warm-up
    print(f"{len(prompts)} E2E test prompts x {len(variants)} variants, 48 new tokens, "
          f"{torch.get_num_threads()} threads", flush=True)

    first, first_seconds = None, None
    for size in args.batch_sizes:
        start = time.perf_counter()
        outputs = generate_variants(model, tokenizer, prompts, variants, max_new_tokens=48, batch_size=size,
                                    progress=False)
        seconds = time.perf_counter() - start
        texts = [t for v in variants for t in outputs[v.name].texts]
        first, first_seconds = first or texts, first_seconds or seconds
        equal = sum(a == b for a, b in zip(texts, first))
        print(f"batch {size:3d}: {seconds:6.1f} s  ({first_seconds / seconds:.2f}x batch {args.batch_sizes[0]}); "
              f"outputs equal to batch {args.batch_sizes[0]}'s: {equal} of {len(texts)}", flush=True)


if __name__ == "__main__":
    main()
