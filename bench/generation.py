"""Benchmark: lorabound's generation against transformers' text-generation pipeline, side by side in one process.

    python bench/generation.py [--adapter DIR] [--examples 32] [--max-new-tokens 48] [--batch-size 16] [--threads N]

Baseline: transformers' pipeline("text-generation"), one prompt at a time, greedy, on the adapter merged into
the weights; its output is cut to the first non-blank line (the answer line lorabound keeps).
Then lorabound on the same merged weights (one variant), and lorabound generating three variants of the
unmerged adapter (base model, LoRA on the lower half of the layers, full adapter) in one batch, counted as
three examples per prompt. Outputs are compared with the baseline's.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from common import random_adapter
from lorabound.data import load_task, split_task
from lorabound.generation.decode import generate, generate_variants
from lorabound.lora.selection import Selection
from lorabound.lora.variants import Variant
from lorabound.model import find_layer_stack, load_adapter, load_model


def pipeline_outputs(merged, tokenizer, prompts, max_new_tokens):
    from transformers import pipeline

    generator = pipeline("text-generation", model=merged, tokenizer=tokenizer, device="cpu")
    texts = []
    for prompt in prompts:
        out = generator(prompt, max_new_tokens=max_new_tokens, do_sample=False, return_full_text=False,
                        pad_token_id=tokenizer.pad_token_id)
        texts.append(out[0]["generated_text"].lstrip().split("\n", 1)[0].strip())
    return texts


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", help="a LoRA adapter; default: random LoRA (r=16, all-linear) on every layer")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    peft_model = load_adapter(model, args.adapter) if args.adapter else random_adapter(model)
    peft_model.eval()
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    task = load_task("e2e")
    prompts = [task.prompt(e) for e in split_task(task, train=0, validation=0, test=args.examples, seed=0).test]
    n, tokens = len(prompts), args.max_new_tokens
    print(f"{args.model}, {n} E2E test prompts, {tokens} new tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")

    baseline, pipe_s = timed(lambda: pipeline_outputs(merged, tokenizer, prompts, tokens))
    single, single_s = timed(lambda: generate(merged, tokenizer, prompts, max_new_tokens=tokens,
                                              batch_size=args.batch_size, progress=False).texts)
    top = find_layer_stack(peft_model).num_layers
    variants = [Variant("base", None), Variant("half", Selection.layers(range(top // 2))), Variant("full")]
    several, several_s = timed(lambda: generate_variants(peft_model, tokenizer, prompts, variants,
                                                         max_new_tokens=tokens, batch_size=args.batch_size,
                                                         progress=False))
    same_single = sum(a == b for a, b in zip(single, baseline))
    same_full = sum(a == b for a, b in zip(several["full"].texts, baseline))
    rate = {"pipeline": n / pipe_s, "single": n / single_s, "variants": len(variants) * n / several_s}
    print(f"transformers pipeline, one prompt at a time: {pipe_s:7.1f} s  {rate['pipeline']:6.2f} ex/s")
    print(f"lorabound generate, merged weights:         {single_s:7.1f} s  {rate['single']:6.2f} ex/s  "
          f"{rate['single'] / rate['pipeline']:.2f}x; outputs equal to the pipeline's: {same_single}/{n}")
    print(f"lorabound, 3 variants in one batch:         {several_s:7.1f} s  {rate['variants']:6.2f} ex/s  "
          f"{rate['variants'] / rate['pipeline']:.2f}x; full-adapter outputs equal to the pipeline's "
          f"(unmerged vs merged weights): {same_full}/{n}")


if __name__ == "__main__":
    main()
