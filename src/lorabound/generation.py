"""Greedy generation in left-padded batches (the transformers engine).

:func:`generate` decodes greedily, stopping each row at the end of its answer line (leading blank lines
skipped), at EOS, or at max_new_tokens, and returns the cleaned outputs in the prompts' order.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from .errors import LoraboundError


@dataclass
class GenerationResult:
    texts: list[str]          # one output per prompt, in the prompts' order
    n_prompt_truncated: int   # prompts cut from the left to max_prompt_length tokens


def _newline_criteria(tokenizer, prompt_length: int):
    """A StoppingCriteria that marks a row done once its answer line (the first non-blank one) has ended."""
    import torch
    from transformers import StoppingCriteria

    class StopAtNewline(StoppingCriteria):
        def __init__(self):
            self.done = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.done is None:
                self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            rows = (~self.done).nonzero().flatten().tolist()
            if rows:
                texts = tokenizer.batch_decode(input_ids[rows, prompt_length:], skip_special_tokens=True)
                for row, text in zip(rows, texts):
                    if "\n" in text.lstrip():  # leading blank lines are not the answer line yet
                        self.done[row] = True
            return self.done.clone()

    return StopAtNewline()


def _eos_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a sequence: the model's generation config and the tokenizer's EOS."""
    ids = []
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None) if config is not None else None
    for value in ([configured] if isinstance(configured, int) else list(configured or [])) + [tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


@contextlib.contextmanager
def _tokenizer_sides(tokenizer):
    """Left padding and left truncation while generating; the tokenizer's own settings come back afterwards."""
    padding, truncation = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = padding, truncation


def _clean(text: str, stop_at_newline: bool) -> str:
    if stop_at_newline:
        text = text.lstrip().split("\n", 1)[0]
    return text.strip()


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, batch_size: int = 16,
             stop_at_newline: bool = True, max_prompt_length: int | None = None,
             progress: bool | str = True) -> GenerationResult:
    """Greedy outputs for `prompts` (new text only, only the first non-blank line when `stop_at_newline`, stripped).

    Prompts are sorted by length into left-padded batches and the outputs put back in the prompts' order.
    Prompts longer than `max_prompt_length` tokens lose their beginning; they are counted in the result.
    `model` may be a plain causal LM or a peft PeftModel. `progress`: show a bar (a str labels it).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    prompts = list(prompts)
    if not prompts:
        return GenerationResult(texts=[], n_prompt_truncated=0)
    if batch_size < 1 or max_new_tokens < 1:
        raise LoraboundError(f"batch_size {batch_size} and max_new_tokens {max_new_tokens} must be at least 1; "
                             "pass positive numbers")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise LoraboundError(f"max_prompt_length {max_prompt_length} must be at least 1; pass a positive number "
                             "or None")
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    if pad_id is None:
        raise LoraboundError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token before "
                             "generating")

    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    n_truncated = sum(n > max_prompt_length for n in lengths) if max_prompt_length else 0
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    texts: list[str | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    was_training = model.training
    label = progress if isinstance(progress, str) else "generating"
    bar = tqdm(total=len(prompts), unit="ex", desc=label, disable=not progress)
    try:
        model.eval()
        with _tokenizer_sides(tokenizer), torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                enc = _encode_batch(tokenizer, [prompts[i] for i in chunk], max_prompt_length, pad_id)
                input_ids = enc["input_ids"].to(device)
                attention_mask = enc["attention_mask"].to(device)
                criteria = StoppingCriteriaList()
                if stop_at_newline:
                    criteria.append(_newline_criteria(tokenizer, input_ids.shape[1]))
                output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                        max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                        eos_token_id=eos_ids or None, stopping_criteria=criteria)
                new_tokens = output[:, input_ids.shape[1]:].tolist()
                for i, ids in zip(chunk, new_tokens):
                    ids = _until_eos(ids, eos_ids)
                    texts[i] = _clean(tokenizer.decode(ids, skip_special_tokens=True), stop_at_newline)
                bar.update(len(chunk))
    finally:
        bar.close()
        if was_training:
            model.train()
    return GenerationResult(texts=texts, n_prompt_truncated=n_truncated)


def _encode_batch(tokenizer, prompts: list[str], max_prompt_length: int | None, pad_id: int):
    """Left-padded (and, past max_prompt_length, left-truncated) tensors; works without a tokenizer pad token."""
    truncation = {"truncation": True, "max_length": max_prompt_length} if max_prompt_length else {}
    pad_token = tokenizer.pad_token
    if pad_token is None:
        tokenizer.pad_token_id = pad_id
    try:
        return tokenizer(prompts, padding=True, return_tensors="pt", **truncation)
    finally:
        if pad_token is None:
            tokenizer.pad_token = None


def _until_eos(ids: list[int], eos_ids: list[int]) -> list[int]:
    """The tokens before the first EOS: what follows is padding."""
    for k, token in enumerate(ids):
        if token in eos_ids:
            return ids[:k]
    return ids
