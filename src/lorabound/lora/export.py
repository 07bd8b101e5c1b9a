"""Export a pruned adapter: the kept LoRA as a PEFT adapter folder (peft, zero-fill) or merged into the base
model (merged), written atomically; every format reloads with LoRA on exactly the kept modules.

Keeping LoRA in memory is masking.py's.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file

from ..errors import LoraboundError
from ..rules import EXPORT_FORMATS
from ..model import (adapter_tensor_names, check_adapter_files, check_adapter_fits_config,
                     layers_path_of_names, model_layers_path, model_num_layers, model_paths, module_layer_index,
                     read_adapter_config)
from ..runtime.files import atomic_dir, check_not_input, write_json_atomic
from .masking import module_group
from .selection import EVERY, Selection, check_boundary, layer_ranges

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# Tensor names look like "base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight".
_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_[A-Za-z_]+)(?:\.|$)")


def _pair_of_name(tensor_name: str, layers_path: str) -> tuple[int, str] | None:
    """(layer, module group) of a LoRA tensor name inside the stack at `layers_path`; None elsewhere."""
    match = _TENSOR.match(tensor_name)
    if match is None or not layers_path:
        return None
    index = module_layer_index(match["module"], layers_path)
    if index is None:
        return None
    return index, module_group(match["module"][len(f"{layers_path}.{index}."):])


def adapter_file_pairs(adapter_dir: str | Path, model_spec: str | None, *, allow_pickle: bool = False,
                       trust_remote_code: bool = False) -> list[tuple[int, str]]:
    """The adapter's (layer, module group) pairs from its tensor names, without loading any weights: to check a
    selection before any work. The stack is guessed from the names, or read from the model's config."""
    names = adapter_tensor_names(adapter_dir, allow_pickle=allow_pickle)
    config = read_adapter_config(adapter_dir)
    layers_path = layers_path_of_names([m["module"] for name in names if (m := _TENSOR.match(name))],
                                       config.get("layers_pattern"))
    if layers_path is None and model_spec is None:
        raise LoraboundError(f"the adapter {adapter_dir} has LoRA in several numbered layer stacks and none is a "
                             "known text decoder path; pass --model so lorabound finds the decoder's layers")
    if layers_path is None:
        layers_path = model_layers_path(model_spec, trust_remote_code=trust_remote_code)
    return sorted({pair for name in names if (pair := _pair_of_name(name, layers_path))})


@dataclass
class AdapterFiles:
    """An adapter folder read into memory: its config and tensors, and where the model keeps its layers.

    layers_path is the text decoder's layer stack ("model.layers", "model.language_model.layers"): the model's
    own, found as in memory (find_layer_stack) when the model is known, else guessed from the tensor names
    (model.layers_path_of_names states the rule). LoRA anywhere else (a vision tower, the head) is outside the
    stack: no boundary drops it, in memory or on export.
    """
    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    layers_path: str | None = ""   # "" when no tensor is in a numbered stack; None when the names are ambiguous

    @classmethod
    def read(cls, path: str | Path, layers_path: str | None = None, *,
             num_layers: int | None = None) -> "AdapterFiles":
        """Read and check an adapter without its model: config against tensors, finite weights.

        `num_layers` (the base model's, when known) also refuses layers_to_transform naming layers it lacks.
        """
        path = Path(path)
        weights = path / ADAPTER_WEIGHTS
        config = read_adapter_config(path)  # names a missing folder, a file, or a folder with no config
        if not weights.is_file():
            raise LoraboundError(
                f"{path} has no {ADAPTER_WEIGHTS}; export works on safetensors adapters "
                "(load it once with --allow-pickle and save it with PEFT to convert)")
        config, tensors = check_adapter_files(path, num_layers=num_layers)
        if layers_path is None:
            modules = [m["module"] for name in tensors if (m := _TENSOR.match(name))]
            layers_path = layers_path_of_names(modules, config.get("layers_pattern"))
        return cls(path=path, config=config, tensors=tensors, layers_path=layers_path)

    def layer_of(self, tensor_name: str) -> tuple[str, int] | None:
        """(layers pattern, layer index) of a LoRA tensor, or None for tensors outside the layer stack.

        The pattern is the stack's last name ("layers"), as PEFT's layers_pattern spells it.
        """
        if self.layers_path is None:
            raise LoraboundError(
                f"the adapter {self.path} has LoRA in several numbered layer stacks and none is a known text "
                "decoder path; pass --model so lorabound finds the decoder's layers as it does in memory")
        match = _TENSOR.match(tensor_name)
        if match is None or not self.layers_path:
            return None
        index = module_layer_index(match["module"], self.layers_path)
        return None if index is None else (self.layers_path.rpartition(".")[2], index)

    def layers(self) -> list[int]:
        return sorted({lp[1] for name in self.tensors if (lp := self.layer_of(name))})

    def pair_of(self, tensor_name: str) -> tuple[int, str] | None:
        """(layer, module group) of a tensor in the layer stack, as a Selection names it; None outside the stack."""
        self.layer_of(tensor_name)  # refuses ambiguous layer stacks
        return _pair_of_name(tensor_name, self.layers_path)

    def pairs(self) -> list[tuple[int, str]]:
        """Every (layer, module group) that carries LoRA: what a selection can keep or drop."""
        return sorted({pair for name in self.tensors if (pair := self.pair_of(name))})

    def keeps(self, tensor_name: str, selection: Selection) -> bool:
        """Whether `selection` keeps this tensor's module (tensors outside the stack are always kept)."""
        pair = self.pair_of(tensor_name)
        return pair is None or selection.keeps(*pair)

    def lora_params(self, selection: Selection | None = None, *, up_to: int | None = None) -> int:
        """LoRA parameter count, optionally only of the modules `selection` (or layers 0..up_to) keeps, and those
        outside the stack."""
        if up_to is not None:
            selection = Selection.prefix(up_to)
        return sum(t.numel() for name, t in self.tensors.items()
                   if ".lora_" in name and (selection is None or self.keeps(name, selection)))

    def is_dora(self) -> bool:
        return bool(self.config.get("use_dora")) or any("lora_magnitude_vector" in n for n in self.tensors)


