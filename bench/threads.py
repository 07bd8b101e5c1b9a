"""Benchmark: decoding speed with 1 and 2 torch threads while another process keeps one core busy.

    python bench/threads.py [--examples 8] [--max-new-tokens 32] [--busy 1]

Starts `--busy` processes that spin on a core each, then generates with the base model, first with one
torch thread, then with two (torch's default on a 2-core machine), in the same process. With every core
taken, torch's threads wait on each other at every operation; `--threads` (default: the cores free at start)
avoids that.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from lorabound.data import load_task, split_task
from lorabound.generation.decode import generate
from lorabound.model import load_model
from lorabound.runtime.threads import default_threads

SPIN = "while True: pass"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--busy", type=int, default=1, help="busy processes beside the benchmark")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    task = load_task("e2e")
    prompts = [task.prompt(e) for e in split_task(task, train=0, validation=0, test=args.examples, seed=0).test]
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.busy)]
    try:
        time.sleep(2)
        rates, outputs = {}, {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            start = time.perf_counter()
            outputs[threads] = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                        batch_size=args.examples, progress=False).texts
            rates[threads] = len(prompts) / (time.perf_counter() - start)
    finally:
        for spinner in spinners:
            spinner.kill()
    print(f"{args.model}, {len(prompts)} E2E prompts, {args.max_new_tokens} new tokens, {args.busy} busy process(es); "
          f"--threads default now: {default_threads()}")
    for threads, rate in rates.items():
        print(f"{threads} thread(s): {rate:6.2f} ex/s")
    print(f"1 thread / 2 threads: {rates[1] / rates[2]:.2f}x; same outputs: {outputs[1] == outputs[2]}")


if __name__ == "__main__":
    main()
