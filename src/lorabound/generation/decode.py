"""Greedy generation in left-padded batches (the transformers engine).

:func:`generate` decodes greedily, stopping each row at the end of its answer line (leading blank lines
skipped), at EOS, or at max_new_tokens, and returns the cleaned outputs in the prompts' order.
:func:`generate_variants` does the same for several variants (lora/variants.Variant) of the loaded adapter at
once (the base model, LoRA on layers 0..b, any Selection of (layer, module group) pairs, the full adapter): every
prompt is repeated once per variant in the same batch and each LoRA module's update is zeroed on the rows of the
variants that drop that module. That is exact: the variants differ only in which modules apply their LoRA.

Speed (see bench/generation.py): the stopping check works on token ids (a row's text is decoded only when
it emits a token that holds a newline), and a plain greedy loop over the KV cache drops finished rows from
the batch instead of computing them until the longest row ends.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..errors import LoraboundError
from ..lora.selection import Selection
from ..lora.variants import Variant

# Generation-config settings that make transformers' greedy search differ from a plain argmax loop: a model
# that sets any of them goes through model.generate (still with the token-id stopping check).
_PROCESSOR_SETTINGS = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
                       "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
                       "min_length": (None, 0), "min_new_tokens": (None, 0), "suppress_tokens": (None,),
                       "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
                       "forced_eos_token_id": (None,), "sequence_bias": (None,), "exponential_decay_length_penalty":
                       (None,), "renormalize_logits": (None, False), "epsilon_cutoff": (None, 0.0)}


@dataclass
class GenerationResult:
    texts: list[str]          # one output per prompt, in the prompts' order
    n_prompt_truncated: int   # prompts cut from the left to max_prompt_length tokens


# ---------------------------------------------------------------------------
# Stopping on token ids
# ---------------------------------------------------------------------------

def newline_token_ids(tokenizer) -> frozenset[int]:
    """Every vocabulary id whose decoded text holds a newline (special tokens decode to nothing)."""
    ids = list(range(len(tokenizer)))
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)
    return frozenset(i for i, text in zip(ids, texts) if "\n" in text)


def answer_line_ended(text: str) -> bool:
    """The text-based rule: the first non-blank line has ended (leading blank lines are not the answer yet)."""
    return "\n" in text.lstrip()


class StopRule:
    """When a row is done: at EOS, or (stop_at_newline) once its answer line has ended.

    The answer-line rule needs the row's text, but a row's text can only come to hold a newline after its
    first non-blank character when the row emits a token holding one: only then is the row decoded. So the
    result equals applying :func:`answer_line_ended` to the decoded text after every token.
    """

    def __init__(self, tokenizer, eos_ids: Iterable[int], stop_at_newline: bool):
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.newline_ids = newline_token_ids(tokenizer) if stop_at_newline else frozenset()

    def done(self, tokens: list[int]) -> bool:
        """`tokens`: the row's new tokens so far, the latest last."""
        last = tokens[-1]
        if last in self.eos_ids:
            return True
        return last in self.newline_ids and answer_line_ended(
            self.tokenizer.decode(tokens, skip_special_tokens=True))


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a sequence: the model's generation config and the tokenizer's EOS."""
    ids = []
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None) if config is not None else None
    for value in ([configured] if isinstance(configured, int) else list(configured or [])) + [tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


# ---------------------------------------------------------------------------
# Per-row LoRA module masks (several variants in one batch)
# ---------------------------------------------------------------------------

class RowLoraMask:
    """Forward hooks that zero LoRA updates on the rows of variants that drop the module.

    `variants[v]`: the Selection variant v keeps, as Variant.selection (None: the base model, no LoRA module at
    all). Hooks sit on lora_B of every module that some variants keep and others drop (per module, so attention and
    MLP LoRA of one layer can differ); the update of a dropped row becomes exactly 0, so the row computes
    base_layer(x) + 0, the same as a disabled module. :meth:`set_rows` says which variant each current batch row
    belongs to.
    """

    def __init__(self, modules, variants: Sequence[Selection | None]):
        import torch

        self.keep = {}      # module index -> bool tensor over variants, for modules that some variants drop
        self.current = {}   # module index -> bool tensor over the current rows
        self.handles = []
        for index, m in enumerate(modules):
            kept = [v is not None and v.keeps(m.layer, m.group) for v in variants]
            if all(kept) or not any(kept):
                continue  # the same on every row: keep_selection enables or disables the module as a whole
            self.keep[index] = torch.tensor(kept)
            for name in m.module.active_adapters:
                if name in m.module.lora_B:
                    self.handles.append(m.module.lora_B[name].register_forward_hook(self._hook(index)))

    def _hook(self, index: int):
        def zero_dropped_rows(module, args, output):
            import torch

            mask = self.current[index].to(output.device).view(-1, *[1] * (output.dim() - 1))
            return torch.where(mask, output, torch.zeros((), dtype=output.dtype, device=output.device))
        return zero_dropped_rows

    def set_rows(self, variant_of_row) -> None:
        self.current = {index: keep[variant_of_row] for index, keep in self.keep.items()}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _union(selections: Sequence[Selection | None], modules) -> Selection:
    """The modules any of the variants keeps, as one Selection (what the batch enables as a whole)."""
    by_group: dict[str, set[int]] = {}
    for m in modules:
        if any(s is not None and s.keeps(m.layer, m.group) for s in selections):
            by_group.setdefault(m.group, set()).add(m.layer)
    return Selection(tuple(sorted((group, tuple(sorted(layers))) for group, layers in by_group.items())))


def _maskable_modules(model):
    """The stack's LoRA modules if per-row masks are exact for this adapter, else None.

    Exact for plain LoRA on linear layers (update = lora_B(lora_A(x)) * scaling). Not for DoRA or other
    variants, LoRA on embeddings or convolutions, merged adapters, or adapters with parts outside the
    layer stack (modules_to_save, LoRA on the output head), which the base variant must switch off too.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear

    from ..lora.masking import lora_modules

    modules = lora_modules(model)
    in_stack = {id(m.module) for m in modules}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and id(module) not in in_stack:
            return None
        if type(module).__name__ == "ModulesToSaveWrapper":
            return None
    for m in modules:
        if type(m.module) is not Linear or m.module.merged or m.module.lora_variant:
            return None
    return modules


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------

