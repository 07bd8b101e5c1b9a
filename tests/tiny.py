"""Tiny randomly initialised models, tokenizers and adapters for unit tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorabound.data import Example, Task, encode_pairs, first_reference_pairs

CORPUS = [
    "name: The Eagle, eatType: coffee shop, food: French, area: riverside",
    "The Eagle is a French coffee shop by the riverside.",
    "name: Blue Spice, eatType: pub, area: city centre, priceRange: cheap",
    "Blue Spice is a cheap pub in the city centre.",
    "Describe the restaurant.\nData: Text:",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def tiny_llama(num_layers: int = 4, vocab_size: int = 320, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=None, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def randomize_lora(model, seed: int = 1, scale: float = 0.5) -> None:
    """LoRA B starts at zero (no effect); give it weight so dropping a layer changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def tiny_lora(model=None, *, num_layers: int = 4, seed: int = 1, **config):
    model = model if model is not None else tiny_llama(num_layers)
    config = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", **config}
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **config))
    randomize_lora(peft_model, seed)
    return peft_model.eval()


def tiny_task() -> Task:
    examples = [Example(input=f"name: Place {i}, area: riverside, food: French", references=(
        f"Place {i} serves French food by the riverside.", f"By the riverside, Place {i} is French.")) for i in range(7)]
    return Task(name="tiny", examples=examples, template="Describe the restaurant.\nData: {input}\nText:", source="tests")


def tiny_encoded(tokenizer, max_length: int = 64):
    task = tiny_task()
    return encode_pairs(tokenizer, task, first_reference_pairs(task.examples), max_length)


def real_sparse_lora(real_model, validation: int):
    """The real model (a copy) with random LoRA r=4 on q, v and down of layers 0, 5, 17, 29 only, and `validation`
    E2E validation examples encoded for it: a real-model case where some layers have no LoRA at all."""
    import copy

    from lorabound.data import encode_pairs, first_reference_pairs, load_task, split_task

    base, tokenizer = real_model
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, layers_to_transform=[0, 5, 17, 29],
                                                           target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora(model, scale=0.02)
    model.eval()
    task = load_task("e2e")
    examples = split_task(task, train=0, validation=validation, test=0, seed=0).validation
    return model, tokenizer, encode_pairs(tokenizer, task, first_reference_pairs(examples), 128)



def save_tiny_base(root: Path) -> Path:
    """A tiny Llama and its tokenizer saved as a model folder ROOT/base, as a user's model folder would be."""
    tiny_llama().save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    return root / "base"
