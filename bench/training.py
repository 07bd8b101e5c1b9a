"""Benchmark: lorabound's training loop against a plain PEFT + transformers loop, side by side in one process.

    python bench/training.py [--train-size 16] [--batch-size 8] [--threads N]

Both train LoRA (r=16, all-linear, the defaults) on the same E2E pairs, in the same shuffled batches, from
the same base weights. lorabound's loop adds gradient clipping, the learning-rate schedule, per-step dropout
seeds and a resumable checkpoint every 10 steps; the validation loss is left out (no validation split) so
that only training steps are timed. lorabound runs the output head only where a target token is predicted
(training.target_loss); the plain loop gives transformers the labels, so its head covers every position. Then
one more plain pass is profiled (the ratio uses the faster of the two plain passes): forward, backward,
optimizer, and the share of padding in the batches; and torch.profiler splits lorabound's own steps by operator.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model

from lorabound.data import Splits, batches, encode_pairs, load_task, split_task, training_pairs
from lorabound.model import load_model
from lorabound.options import TrainSettings
from lorabound.training import lora_config, target_loss, train


def plain_loop(model, encoded, settings: TrainSettings, pad: int, profile: dict | None = None) -> int:
    """The loop a PEFT tutorial writes: forward, backward, AdamW step; returns the steps run."""
    peft_model = get_peft_model(model, lora_config(settings))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=settings.learning_rate)
    peft_model.train()
    steps = 0
    for batch in batches(encoded, settings.batch_size, pad, shuffle_seed=settings.seed):
        t0 = time.perf_counter()
        loss = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        steps += 1
        if profile is not None:
            for key, seconds in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2)):
                profile[key] = profile.get(key, 0.0) + seconds
            profile["tokens"] = profile.get("tokens", 0) + int(batch.attention_mask.sum())
            profile["padded"] = profile.get("padded", 0) + batch.attention_mask.numel()
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--train-size", type=int, default=16, help="E2E inputs (each has several references)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base, tokenizer = load_model(args.model)
    task = load_task("e2e")
    examples = split_task(task, train=args.train_size, validation=0, test=0, seed=0).train
    settings = TrainSettings(batch_size=args.batch_size, checkpoint_every=10)
    encoded = encode_pairs(tokenizer, task, training_pairs(examples), settings.max_length)
    pad = tokenizer.pad_token_id
    print(f"{args.model}, {len(encoded.input_ids)} E2E pairs, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads", flush=True)

    start = time.perf_counter()
    plain_steps = plain_loop(copy.deepcopy(base), encoded, settings, pad)
    plain_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        result = train(copy.deepcopy(base), tokenizer, task, Splits(train=examples, validation=[], test=[], seed=0),
                       Path(scratch) / "adapter", settings, progress=False)
        ours_s = time.perf_counter() - start

    profile: dict = {}
    start = time.perf_counter()
    plain_loop(copy.deepcopy(base), encoded, settings, pad, profile)
    profiled_s = time.perf_counter() - start

    # The first pass also pays one-time costs (allocator, kernel selection): compare with the faster plain pass.
    plain_s = min(plain_s, profiled_s)
    plain_rate, ours_rate = plain_steps / plain_s, result.steps / ours_s
    print(f"plain PEFT loop (faster of 2 passes): {plain_steps} steps in {plain_s:6.1f} s  {plain_rate:.3f} steps/s")
    print(f"lorabound train():   {result.steps} steps in {ours_s:6.1f} s  {ours_rate:.3f} steps/s  "
          f"(ratio {ours_rate / plain_rate:.2f}x, including saving the adapter and checkpoints)")
    share = {k: profile[k] / profiled_s for k in ("forward", "backward", "optimizer")}
    print(f"where a plain step's time goes ({profiled_s:.1f} s): forward {share['forward']:.0%}, "
          f"backward {share['backward']:.0%}, optimizer {share['optimizer']:.0%}, "
          f"other {1 - sum(share.values()):.0%}; padding is {1 - profile['tokens'] / profile['padded']:.0%} "
          f"of the batch positions")

    shares = operator_shares(copy.deepcopy(base), encoded, settings, pad)
    print("where lorabound's step time goes (torch.profiler, 2 steps): " +
          ", ".join(f"{name} {share:.0%}" for name, share in shares.items()))


# Operator groups for the profile; everything else is "other".
GROUPS = {"matrix products": ("aten::mm", "aten::addmm", "aten::bmm"),
          "LoRA dropout masks": ("aten::bernoulli_",),
          "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                        "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
          "log-softmax": ("aten::_log_softmax", "aten::_log_softmax_backward_data")}


def operator_shares(model, encoded, settings: TrainSettings, pad: int) -> dict[str, float]:
    """Share of self CPU time by operator group over two of lorabound's training steps (after one warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    peft_model = get_peft_model(model, lora_config(settings)).train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=settings.learning_rate)
    steps = list(batches(encoded, settings.batch_size, pad, shuffle_seed=settings.seed))[:3]

    def step(batch):
        target_loss(peft_model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(steps[0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in steps[1:]:
            step(batch)
    self_time = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_time.values())
    shares = {name: sum(self_time.get(op, 0) for op in ops) / total for name, ops in GROUPS.items()}
    shares["other"] = 1 - sum(shares.values())
    return shares


if __name__ == "__main__":
    main()
