"""What the benchmarks share: a random adapter that looks trained, so every benchmark times the same thing."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model


def random_adapter(model, seed: int = 0):
    """A PeftModel with r=16 LoRA on every linear layer and lora_B drawn from N(0, 0.02) (PEFT's init leaves it
    zero, which would make every variant the base model)."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return peft_model.eval()


def analysis_arguments(parser, examples: int, batch_size: int) -> None:
    """The flags of the analysis benchmarks (sweep.py, joint.py)."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", help="a LoRA adapter; default: random LoRA (r=16, all-linear) on every layer")
    parser.add_argument("--data", default="e2e")
    parser.add_argument("--examples", type=int, default=examples)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")


def analysis_setup(args):
    """(peft model, tokenizer, encoded validation examples) for the analysis benchmarks' flags."""
    from lorabound.data import encode_pairs, first_reference_pairs, load_task, split_task
    from lorabound.model import load_adapter, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    model = load_adapter(model, args.adapter) if args.adapter else random_adapter(model)
    model.eval()
    task = load_task(args.data)
    examples = split_task(task, train=0, validation=args.examples, test=0, seed=0).validation
    return model, tokenizer, encode_pairs(tokenizer, task, first_reference_pairs(examples), 256)