@dataclass
class PruneResult:
    boundary: int | None      # b for LoRA on layers 0..b of every module; None for any other selection
    format: str
    out_dir: Path
    layers_kept: list[int]    # stack layers where the export keeps some LoRA module
    lora_params_before: int
    lora_params_after: int
    bytes_before: int | None  # peft / zero-fill: the source adapter's file; merged: the base model's weights
    bytes_after: int          # every .safetensors file written, measured on disk
    notes: list[str] = field(default_factory=list)
    dtype: str = "float32"    # of a merged model
    selection: Selection = field(default_factory=Selection.full)  # what was asked
    pairs_kept: list[tuple[int, str]] = field(default_factory=list)  # (layer, module group) pairs that keep LoRA

    def summary(self) -> str:
        def mb(n: int | None) -> str:
            return "n/a (a hub model)" if n is None else f"{n / 1e6:.2f} MB"
        share = self.lora_params_after / self.lora_params_before if self.lora_params_before else 0.0
        on = self.selection.describe()
        if self.format == "merged":
            what = f"merged model ({self.dtype}) with {on}"
            size = f"model weights on disk: base model {mb(self.bytes_before)} -> merged model {mb(self.bytes_after)}"
        else:
            what = f"{self.format} adapter with {on}"
            size = f"adapter weights on disk: {mb(self.bytes_before)} -> {mb(self.bytes_after)}"
        lines = [f"wrote {what} to {self.out_dir}",
                 f"LoRA parameters: {self.lora_params_before:,} -> {self.lora_params_after:,} ({share:.1%} kept)",
                 size]
        return "\n".join(lines + self.notes)


def as_selection(selection: Selection | int) -> Selection:
    """A Selection as it is; an int b as LoRA on layers 0..b (the paper's boundary)."""
    return selection if isinstance(selection, Selection) else Selection.prefix(int(selection))


def check_selection(selection: Selection, pairs: Iterable[tuple[int, str]], num_layers: int | None) -> None:
    """Refuse a selection that names a module group the adapter lacks, or a layer the model lacks.

    `pairs`: the adapter's (layer, module group) pairs; `num_layers`: the model's (None: unknown, then only
    negative layers are refused).
    """
    if selection.is_full:
        return
    groups = sorted({group for _, group in pairs})
    named = [group for group, _ in selection.kept if group != EVERY]
    lacking = [group for group in named if group not in groups]
    if lacking:
        raise LoraboundError(f"the adapter has no LoRA on {lacking[0]} modules (its module groups: "
                             f"{', '.join(groups) or 'none'}); drop --boundary-{lacking[0]}, or select among those")
    layers = sorted({layer for _, kept in selection.kept for layer in kept})
    top = "" if num_layers is None else f"{num_layers - 1}"
    outside = [layer for layer in layers if layer < 0 or (num_layers is not None and layer >= num_layers)]
    if outside:
        where = f"0..{top} for this {num_layers}-layer model" if num_layers is not None else "0 or above"
        raise LoraboundError(f"layer {outside[0]} is outside {where}; select layers from that range")