def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, batch_size: int = 32,
             stop_at_newline: bool = True, max_prompt_length: int | None = None,
             progress: bool | str = True) -> GenerationResult:
    """Greedy outputs for `prompts` (new text only, only the first non-blank line when `stop_at_newline`, stripped).

    Prompts are sorted by length into left-padded batches and the outputs put back in the prompts' order.
    Prompts longer than `max_prompt_length` tokens lose their beginning; they are counted in the result.
    `model` may be a plain causal LM or a peft PeftModel (run as it is set). `progress`: show a bar (a str
    labels it).
    """
    results = _generate_rows(model, tokenizer, prompts, copies=1, mask=None, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, stop_at_newline=stop_at_newline,
                             max_prompt_length=max_prompt_length, progress=progress)
    return results[0]


def generate_variants(model, tokenizer, prompts: list[str], variants: Sequence[Variant], *,
                      max_new_tokens: int = 64, batch_size: int = 32, stop_at_newline: bool = True,
                      max_prompt_length: int | None = None, progress: bool | str = True,
                      batched: bool = True) -> dict[str, GenerationResult]:
    """:func:`generate` for several variants of the loaded peft adapter: {variant name: result}.

    `variants`: lora/variants.Variant values, in its one convention: `selection` is the LoRA kept of the loaded
    adapter (a Selection: any (layer, module group) pairs, see lora/selection.py; Selection.full() the adapter as
    loaded) and None is the base model (the adapter switched off, also outside the layer stack). A Variant of
    another adapter folder (`adapter=`) is refused: it is another model, not a mask of this one (load it and
    call :func:`generate`). With `batched` (and an adapter for which it is exact, see _maskable_modules) all
    variants share each batch: `batch_size` prompts, each repeated once per variant. Otherwise, or with
    `batched=False`, one run per variant. Either way the outputs are those of separate runs.
    """
    from ..lora.masking import keep_selection

    variants = list(variants)
    for v in variants:
        if not isinstance(v, Variant):
            raise LoraboundError(f"generate_variants takes lora.variants.Variant values, not {v!r}; pass "
                                 "Variant(name, selection), Variant(name) for the full adapter or "
                                 "Variant(name, None) for the base model")
        if v.adapter is not None:
            raise LoraboundError(f"variant {v.name!r} is another adapter folder ({v.adapter}), which cannot share "
                                 "batches with the loaded adapter; load it and call generate, or use an engine")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise LoraboundError(f"variant names {names} repeat; give every variant its own name")
    settings = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, stop_at_newline=stop_at_newline,
                    max_prompt_length=max_prompt_length)
    modules = _maskable_modules(model) if batched and len(variants) > 1 else None
    if modules is None:
        results = {}
        for v in variants:
            label = f"{progress}: {v.name}" if isinstance(progress, str) else progress
            with _variant_set(model, v.selection):
                results[v.name] = generate(model, tokenizer, prompts, progress=label, **settings)
        return results

    selections = [v.selection for v in variants]
    mask = RowLoraMask(modules, selections)
    try:
        with keep_selection(model, _union(selections, modules)):
            rows = _generate_rows(model, tokenizer, prompts, copies=len(variants), mask=mask, progress=progress,
                                  **settings)
    finally:
        mask.remove()
    return dict(zip(names, rows))


