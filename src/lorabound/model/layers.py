"""Layer discovery: the transformer blocks, final norm and output head of any causal LM.

In the spirit of tuned-lens's ``model_surgery.py``: small functions that find a model's layer stack
(plain or wrapped in a PeftModel), and :func:`apply_head`, which turns a block's output into logits
by running the model's own code after its last block.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import LoraboundError

@dataclass
class LayerStack:
    layers: nn.ModuleList      # the transformer blocks, 0 = nearest the embeddings
    layers_path: str           # dotted path from the base (unwrapped) model, e.g. "model.layers"
    final_norm: nn.Module | None
    lm_head: nn.Module
    logit_softcap: float | None  # Gemma-2/3 final_logit_softcapping, else None (informative: apply_head runs the model)
    model: nn.Module           # the unwrapped *ForCausalLM model whose own code computes the logits
    # Whether a block returns a tuple (hidden, ...) rather than a tensor: found once, by apply_head.
    block_returns_tuple: bool | None = field(default=None, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)


# Where known architectures keep their blocks (tried first, in order), relative to the *ForCausalLM model.
KNOWN_LAYER_PATHS = (
    "model.layers",                  # Llama, Mistral, Qwen2/3, Phi-3, Gemma 1/2/3 (text), OLMo, ...
    "model.language_model.layers",   # Gemma-3 / Llava-style multimodal wrappers
    "model.decoder.layers",          # OPT
    "transformer.h",                 # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",               # Pythia / GPT-NeoX
    "transformer.layers",
    "transformer.blocks",            # MPT
)
# Names of the final norm, looked up on the module that holds the block list.
KNOWN_FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "norm_f", "final_norm")
SUPPORTED_LAYOUTS = ("Llama, Mistral, Qwen2, Phi-3, Gemma, Gemma-2, Gemma-3, Granite, Cohere, GPT-2, GPT-J, "
                     "GPT-NeoX, Falcon, Bloom, CodeGen, MPT, OPT")


def unwrap_model(model) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def find_layer_stack(model) -> LayerStack:
    """Works on a plain transformers model or a PeftModel wrapping one."""
    base = unwrap_model(model)
    layers_path = _find_layers_path(base)
    parent_path = layers_path.rpartition(".")[0]
    return LayerStack(
        layers=base.get_submodule(layers_path),
        layers_path=layers_path,
        final_norm=_find_final_norm(base, parent_path),
        lm_head=_find_lm_head(base),
        logit_softcap=_logit_softcap(base),
        model=base,
    )


def _cannot_map(base) -> LoraboundError:
    return LoraboundError(
        f"cannot find the transformer layer stack of {type(base).__name__}; supported layouts: {SUPPORTED_LAYOUTS} "
        "(a causal LM with a ModuleList of config.num_hidden_layers blocks); open an issue with the model's class name"
    )


def num_hidden_layers(base) -> int | None:
    config = getattr(base, "config", None)
    if config is None:
        return None
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else config
    for cfg in (text_config, config):
        for name in ("num_hidden_layers", "n_layer", "num_layers"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _find_layers_path(base) -> str:
    """The dotted path of the block list: a known path first, else the shortest ModuleList of the right length."""
    n_layers = num_hidden_layers(base)
    if n_layers is None:
        raise _cannot_map(base)
    for path in KNOWN_LAYER_PATHS:
        try:
            module = base.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return path
    candidates = [name for name, module in base.named_modules()
                  if name and isinstance(module, nn.ModuleList) and len(module) == n_layers]
    if not candidates:
        raise _cannot_map(base)
    return min(candidates, key=lambda name: (name.count("."), name))


def _find_final_norm(base, parent_path: str) -> nn.Module | None:
    """The norm applied after the last block: a known attribute of the block list's parent, else its only *Norm
    child, else None (OPT with do_layer_norm_before=False normalises inside its blocks and has none).

    Informative only: apply_head runs the model's own code after the blocks, whatever it holds there.
    """
    parent = base.get_submodule(parent_path) if parent_path else base
    for name in KNOWN_FINAL_NORM_NAMES:
        if isinstance(parent._modules.get(name), nn.Module):
            return parent._modules[name]
    norms = [child for child in parent.children() if type(child).__name__.lower().endswith("norm")]
    return norms[0] if len(norms) == 1 else None


def _find_lm_head(base) -> nn.Module:
    get_output_embeddings = getattr(base, "get_output_embeddings", None)
    head = get_output_embeddings() if callable(get_output_embeddings) else None
    if head is None:
        raise _cannot_map(base)
    return head


def _logit_softcap(base) -> float | None:
    config = base.config
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else config
    cap = getattr(text_config, "final_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def apply_head(stack: LayerStack, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from a block's output (shape [..., hidden]), computed by the model's own code after its last block.

    Architectures differ after the last block, so no fixed "norm -> head" recipe reproduces them: Granite divides
    the logits by config.logits_scaling, HyperCLOVAX multiplies by it, MiniCPM3 divides the hidden state by it,
    Cohere multiplies by logit_scale, Falcon-H1 by lm_head_multiplier, Gemma-2/3 soft-cap with
    final_logit_softcapping, Chameleon masks image tokens. So every block is briefly replaced by one that returns
    `hidden`, and the model runs with `hidden` as its input, each position a one-token sequence (so masks and
    positions are trivial and ignored): everything after the blocks (final norm, head and any extra step, with the
    adapter's current state on the head) is the model's own code. analysis.check_reproduces_model compares the
    result with model(...).logits on every analysis.
    """
    tokens = hidden.reshape(-1, 1, hidden.shape[-1])
    inputs = _embeddings_like(stack, tokens)
    if stack.block_returns_tuple is None:
        stack.block_returns_tuple = _block_returns_tuple(stack, inputs[:1])
    with _blocks_return(stack, (tokens,) if stack.block_returns_tuple else tokens):
        output = stack.model(inputs_embeds=inputs, use_cache=False)
    logits = output.logits if hasattr(output, "logits") else output[0]
    return logits.reshape(*hidden.shape[:-1], logits.shape[-1])