def prune_adapter(adapter_dir: str | Path, selection: Selection | int, out_dir: str | Path, *,
                  format: str = "peft", model_spec: str | None = None, num_layers: int | None = None,
                  overwrite: bool = False, dtype: str = "float32", trust_remote_code: bool = False,
                  layers_path: str | None = None) -> PruneResult:
    """Write a new adapter with only the LoRA modules `selection` keeps. The input folder is only read.

    `selection`: a Selection (any set of (layer, module group) pairs), or an int b for LoRA on layers 0..b.
    format "peft": dropped modules' tensors removed, config restricted so PEFT builds LoRA exactly where tensors are.
    format "zero-fill": every tensor name kept, lora_B of dropped modules zeroed (for servers that need every layer).
    format "merged": a full model (needs model_spec) with the kept LoRA merged into its weights.
    layers_path: where the model keeps its layers (find_layer_stack's layers_path); read from model_spec's config
    when not given, else guessed from the tensor names (see AdapterFiles).
    """
    if format not in EXPORT_FORMATS:
        raise LoraboundError(f"unknown export format '{format}'; choose one of {', '.join(EXPORT_FORMATS)}")
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    check_not_input(out_dir, [adapter_dir, model_spec, *model_paths(model_spec)])
    if layers_path is None and model_spec is not None:
        layers_path = model_layers_path(model_spec, trust_remote_code=trust_remote_code)  # config only, no weights
    if num_layers is None and model_spec is not None:
        num_layers = model_num_layers(model_spec, trust_remote_code=trust_remote_code)  # config only, no weights
    source = AdapterFiles.read(adapter_dir, layers_path, num_layers=num_layers)
    if model_spec is not None:  # modules and sizes against the model's config, before any work
        check_adapter_fits_config(model_spec, adapter_dir, {n: tuple(t.shape) for n, t in source.tensors.items()},
                                  trust_remote_code=trust_remote_code,
                                  trained_on=source.config.get("base_model_name_or_path"))
    asked = selection
    if not isinstance(selection, Selection):
        if num_layers is not None:
            check_boundary(selection, num_layers)
        elif selection < -1:
            raise LoraboundError(f"boundary {selection} is below -1; pass --boundary -1 (base model) or higher")
        # A b above the adapter's top layer keeps all of it (without --model, b is not bounded by the model).
        selection = Selection.prefix(min(selection, max(source.layers(), default=-1)))
    check_selection(selection, source.pairs(), num_layers)
    if format == "merged" and model_spec is None:
        raise LoraboundError("--format merged needs the base model; pass --model")

    tensors = _pruned_tensors(source, selection, zero_fill=(format == "zero-fill"))
    pairs = [pair for pair in source.pairs() if selection.keeps(*pair)]
    kept = sorted({layer for layer, _ in pairs})
    what = selection.describe() if isinstance(asked, Selection) else f"boundary {asked}"
    notes = [f"note: the adapter's layers are {layer_ranges(source.layers())}; {what} keeps all of them"] \
        if pairs == source.pairs() else []
    saved_whole = source.config.get("modules_to_save") or []
    if saved_whole:
        notes.append("note: modules_to_save kept whole: "
                     + ", ".join([saved_whole] if isinstance(saved_whole, str) else map(str, saved_whole)))

    if format == "peft" and not pairs:
        b = selection.prefix_boundary()
        what = f"boundary {b}" if b is not None else f"the selection ({selection.describe()})"
        raise LoraboundError(f"{what} keeps no LoRA layer of the adapter, so a peft adapter would be empty; "
                             "use the base model itself, or --format zero-fill / merged")
    if format == "zero-fill" and source.is_dora():
        raise LoraboundError("zero-fill cannot drop a DoRA layer (its magnitude vector still rescales the "
                             "base weight); use --format peft or --format merged")

    with atomic_dir(out_dir, overwrite=overwrite, what="--out") as tmp:
        bytes_before = (adapter_dir / ADAPTER_WEIGHTS).stat().st_size
        if format == "merged":
            bytes_before = _write_merged(source, tensors, selection, model_spec, tmp, dtype, trust_remote_code)
        else:
            config = _pruned_config(source, selection) if format == "peft" else dict(source.config)
            _write_adapter(tmp, config, tensors, source.path)
        bytes_after = sum(p.stat().st_size for p in tmp.rglob("*.safetensors"))
        write_json_atomic(tmp / "lorabound.json", {
            "pruned_from": str(adapter_dir.resolve()), "boundary": _boundary_asked(asked), "format": format,
            "selection": selection.to_json(), "selection_description": selection.describe(),
            "pairs_kept": [list(pair) for pair in pairs], "layers_kept": kept, "layers_in_source": source.layers(),
        })

    return PruneResult(
        boundary=_boundary_asked(asked), format=format, out_dir=out_dir, layers_kept=kept,
        lora_params_before=source.lora_params(), lora_params_after=source.lora_params(selection),
        bytes_before=bytes_before, bytes_after=bytes_after, notes=notes, dtype=dtype, selection=selection,
        pairs_kept=pairs,
    )


