"""Keep or drop LoRA per layer in memory: exact and reversible context managers on a loaded PEFT model.

Dropping LoRA on a layer removes only the adapter's update there; the layer's base weights
stay and no transformer layer is ever skipped. Exporting a pruned adapter is export.py's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

from ..errors import LoraboundError
from ..model import find_layer_stack
from .selection import GROUPS, Selection, check_boundary

MODULE_GROUPS = {"attention": ("attn", "attention"), "mlp": ("mlp", "feed_forward", "ffn")}


def module_group(path_in_layer: str) -> str:
    """The module group of a module path inside its transformer layer: "self_attn.q_proj" -> "attention",
    "attn.c_attn" (GPT-2) -> "attention", "mlp.down_proj" -> "mlp", anything else -> "other"."""
    parent = path_in_layer.split(".")[0].lower()
    for group, words in MODULE_GROUPS.items():
        if any(w in parent for w in words):
            return group
    return "other"


@dataclass(frozen=True)
class LoraModule:
    name: str          # path inside its transformer layer, e.g. "self_attn.q_proj"
    layer: int         # index of the transformer layer that holds it
    module: LoraLayer

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def group(self) -> str:
        """"attention", "mlp" or "other", from the module's path inside the layer."""
        return module_group(self.name)

    def matches(self, module_types: Iterable[str] | None) -> bool:
        if module_types is None:
            return True
        return any(t in (self.group, self.short_name) for t in module_types)

    def num_params(self) -> int:
        return sum(p.numel() for n, p in self.module.named_parameters() if "lora_" in n)


def lora_modules(model) -> list[LoraModule]:
    """Every LoRA module inside the transformer layer stack, in layer order."""
    stack = find_layer_stack(model)
    found = []
    for index, layer in enumerate(stack.layers):
        for name, module in layer.named_modules():
            if isinstance(module, LoraLayer):
                found.append(LoraModule(name=name, layer=index, module=module))
    if not found:
        raise LoraboundError("the model has no LoRA modules in its layer stack; load a LoRA adapter with --adapter")
    return found


def adapter_layers(model) -> list[int]:
    """Indices of the layers that carry LoRA (all layers, or the adapter's layers_to_transform)."""
    return sorted({m.layer for m in lora_modules(model)})


def adapter_pairs(model) -> list[tuple[int, str]]:
    """Every (layer, module group) that carries LoRA in the stack: what a Selection can keep or drop."""
    return sorted({(m.layer, m.group) for m in lora_modules(model)})


def lora_params_per_layer(model) -> dict[int, int]:
    counts: dict[int, int] = {}
    for m in lora_modules(model):
        counts[m.layer] = counts.get(m.layer, 0) + m.num_params()
    return counts


def kept_layers(boundary: int, num_layers: int) -> list[int]:
    """Layers 0..b: the layers whose LoRA is kept at boundary b."""
    check_boundary(boundary, num_layers)
    return list(range(boundary + 1))


def keep_lora(model, layers: Iterable[int], module_types: Iterable[str] | None = None):
    """Run the model with LoRA on `layers` only (optionally only on some module types); restore on exit."""
    if module_types is None:
        return keep_selection(model, Selection.layers(layers))
    groups = tuple(module_types)
    if any(t not in GROUPS for t in groups):  # short module names ("q_proj"): match them as before
        keep = set(layers)
        return _keep_modules(model, lambda m: m.layer in keep and m.matches(groups))
    return keep_selection(model, Selection(tuple((g, tuple(sorted(set(layers)))) for g in sorted(set(groups)))))


def keep_selection(model, selection: Selection):
    """Run the model with only the LoRA modules `selection` keeps; restore on exit.

    Exact: a disabled LoRA module returns its base layer's output untouched, the same as a model whose
    adapter never had that module. LoRA outside the layer stack (e.g. on the output head) is left as is.
    """
    return _keep_modules(model, lambda m: selection.keeps(m.layer, m.group))


@contextlib.contextmanager
def _keep_modules(model, keep: Callable[[LoraModule], bool]) -> Iterator[None]:
    modules = lora_modules(model)
    if any(m.module.merged for m in modules):
        raise LoraboundError("the adapter is merged into the base weights; load it unmerged to drop layers")
    saved = [(m.module, m.module.disable_adapters,
              {n: p.requires_grad for n, p in m.module.named_parameters()}) for m in modules]
    try:
        for m in modules:
            if keep(m):
                if m.module.disable_adapters:
                    m.module.enable_adapters(True)
            else:
                m.module.enable_adapters(False)
        yield
    finally:
        for module, was_disabled, grads in saved:
            module.enable_adapters(not was_disabled)
            for n, p in module.named_parameters():
                p.requires_grad_(grads[n])


def keep_up_to(model, boundary: int, module_types: Iterable[str] | None = None):
    """keep_lora for the common case: LoRA on layers 0..boundary."""
    return keep_lora(model, kept_layers(boundary, find_layer_stack(model).num_layers), module_types)


def no_adapter(model):
    """The base model, the same everywhere (the curve's b = -1, evaluation's "base model"): the adapter fully off,
    including its parts outside the layer stack (LoRA on the head or embeddings, modules_to_save)."""
    disable = getattr(model, "disable_adapter", None)
    if callable(disable):
        return disable()
    if parts_outside_layers(model):
        raise LoraboundError("cannot turn off this model's adapter outside its layer stack; wrap it with PEFT "
                             "(load the adapter with --adapter)")
    return keep_lora(model, [])


def parts_outside_layers(model) -> list[str]:
    """Adapter modules that no boundary drops: LoRA outside the layer stack (on the head, the embeddings, a vision
    tower) and modules_to_save / trainable tokens anywhere. Empty when the boundary's b = -1 is the base model."""
    inside = {id(m.module) for m in lora_modules(model)}
    names = []
    for name, module in model.named_modules():
        lora_elsewhere = isinstance(module, BaseTunerLayer) and id(module) not in inside
        if lora_elsewhere or isinstance(module, AuxiliaryTrainingWrapper):
            names.append(_short_module_name(name))
    return names


def _short_module_name(name: str) -> str:
    """"base_model.model.lm_head" -> "lm_head"."""
    return name.removeprefix("base_model.model.")
