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