@contextlib.contextmanager
def head_only_at(model, predicts: torch.Tensor):
    """Inside, the model's output head runs only on the positions where `predicts` ([batch, seq] bool) is True.

    A forward pre-hook on the head hands it those hidden states as one sequence [1, n, hidden], so the logits
    come out [1, n, vocab], in the order of ``predicts.nonzero()``; whatever the model does after the head
    (soft-capping, scaling) still runs, on fewer rows. Training needs the logits only where a target token is
    predicted (about a third of the positions on E2E), and the head over a 49k vocabulary is a fifth of
    SmolLM2's forward. Yields a one-item list, [True] once the head ran on the gathered rows; a head called
    with another shape (or a model without one) runs unchanged and the caller gathers from full logits.
    """
    base = unwrap_model(model)
    get_output_embeddings = getattr(base, "get_output_embeddings", None)
    head = get_output_embeddings() if callable(get_output_embeddings) else None
    gathered = [False]

    def gather(module, args):
        hidden = args[0]
        if gathered[0] or hidden.dim() != 3 or hidden.shape[:2] != predicts.shape:
            return None
        gathered[0] = True
        return (hidden[predicts].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(gather) if head is not None else None
    try:
        yield gathered
    finally:
        if handle is not None:
            handle.remove()


def _embeddings_like(stack: LayerStack, tokens: torch.Tensor) -> torch.Tensor:
    """What the model takes as inputs_embeds for these positions: `tokens` itself, or zeros of the embedding size
    where the model projects its embeddings into the blocks' width (OPT's project_in). The blocks ignore it."""
    embeddings = stack.model.get_input_embeddings()
    width = getattr(embeddings, "embedding_dim", tokens.shape[-1])
    if width == tokens.shape[-1]:
        return tokens
    return tokens.new_zeros(*tokens.shape[:-1], width)


def _block_returns_tuple(stack: LayerStack, one_token: torch.Tensor) -> bool:
    """Run the model once on one position to see what its last block returns (transformers 5: mostly a tensor)."""
    seen = []
    handle = stack.layers[-1].register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        stack.model(inputs_embeds=one_token, use_cache=False)
    finally:
        handle.remove()
    return isinstance(seen[0], (tuple, list))


@contextlib.contextmanager
def _blocks_return(stack: LayerStack, value):
    """Every block returns `value` without computing anything; restore the blocks' own forward on exit."""
    saved = [layer.__dict__.get("forward") for layer in stack.layers]  # accelerate may have set one already
    for layer in stack.layers:
        layer.forward = lambda *args, **kwargs: value
    try:
        yield
    finally:
        for layer, forward in zip(stack.layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def module_layer_index(module_name: str, layers_path: str) -> int | None:
    """The block index of a module name such as "base_model.model.model.layers.3.self_attn.q_proj", else None.

    Anchored at the model's root (after PEFT's "base_model.model." prefix), so a vision tower's
    "model.vision_tower.encoder.layers.3" is not layer 3 of the text stack "model.language_model.layers".
    """
    match = re.match(rf"(?:base_model\.model\.)?{re.escape(layers_path)}\.(\d+)(?:\.|$)", module_name)
    return int(match.group(1)) if match else None


def layers_path_of_config(config, *, trust_remote_code: bool = False) -> str:
    """The layer stack's path of a model built from `config` alone, on the meta device (no weights, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return _find_layers_path(model)


def layers_path_of_names(module_names, layers_pattern=None) -> str | None:
    """The layer stack's path, guessed from module names alone (an adapter exported without --model).

    The rule: each name's stack is the part before its first numbered segment ("model.layers" in
    "model.layers.3.mlp.experts.5.up_proj"); with the adapter's layers_pattern, only stacks ending in it count.
    One stack: that one. Several (a vision tower's and the text decoder's): the one listed first in
    KNOWN_LAYER_PATHS, else None and the caller asks for the model. No numbered name: "" (no stack).
    """
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    stacks = set()
    for name in module_names:
        match = re.match(r"(.+?)\.\d+(?:\.|$)", name)
        if match and (not patterns or match.group(1).rpartition(".")[2] in patterns):
            stacks.add(match.group(1))
    if len(stacks) <= 1:
        return next(iter(stacks), "")
    known = [path for path in KNOWN_LAYER_PATHS if path in stacks]
    return known[0] if known else None