def _boundary_asked(asked: Selection | int) -> int | None:
    """The b a prune was asked for, or the b of a prefix selection; None for any other selection."""
    return asked.prefix_boundary() if isinstance(asked, Selection) else int(asked)


def _pruned_tensors(source: AdapterFiles, selection: Selection, zero_fill: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in source.tensors.items():
        if source.keeps(name, selection):
            out[name] = tensor
        elif zero_fill:
            # lora_B = 0 makes the update exactly zero; lora_A is kept so every tensor name still exists.
            out[name] = torch.zeros_like(tensor) if _is_lora_b(name) else tensor
    return out


def exported_bytes(source: AdapterFiles, selection: Selection | int) -> int:
    """The exact size of the adapter_model.safetensors a peft export of `selection` writes (stored dtypes)."""
    from safetensors.torch import save

    tensors = _pruned_tensors(source, as_selection(selection), zero_fill=False)
    return len(save(_contiguous(tensors), metadata={"format": "pt"}))


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tensors.items()}


def _is_lora_b(name: str) -> bool:
    return ".lora_B." in name or ".lora_embedding_B" in name


def _pruned_config(source: AdapterFiles, selection: Selection) -> dict:
    """The config restricted to the kept modules, so PEFT builds LoRA exactly where tensors exist.

    When every kept layer keeps all of its modules (a boundary, a layer set) and target_modules are module names:
    layers_to_transform lists the kept layers. Otherwise (attention and MLP kept on different layers, or a source
    that lists exact paths itself, as PEFT writes them for an all-linear target of fewer than 20 modules)
    target_modules becomes the exact paths of the kept modules: PEFT selects a module whose full path is listed
    without reading layers_to_transform (peft.tuners.tuners_utils.check_target_module_exists), so the source's own
    paths would bring back LoRA on dropped layers, and an exact path matches nothing else. rank_pattern /
    alpha_pattern keep only the keys some kept module uses, so PEFT finds no key without a module.
    """
    config = dict(source.config)
    pairs = [pair for pair in source.pairs() if selection.keeps(*pair)]
    kept = sorted({layer for layer, _ in pairs})
    whole_layers = all(pair in pairs for pair in source.pairs() if pair[0] in kept)
    outside_stack = {m["module"] for name in source.tensors
                     if (m := _TENSOR.match(name)) and source.layer_of(name) is None}
    exact = {m["module"] for name in source.tensors
             if (m := _TENSOR.match(name)) and source.pair_of(name) in pairs} | outside_stack
    _keep_used_pattern_keys(config, sorted(exact))
    patterns = {lp[0] for name in source.tensors if (lp := source.layer_of(name))}
    pattern = sorted(patterns)[0] if len(patterns) == 1 else sorted(patterns) or None
    if not whole_layers or _names_exact_paths(config.get("target_modules"), source):
        # layers_to_transform changes nothing for exact paths; it says that the layer subset is meant, so the
        # export is not taken for an adapter made for a model with fewer layers (model.adapters).
        config.update(target_modules=sorted(exact), layers_to_transform=kept or None,
                      layers_pattern=pattern if kept else None)
        return config
    original_layers = config.get("layers_to_transform")
    if isinstance(original_layers, int):
        original_layers = [original_layers]
    if original_layers:
        kept = [layer for layer in kept if layer in original_layers]
    config["layers_to_transform"] = kept
    config["layers_pattern"] = pattern
    if isinstance(config.get("target_modules"), str) or outside_stack:
        # PEFT ignores layers_to_transform for a string (regex / all-linear) target, and with a list it would
        # drop modules outside the layer stack (they have no layer index): name every module exactly instead.
        config["target_modules"] = sorted(exact)
    return config