@contextlib.contextmanager
def _variant_set(model, selection: Selection | None):
    """The model as the variant runs: `selection` kept of the loaded adapter; None: the base model."""
    from ..lora.masking import keep_selection

    if selection is None:
        with model.disable_adapter():
            yield
    elif selection.is_full:
        yield
    else:
        with keep_selection(model, selection):
            yield


# ---------------------------------------------------------------------------
# The batches
# ---------------------------------------------------------------------------

def _generate_rows(model, tokenizer, prompts: list[str], *, copies: int, mask: RowLoraMask | None,
                   max_new_tokens: int, batch_size: int, stop_at_newline: bool, max_prompt_length: int | None,
                   progress: bool | str) -> list[GenerationResult]:
    """One result per copy: each batch of `batch_size` prompts runs `copies` times over, copy-major."""
    import torch
    from tqdm.auto import tqdm

    prompts = list(prompts)
    if batch_size < 1 or max_new_tokens < 1:
        raise LoraboundError(f"batch_size {batch_size} and max_new_tokens {max_new_tokens} must be at least 1; "
                             "pass positive numbers")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise LoraboundError(f"max_prompt_length {max_prompt_length} must be at least 1; pass a positive number "
                             "or None")
    if not prompts:
        return [GenerationResult(texts=[], n_prompt_truncated=0) for _ in range(copies)]
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    if pad_id is None:
        raise LoraboundError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token before "
                             "generating")
    rule = StopRule(tokenizer, eos_ids, stop_at_newline)
    decode = _greedy_loop if _plain_greedy(model) else _hf_generate

    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    n_truncated = sum(n > max_prompt_length for n in lengths) if max_prompt_length else 0
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    texts: list[list[str | None]] = [[None] * len(prompts) for _ in range(copies)]
    device = next(model.parameters()).device
    was_training = model.training
    label = progress if isinstance(progress, str) else "generating"
    bar = tqdm(total=len(prompts) * copies, unit="ex", desc=label, disable=not progress)
    try:
        model.eval()
        with tokenizer_sides(tokenizer), torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                enc = encode_batch(tokenizer, [prompts[i] for i in chunk], max_prompt_length, pad_id)
                input_ids = enc["input_ids"].to(device).repeat(copies, 1)
                attention_mask = enc["attention_mask"].to(device).repeat(copies, 1)
                copy_of_row = torch.arange(copies).repeat_interleave(len(chunk))
                on_rows = (lambda alive: mask.set_rows(copy_of_row[alive])) if mask is not None else None
                new_tokens = decode(model, input_ids, attention_mask, max_new_tokens, rule, pad_id, on_rows)
                for row, ids in enumerate(new_tokens):
                    text = tokenizer.decode(_until_eos(ids, rule.eos_ids), skip_special_tokens=True)
                    texts[row // len(chunk)][chunk[row % len(chunk)]] = clean_output(text, stop_at_newline)
                bar.update(len(chunk) * copies)
    finally:
        bar.close()
        if was_training:
            model.train()
    return [GenerationResult(texts=t, n_prompt_truncated=n_truncated) for t in texts]


def _plain_greedy(model) -> bool:
    """Whether greedy search is a plain argmax for this model (no logits processors in its generation config)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return True
    return all(getattr(config, name, None) in neutral for name, neutral in _PROCESSOR_SETTINGS.items())


def _greedy_loop(model, input_ids, attention_mask, max_new_tokens: int, rule: StopRule, pad_id: int,
                 on_rows) -> list[list[int]]:
    """Greedy decoding over the KV cache; finished rows leave the batch (and the cache) at once."""
    import torch

    rows = input_ids.shape[0]
    tokens: list[list[int]] = [[] for _ in range(rows)]
    alive = torch.arange(rows)                      # original row of each current row
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # as transformers
    if on_rows:
        on_rows(alive)
    takes = forward_parameters(model)
    cache_arg = "cache" if "cache" in takes else "past_key_values"  # renamed in transformers 5.x
    first = {"logits_to_keep": 1} if "logits_to_keep" in takes else {}  # the head at the last position only
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                **first)
    cache, next_position = cache_of(out), position_ids[:, -1:] + 1
    for _ in range(max_new_tokens):
        chosen = out.logits[:, -1].float().argmax(-1)
        finished = []
        for k, (row, token) in enumerate(zip(alive.tolist(), chosen.tolist())):
            tokens[row].append(token)
            finished.append(rule.done(tokens[row]) or len(tokens[row]) >= max_new_tokens)
        if all(finished):
            break
        if any(finished):
            keep = torch.tensor([not f for f in finished])
            index = keep.nonzero().flatten().to(chosen.device)
            cache.batch_select_indices(index)
            alive, chosen = alive[keep], chosen[index]
            attention_mask, next_position = attention_mask[index], next_position[index]
            if on_rows:
                on_rows(alive)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        out = model(input_ids=chosen[:, None], attention_mask=attention_mask, position_ids=next_position,
                    use_cache=True, **{cache_arg: cache})
        cache = cache_of(out)
        next_position = next_position + 1
    return tokens


def forward_parameters(model) -> set[str]:
    """The names of the parameters the model's forward() takes."""
    import inspect

    from ..model import unwrap_model

    return set(inspect.signature(unwrap_model(model).forward).parameters)


def cache_of(output):
    """The key/value cache a forward pass returned, under either attribute name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _hf_generate(model, input_ids, attention_mask, max_new_tokens: int, rule: StopRule, pad_id: int,
                 on_rows) -> list[list[int]]:
    """transformers' model.generate (for generation configs with logits processors), the same stop rule."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    prompt_length = input_ids.shape[1]

    class Stop(StoppingCriteria):
        def __init__(self):
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        def __call__(self, ids, scores, **kwargs):
            for row in (~self.done).nonzero().flatten().tolist():
                if rule.done(ids[row, prompt_length:].tolist()):
                    self.done[row] = True
            return self.done.clone()

    if on_rows:
        on_rows(torch.arange(input_ids.shape[0]))
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                            max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                            eos_token_id=sorted(rule.eos_ids) or None, stopping_criteria=StoppingCriteriaList([Stop()]))
    return output[:, prompt_length:].tolist()


@contextlib.contextmanager
def tokenizer_sides(tokenizer):
    """Left padding and left truncation while generating; the tokenizer's own settings come back afterwards."""
    padding, truncation = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = padding, truncation


def clean_output(text: str, stop_at_newline: bool) -> str:
    """A generated text as scored: its first line when generation stops at a newline, stripped."""
    if stop_at_newline:
        text = text.lstrip().split("\n", 1)[0]
    return text.strip()


def encode_batch(tokenizer, prompts: list[str], max_prompt_length: int | None, pad_id: int):
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


def _until_eos(ids: list[int], eos_ids) -> list[int]:
    """The tokens before the first EOS: what follows is padding."""
    for k, token in enumerate(ids):
        if token in eos_ids:
            return ids[:k]
    return ids
