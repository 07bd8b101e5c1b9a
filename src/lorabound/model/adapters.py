"""LoRA adapter folders: reading, checking against the model, loading into a PeftModel."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraboundError
from .errors import first_line as _first_line
from .layers import LayerStack, find_layer_stack, module_layer_index, unwrap_model

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."
_LORA_TENSOR = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?:\.|$)"
)


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The parsed adapter_config.json of a PEFT adapter folder (checks only that it exists and parses)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.exists():
        raise LoraboundError(f"adapter folder {adapter_dir} does not exist; pass the folder written by PEFT's save_pretrained")
    if not adapter_dir.is_dir():
        raise LoraboundError(f"adapter {adapter_dir} is a file, not a folder; pass the folder that holds adapter_config.json")
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise LoraboundError(
            f"{adapter_dir} is not a PEFT adapter folder (no {ADAPTER_CONFIG}); pass the folder written by save_pretrained"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LoraboundError(f"cannot parse {path} ({_first_line(err)}); restore the adapter's {ADAPTER_CONFIG}") from err
    if not isinstance(config, dict):
        raise LoraboundError(f"{path} is not a JSON object; restore the adapter's {ADAPTER_CONFIG}")
    return config


def adapter_weights_file(adapter_dir: str | Path, *, allow_pickle: bool = False) -> Path:
    """adapter_model.safetensors, or adapter_model.bin when only that exists and allow_pickle is set."""
    adapter_dir = Path(adapter_dir)
    safetensors_file = adapter_dir / ADAPTER_SAFETENSORS
    pickle_file = adapter_dir / ADAPTER_PICKLE
    if safetensors_file.is_file():
        return safetensors_file
    if pickle_file.is_file():
        if not allow_pickle:
            raise LoraboundError(
                f"{adapter_dir} holds only a pickled {ADAPTER_PICKLE}; convert it to safetensors or pass "
                "--allow-pickle (loads with torch.load(weights_only=True))"
            )
        return pickle_file
    raise LoraboundError(
        f"{adapter_dir} has no adapter weights ({ADAPTER_SAFETENSORS}); pass the folder written by PEFT's save_pretrained"
    )


def adapter_tensor_shapes(adapter_dir: str | Path, *, allow_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the adapter's weights file (safetensors read lazily)."""
    path = adapter_weights_file(adapter_dir, allow_pickle=allow_pickle)
    try:
        if path.name == ADAPTER_SAFETENSORS:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise LoraboundError(
            f"cannot read adapter weights {path} ({type(err).__name__}: {_first_line(err)}); "
            "restore the file from the adapter's source"
        ) from err
    if not isinstance(state, dict):
        raise LoraboundError(f"{path} does not hold a state dict; restore the file from the adapter's source")
    return {name: tuple(t.shape) for name, t in state.items() if isinstance(t, torch.Tensor)}


def adapter_tensor_names(adapter_dir: str | Path, *, allow_pickle: bool = False) -> list[str]:
    """Tensor names in the adapter's weights file, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    return list(adapter_tensor_shapes(adapter_dir, allow_pickle=allow_pickle))


def load_adapter(model, adapter_dir: str | Path, *, allow_pickle: bool = False, is_trainable: bool = False,
                 model_name: str | None = None):
    """Wrap `model` in a PeftModel with the LoRA adapter at `adapter_dir`, after validating it.

    `model` is modified in place (PEFT injects LoRA layers into it): pass a freshly loaded base model.
    Nothing is written into `adapter_dir`. `model_name` (the --model spec) names the model in errors.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise LoraboundError("the model already carries a PEFT adapter; load a fresh base model for each adapter")
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    check_lora_config(config, adapter_dir)
    shapes = adapter_tensor_shapes(adapter_dir, allow_pickle=allow_pickle)
    check_adapter_matches(model, adapter_dir, shapes, model_name=model_name,
                          trained_on=config.get("base_model_name_or_path"))
    try:
        # PEFT reads adapter_model.safetensors if present, else adapter_model.bin with torch.load(weights_only=True).
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise LoraboundError(
            f"PEFT could not load the adapter {adapter_dir} ({type(err).__name__}: {_first_line(err)}); "
            "check that it was saved by PEFT for this --model"
        ) from err
    if not is_trainable:
        peft_model.eval()
    return peft_model


def check_lora_config(config: dict, adapter_dir: str | Path) -> None:
    """Refuse adapters of other PEFT types (IA3, prefix tuning, ...): only LoRA has per-layer updates to drop."""
    peft_type = str(config.get("peft_type") or "").upper()
    if peft_type != "LORA":
        raise LoraboundError(
            f"{adapter_dir} is a {peft_type or 'untyped'} adapter; lorabound works on LoRA adapters only (peft_type LORA): "
            "pass a LoRA, rsLoRA or DoRA adapter folder"
        )


def check_adapter_matches(model, adapter_dir: str | Path, shapes: dict[str, tuple[int, ...]], *,
                          model_name: str | None = None, trained_on: str | None = None) -> None:
    """Every LoRA tensor must target an existing module of `model` with matching in/out features."""
    base = unwrap_model(model)
    try:
        stack: LayerStack | None = find_layer_stack(base)
    except LoraboundError:
        stack = None
    name = model_name or getattr(getattr(base, "config", None), "name_or_path", None) or type(base).__name__
    mismatch = f"adapter {adapter_dir} was trained for a different base model than {name}"
    fix = "pass the --model it was trained on" + (f" (its adapter_config.json names {trained_on})" if trained_on else "")
    lora_tensors = 0
    for name, shape in shapes.items():
        match = _LORA_TENSOR.match(name.removeprefix(_PEFT_PREFIX))
        if match is None:
            continue
        lora_tensors += 1
        module_name, kind = match.group("module"), match.group("kind")
        try:
            module = base.get_submodule(module_name)
        except AttributeError:
            where = ""
            if stack is not None:
                index = module_layer_index(module_name, stack.layers_path)
                if index is not None and index >= stack.num_layers:
                    where = f" (this model has {stack.num_layers} layers)"
            raise LoraboundError(f"{mismatch}: module {module_name} not found{where}; {fix}") from None
        features = _module_features(module)
        if features is None or len(shape) < 2:
            continue
        in_features, out_features = features
        # lora_A / lora_embedding_A read the module's input side, lora_B / lora_embedding_B write its output side.
        checks = {"lora_A": (shape[1], in_features, "in_features"),
                  "lora_B": (shape[0], out_features, "out_features"),
                  "lora_embedding_A": (shape[1], in_features, "embeddings"),
                  "lora_embedding_B": (shape[0], out_features, "embedding size")}
        if kind in checks and checks[kind][0] != checks[kind][1]:
            expected, actual, what = checks[kind]
            raise LoraboundError(f"{mismatch}: {kind} of {module_name} expects {what} {expected}, "
                                 f"the model has {actual}; {fix}")
    if lora_tensors == 0:
        raise LoraboundError(
            f"{adapter_dir} holds no LoRA tensors (lora_A / lora_B); pass a LoRA adapter folder written by PEFT"
        )


def _module_features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a Linear-like module, (num_embeddings, dim) of an embedding; None when unknown."""
    base_layer = getattr(module, "base_layer", None)  # already LoRA-wrapped
    if isinstance(base_layer, nn.Module):
        module = base_layer
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:  # GPT-2: weight is (in, out)
        return tuple(module.weight.shape)  # type: ignore[return-value]
    in_features, out_features = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(in_features, int) and isinstance(out_features, int):
        return in_features, out_features
    return None