def _names_exact_paths(targets, source: AdapterFiles) -> bool:
    """Whether a target_modules list names some module of the adapter by its full path (PEFT then selects that
    module whatever layers_to_transform says)."""
    if not isinstance(targets, list):
        return False
    modules = {m["module"].removeprefix("base_model.model.") for name in source.tensors if (m := _TENSOR.match(name))}
    return any(target in modules for target in targets)


def _keep_used_pattern_keys(config: dict, kept_modules: list[str]) -> None:
    """Drop the rank_pattern / alpha_pattern keys no kept module uses (matched as PEFT matches them)."""
    from peft.utils.other import get_pattern_key

    paths = [module.removeprefix("base_model.model.") for module in kept_modules]
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key)
        if isinstance(pattern, dict) and pattern:
            used = {get_pattern_key(list(pattern), path) for path in paths}
            config[key] = {name: value for name, value in pattern.items() if name in used}


def _write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor], source_dir: Path) -> None:
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file(_contiguous(tensors), str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    readme = source_dir / "README.md"
    if readme.is_file():
        shutil.copyfile(readme, folder / "README.md")


def _write_merged(source: AdapterFiles, tensors, selection: Selection, model_spec, folder: Path, dtype,
                  trust_remote_code) -> int | None:
    """Save the base model with the kept LoRA merged in and modules_to_save copies in place.

    Returns the base model's weights bytes on disk (None for a hub id), to compare model bytes with model bytes.
    """
    from ..model import load_adapter, load_model, resolve_model_dir

    model, tokenizer = load_model(model_spec, dtype=dtype, trust_remote_code=trust_remote_code)
    # The whole source adapter against this model first (layer count, shapes, every tensor used): the pruned one
    # alone would fit a model with more layers as well. unload() gives back the untouched base model.
    model = load_adapter(model, source.path, model_name=model_spec).unload()
    if any(".lora_" in name for name in tensors):
        staging = folder / ".pruned-adapter"
        staging.mkdir()
        _write_adapter(staging, _pruned_config(source, selection), tensors, source.path)
        # load_adapter checks the adapter against this model before PEFT touches it.
        model = load_adapter(model, staging, model_name=model_spec).merge_and_unload()
        shutil.rmtree(staging)
    else:
        _copy_saved_modules(model, tensors, model_spec)  # no LoRA left (b = -1): nothing for PEFT to load
    _untie_changed_head(model)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    base_dir = Path(resolve_model_dir(model_spec))
    return sum(p.stat().st_size for p in base_dir.glob("*.safetensors")) if base_dir.is_dir() else None


def _copy_saved_modules(model, tensors: dict[str, torch.Tensor], model_spec: str) -> None:
    """Put the adapter's whole-module copies (modules_to_save, e.g. lm_head) into the base model.

    Each becomes a new parameter, as PEFT's own merge does: a head tied to the embeddings gets its own weight
    and the embeddings stay the base model's.
    """
    for name, tensor in tensors.items():
        path = name.removeprefix("base_model.model.")
        module_path, _, attribute = path.rpartition(".")
        try:
            module = model.get_submodule(module_path)
            old = getattr(module, attribute)
        except AttributeError:
            raise LoraboundError(f"the adapter saves {path}, which model {model_spec} does not have; "
                                 "pass the --model the adapter was trained on") from None
        if tuple(old.shape) != tuple(tensor.shape):
            raise LoraboundError(f"the adapter's {path} has shape {tuple(tensor.shape)}, model {model_spec}'s "
                                 f"{tuple(old.shape)}; pass the --model the adapter was trained on")
        setattr(module, attribute, torch.nn.Parameter(tensor.to(old.dtype).clone(), requires_grad=False))


def _untie_changed_head(model) -> None:
    """An output head that now differs from the embeddings it was tied to is saved as its own tensor."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if not getattr(model.config, "tie_word_embeddings", False) or inputs is None or outputs is None:
        return
    if outputs.weight is not inputs.weight and not torch.equal(outputs.weight, inputs.weight):
        model.config.tie_word_embeddings = False
