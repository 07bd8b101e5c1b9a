"""Benchmark: the transformers engine against the vLLM engine on the same prompts and variants, in one process.

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 \\
        .venv-vllm/bin/python bench/engines.py [--examples 64] [--max-new-tokens 32] [--device cpu]

Four variants (base model, full adapter, LoRA kept up to two boundaries) of a random LoRA (r=16, all linear
layers) on the embedded SmolLM2-135M generate greedily for the same E2E prompts with both engines. Prints
examples/s of each (examples x variants over wall time; vLLM's start-up is timed apart) and their ratio, and
how many outputs are text-identical. Needs vllm (run it in the vLLM environment, see README: Scaling up).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    import torch

    from common import random_adapter
    from lorabound.data import load_task, split_task
    from lorabound.generation.engines import HFEngine, Variant, VLLMEngine
    from lorabound.options import VLLMOptions
    from lorabound.generation.decode import eos_token_ids
    from lorabound.model import find_layer_stack, load_model, resolve_model_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="the transformers engine's batch size")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, device=args.device)
    model = random_adapter(model)
    layers = find_layer_stack(model).num_layers
    task = load_task("e2e")
    prompts = [task.prompt(e) for e in split_task(task, train=0, validation=0, test=args.examples, seed=0).test]
    variants = [Variant.at_boundary("base model", -1), Variant.at_boundary("full adapter", None),
                Variant.at_boundary(f"pruned (b={layers // 3})", layers // 3),
                Variant.at_boundary(f"pruned (b={2 * layers // 3})", 2 * layers // 3)]
    n = len(prompts) * len(variants)
    print(f"{args.model}, {len(prompts)} E2E prompts x {len(variants)} variants, max {args.max_new_tokens} new "
          f"tokens, {args.device}, {torch.get_num_threads()} threads")

    hf = HFEngine(model, tokenizer, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                  stop_at_newline=True)
    start = time.perf_counter()
    hf_out = hf.generate(variants, prompts, progress=False)
    hf_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(Path(scratch) / "adapter")
        engine = VLLMEngine(resolve_model_dir(args.model), Path(scratch) / "adapter", tokenizer, num_layers=layers,
                            max_new_tokens=args.max_new_tokens, stop_at_newline=True,
                            eos_ids=eos_token_ids(model, tokenizer), options=VLLMOptions(max_model_len=1024),
                            scratch=Path(scratch) / "exports")
        start = time.perf_counter()
        engine.generate(variants[:1], prompts[:1], progress=False)  # start-up and warm-up, timed apart
        startup_s = time.perf_counter() - start
        start = time.perf_counter()
        vllm_out = engine.generate(variants, prompts, progress=False)
        vllm_s = time.perf_counter() - start
        engine.close()

    same = sum(a == b for v in variants for a, b in zip(hf_out[v.name], vllm_out[v.name]))
    print(f"transformers engine: {n / hf_s:8.2f} examples/s ({hf_s:.1f} s)")
    print(f"vLLM engine:         {n / vllm_s:8.2f} examples/s ({vllm_s:.1f} s; start-up {startup_s:.1f} s apart)")
    print(f"ratio vLLM / transformers: {hf_s / vllm_s:.2f}x; identical outputs: {same} of {n}")


if __name__ == "__main__":
    main()
