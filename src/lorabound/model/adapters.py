"""LoRA adapter folders: reading, checking against the model, loading into a PeftModel."""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraboundError, first_line
from .layers import LayerStack, find_layer_stack, layers_path_of_names, module_layer_index, unwrap_model

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
        raise LoraboundError(f"cannot parse {path} ({first_line(err)}); restore the adapter's {ADAPTER_CONFIG}") from err
    if not isinstance(config, dict):
        raise LoraboundError(f"{path} is not a JSON object; restore the adapter's {ADAPTER_CONFIG}")
    check_config_types(config, path)
    return config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_names(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# adapter_config.json fields lorabound reads before PEFT does: (field, test, the JSON types it may have).
_CONFIG_TYPES = (
    ("target_modules", lambda v: v is None or isinstance(v, str) or _is_names(v),
     "a module name pattern, a list of module names, or null"),
    ("exclude_modules", lambda v: v is None or isinstance(v, str) or _is_names(v),
     "a module name pattern, a list of module names, or null"),
    ("modules_to_save", lambda v: v is None or _is_names(v), "a list of module names, or null"),
    ("layers_pattern", lambda v: v is None or isinstance(v, str) or _is_names(v),
     "a name such as \"layers\", a list of names, or null"),
    ("layers_to_transform", lambda v: v is None or _is_int(v) or (isinstance(v, list) and all(map(_is_int, v))),
     "a layer index, a list of layer indices, or null"),
    ("bias", lambda v: v in (None, "none", "all", "lora_only"), "\"none\", \"all\" or \"lora_only\""),
    ("use_dora", lambda v: v is None or isinstance(v, bool), "true or false"),
    ("use_rslora", lambda v: v is None or isinstance(v, bool), "true or false"),
    ("fan_in_fan_out", lambda v: v is None or isinstance(v, bool), "true or false"),
)


def check_config_types(config: dict, path: str | Path) -> None:
    """Refuse adapter_config.json fields of the wrong JSON type (a number for target_modules, a string for
    layers_to_transform) before anything reads them."""
    for key, ok, expected in _CONFIG_TYPES:
        if key in config and not ok(config[key]):
            raise LoraboundError(f"{path}: {key} is {json.dumps(config[key])}, but it must be {expected}; "
                                 f"correct it, or restore the adapter's {ADAPTER_CONFIG} from its source")


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
            f"cannot read adapter weights {path} ({first_line(err, typed=True)}); "
            "restore the file from the adapter's source"
        ) from err
    if not isinstance(state, dict):
        raise LoraboundError(f"{path} does not hold a state dict; restore the file from the adapter's source")
    return {name: tuple(t.shape) for name, t in state.items() if isinstance(t, torch.Tensor)}


def adapter_tensor_names(adapter_dir: str | Path, *, allow_pickle: bool = False) -> list[str]:
    """Tensor names in the adapter's weights file, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    return list(adapter_tensor_shapes(adapter_dir, allow_pickle=allow_pickle))


def read_adapter_tensors(adapter_dir: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter's weights file, on the CPU (pickles only with allow_pickle, weights_only)."""
    path = adapter_weights_file(adapter_dir, allow_pickle=allow_pickle)
    try:
        if path.name == ADAPTER_SAFETENSORS:
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors raises its own error type on a truncated or altered file
        raise LoraboundError(f"cannot read adapter weights {path} ({first_line(err, typed=True)}); "
                             "restore the file from the adapter's source") from err
    if not isinstance(tensors, dict):
        raise LoraboundError(f"{path} does not hold a state dict; restore the file from the adapter's source")
    return {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}


def check_adapter_files(adapter_dir: str | Path, *, allow_pickle: bool = False,
                        num_layers: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Everything about an adapter folder that needs no model; run it before loading one.

    A LoRA config that agrees with its tensors, and finite weights. Returns (config, tensors).
    """
    config = read_adapter_config(adapter_dir)
    check_lora_config(config, adapter_dir)
    tensors = read_adapter_tensors(adapter_dir, allow_pickle=allow_pickle)
    check_adapter_consistency(config, {name: tuple(t.shape) for name, t in tensors.items()}, adapter_dir,
                              num_layers=num_layers)
    check_finite_tensors(tensors, adapter_dir)
    return config, tensors


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
    check_adapter_consistency(config, shapes, adapter_dir, num_layers=_num_layers(model))
    check_adapter_matches(model, adapter_dir, shapes, model_name=model_name,
                          trained_on=config.get("base_model_name_or_path"))
    try:
        # PEFT reads adapter_model.safetensors if present, else adapter_model.bin with torch.load(weights_only=True).
        # Its "missing adapter keys" warning is replaced by the exact comparison below.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise LoraboundError(
            f"PEFT could not load the adapter {adapter_dir} ({first_line(err, typed=True)}); "
            "check that it was saved by PEFT for this --model"
        ) from err
    try:
        check_every_tensor_used(peft_model, shapes, adapter_dir, config)
    except LoraboundError:
        with contextlib.suppress(Exception):
            peft_model.unload()  # give the caller its base model back without the half-valid LoRA layers
        raise
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
    task = str(config.get("task_type") or "").upper()
    if task in _OTHER_TASKS:
        raise LoraboundError(f"{adapter_dir} is an adapter for {_OTHER_TASKS[task]} (task_type {task}); lorabound "
                             "analyses adapters of causal language models: pass one saved with task_type CAUSAL_LM "
                             "(or none)")


# PEFT task types of adapters made for another kind of head than a causal LM's next-token head.
_OTHER_TASKS = {"SEQ_CLS": "sequence classification", "TOKEN_CLS": "token classification",
                "QUESTION_ANS": "question answering", "SEQ_2_SEQ_LM": "an encoder-decoder model",
                "FEATURE_EXTRACTION": "feature extraction"}


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


# ---------------------------------------------------------------------------
# The adapter's config against its own tensors
# ---------------------------------------------------------------------------

_FIX_TENSORS = "restore the adapter's files from its source (PEFT's save_pretrained writes them consistent)"
_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))


def check_adapter_consistency(config: dict, shapes: dict[str, tuple[int, ...]], adapter_dir: str | Path, *,
                              num_layers: int | None = None) -> None:
    """Refuse an adapter whose adapter_config.json disagrees with its tensors; needs no model.

    Checks: r / lora_alpha / rank_pattern / alpha_pattern are valid numbers; every module has both LoRA
    matrices with the rank the config gives it; DoRA magnitude vectors exist exactly when use_dora is set;
    every tensor lies on a module target_modules (and layers_to_transform) selects; every layer
    layers_to_transform names carries tensors and, when `num_layers` is known, exists.
    What needs the model (target_modules null or all-linear) is checked after loading by check_every_tensor_used.
    """
    where = f"adapter {adapter_dir}"
    _check_config_numbers(config, where)
    _check_no_trained_biases(config, shapes, where)
    modules = _lora_modules(shapes)
    use_dora = bool(config.get("use_dora"))
    for module, parts in modules.items():
        _check_module_parts(module, parts, config, use_dora, where)
    _check_targets(config, modules, where)
    _check_layers_to_transform(config, modules, where, num_layers)
    _check_layer_count(config, modules, where, num_layers)


def check_every_tensor_used(peft_model, shapes: dict[str, tuple[int, ...]], adapter_dir: str | Path,
                            config: dict) -> None:
    """After PEFT loaded the adapter: the LoRA weights PEFT created are exactly the file's tensors.

    A weight PEFT created but the file lacks would keep its random initial value; a tensor of the file
    PEFT has no place for would be silently ignored. Both are refused, naming the first one. Then every
    loaded weight must be finite.
    """
    from peft.utils import get_peft_model_state_dict

    required = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    allowed = set(required) | set(get_peft_model_state_dict(peft_model, save_embedding_layers=True))
    mapping = getattr(unwrap_model(peft_model), "_checkpoint_conversion_mapping", None) or {}
    in_file = {_mapped_key(name, mapping): shape for name, shape in shapes.items()}
    settings = _selection_summary(config)
    missing = sorted(set(required) - set(in_file))
    if missing:
        raise LoraboundError(
            f"adapter {adapter_dir} lacks {_and_more(missing)}, which its adapter_config.json ({settings}) implies "
            f"for this model: PEFT would leave it at a random initial value; {_FIX_TENSORS}, or narrow "
            "target_modules / layers_to_transform to the modules its tensors cover")
    unused = sorted(set(in_file) - allowed)
    if unused:
        raise LoraboundError(
            f"adapter {adapter_dir} holds {_and_more(unused)}, which its adapter_config.json ({settings}) does not "
            f"select on this model, so PEFT would ignore it; {_FIX_TENSORS}, or add its module to target_modules "
            "(and its layer to layers_to_transform)")
    for name, tensor in required.items():
        if tuple(tensor.shape) != tuple(in_file[name]):
            raise LoraboundError(f"adapter {adapter_dir}: tensor {name} has shape {tuple(in_file[name])} but the "
                                 f"config makes it {tuple(tensor.shape)} on this model; {_FIX_TENSORS}")
    check_finite_tensors(required, adapter_dir)


def check_finite_tensors(tensors: dict[str, torch.Tensor], adapter_dir: str | Path) -> None:
    """Refuse NaN or infinite adapter weights, naming the first tensor that holds any."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
            continue
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        raise LoraboundError(
            f"adapter {adapter_dir}: tensor {name} holds non-finite weights ({nan} NaN, {inf} infinite of "
            f"{tensor.numel()}); the adapter is broken (did its training diverge?): retrain it, e.g. with a lower "
            "learning rate, or restore the file from its source")


def _check_config_numbers(config: dict, where: str) -> None:
    def rank_ok(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    def alpha_ok(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not rank_ok(config.get("r", 8)):
        raise LoraboundError(f"{where}: adapter_config.json has r {config.get('r')!r}; r must be a whole number "
                             f"of at least 1 (the rank of its lora_A / lora_B tensors)")
    if not alpha_ok(config.get("lora_alpha", 8)):
        raise LoraboundError(f"{where}: adapter_config.json has lora_alpha {config.get('lora_alpha')!r}; "
                             "set it to a finite number (the update is scaled by lora_alpha / r)")
    for key, ok, what in (("rank_pattern", rank_ok, "a whole number of at least 1"),
                          ("alpha_pattern", alpha_ok, "a finite number")):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise LoraboundError(f"{where}: adapter_config.json's {key} is not an object; "
                                 f"map module names to values, or remove it")
        for name, value in pattern.items():
            if not ok(value):
                raise LoraboundError(f"{where}: adapter_config.json's {key} gives {name} the value {value!r}; "
                                     f"each value must be {what}")
    alphas = [config.get("lora_alpha", 8), *(config.get("alpha_pattern") or {}).values()]
    if all(alpha == 0 for alpha in alphas):
        raise LoraboundError(f"{where}: adapter_config.json has lora_alpha 0, which scales every LoRA update to "
                             "zero, so the adapter changes nothing; set lora_alpha to the value it was trained with")


def _check_no_trained_biases(config: dict, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Refuse an adapter that trains the base model's biases (bias "lora_only" / "all").

    PEFT writes them into the base layers and keeps them when LoRA is turned off, so neither b = -1 (the base
    model) nor any boundary would be the model it claims to be, and a pruned export could not drop them.
    (lora_B.bias, PEFT's lora_bias, belongs to its LoRA module and is dropped with it.)
    """
    saved = config.get("modules_to_save") or []
    for name in shapes:
        module = name.removeprefix(_PEFT_PREFIX).rpartition(".")[0]
        if _LORA_TENSOR.match(name.removeprefix(_PEFT_PREFIX)) or not name.endswith(".bias"):
            continue
        if any(f".{kept}." in f".{module}." for kept in saved):
            continue  # a modules_to_save copy: the whole module, switched with the adapter
        raise LoraboundError(
            f"{where} trains the base model's biases (bias {json.dumps(config.get('bias'))} in {ADAPTER_CONFIG}; "
            f"e.g. {name}): they stay on when LoRA is turned off, so no boundary can drop them; retrain the "
            'adapter with bias="none" (lorabound train does)')


def _lora_modules(shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Module name (without PEFT's prefix) -> {kind: weight shape}, e.g. {"lora_A": (4, 32), "lora_B": (64, 4)}."""
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        match = _LORA_TENSOR.match(name.removeprefix(_PEFT_PREFIX))
        if match is None:
            continue
        rest = name.removeprefix(_PEFT_PREFIX)[match.end("kind"):]
        if rest in ("", ".weight"):  # lora_B.bias (lora_bias) is checked with lora_B's weight
            modules.setdefault(match["module"], {})[match["kind"]] = shape
    return modules


def _check_module_parts(module: str, parts: dict[str, tuple[int, ...]], config: dict, use_dora: bool,
                        where: str) -> None:
    """Both matrices present, of the config's rank; a DoRA magnitude vector exactly when use_dora is set."""
    pair = next((p for p in _PAIRS if p[0] in parts or p[1] in parts), None)
    if pair is None:
        raise LoraboundError(f"{where} holds a lora_magnitude_vector for {module} but no lora_A / lora_B there; "
                             f"{_FIX_TENSORS}")
    for kind, partner in (pair, pair[::-1]):
        if kind in parts and partner not in parts:
            raise LoraboundError(f"{where} holds {kind} of {module} but not its {partner}; {_FIX_TENSORS}")
    rank_a, rank_b = parts[pair[0]][0], parts[pair[1]][1]  # A is (r, in, ...), B is (out, r, ...)
    expected, source = _configured_rank(config, module)
    for kind, rank in ((pair[0], rank_a), (pair[1], rank_b)):
        if rank != expected:
            raise LoraboundError(
                f"{where}: {kind} of {module} has rank {rank} but adapter_config.json gives it {source} {expected}; "
                f"set {source} to the tensors' rank, or {_FIX_TENSORS}")
    has_magnitude = "lora_magnitude_vector" in parts
    if use_dora and not has_magnitude:
        raise LoraboundError(f"{where}: adapter_config.json sets use_dora but the adapter has no "
                             f"lora_magnitude_vector for {module}; {_FIX_TENSORS}, or set use_dora to false if "
                             "it is a plain LoRA adapter")
    if has_magnitude and not use_dora:
        raise LoraboundError(f"{where} holds a DoRA lora_magnitude_vector for {module} but adapter_config.json "
                             "does not set use_dora, so PEFT would ignore it; set use_dora to true")


def _configured_rank(config: dict, module: str) -> tuple[int, str]:
    """The rank PEFT gives `module`: its rank_pattern entry (matched as PEFT matches it) or r."""
    from peft.utils.other import get_pattern_key

    pattern = config.get("rank_pattern") or {}
    key = get_pattern_key(list(pattern), module)
    if key in pattern:
        return pattern[key], f"rank_pattern[{key!r}]"
    return config.get("r", 8), "r"


def _check_targets(config: dict, modules: dict, where: str) -> None:
    """Every module with tensors must be one PEFT selects from the config (when that is decidable without a model)."""
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    targets = config.get("target_modules")
    if targets is None or targets == "all-linear" or config.get("target_parameters"):
        return  # resolved against the model: check_every_tensor_used covers these after loading
    selection = SimpleNamespace(
        target_modules=set(targets) if isinstance(targets, list) else targets,
        exclude_modules=config.get("exclude_modules"), modules_to_save=config.get("modules_to_save"),
        target_parameters=None, layers_to_transform=config.get("layers_to_transform"),
        layers_pattern=config.get("layers_pattern"))
    for module in modules:
        if not check_target_module_exists(selection, module):
            raise LoraboundError(
                f"{where} holds LoRA tensors for {module}, which its adapter_config.json ({_selection_summary(config)}) "
                "does not select, so PEFT would ignore them; add the module to target_modules (and its layer to "
                f"layers_to_transform), or {_FIX_TENSORS}")


def _check_layers_to_transform(config: dict, modules: dict, where: str, num_layers: int | None) -> None:
    """Each layer layers_to_transform names must exist (when the model is known) and carry tensors."""
    listed = config.get("layers_to_transform")
    if listed is None or listed == []:
        return
    listed = [listed] if isinstance(listed, int) and not isinstance(listed, bool) else listed
    if not isinstance(listed, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in listed):
        raise LoraboundError(f"{where}: adapter_config.json's layers_to_transform {listed!r} is not a list of "
                             "layer indices; list the layers its tensors cover")
    if not isinstance(config.get("target_modules"), list):
        return  # PEFT ignores layers_to_transform for a regex or all-linear target_modules
    if num_layers is not None:
        beyond = [i for i in listed if not 0 <= i < num_layers]
        if beyond:
            raise LoraboundError(f"{where}: adapter_config.json's layers_to_transform names layer {beyond[0]} but "
                                 f"the model has layers 0..{num_layers - 1}; list only the layers its tensors cover")
    covered = {_layer_index(m, config.get("layers_pattern")) for m in modules}
    empty = [i for i in listed if i not in covered]
    if empty:
        raise LoraboundError(f"{where}: adapter_config.json's layers_to_transform names layer {empty[0]} but the "
                             f"adapter has no LoRA tensors there; list only the layers its tensors cover, or "
                             f"{_FIX_TENSORS}")


def _check_layer_count(config: dict, modules: dict, where: str, num_layers: int | None) -> None:
    """Refuse an adapter made for a model with fewer layers (when the model's layer count is known).

    target_modules lists exact module paths (as PEFT writes them for an all-linear target of fewer than 20
    modules) on layers 0..k-1 only, k < the model's, with no layers_to_transform saying that the subset is meant:
    PEFT would load it without a word. (Module-name targets imply every layer: check_every_tensor_used refuses the
    missing layers after loading. More layers: check_adapter_matches names the module the model lacks.)
    """
    stack = layers_path_of_names(list(modules), config.get("layers_pattern")) if num_layers else None
    if not stack:
        return
    layers = sorted({i for module in modules if (i := module_layer_index(module, stack)) is not None})
    if not layers:
        return
    targets = config.get("target_modules")
    exact = isinstance(targets, list) and any(target in modules for target in targets)
    declared = config.get("layers_to_transform") not in (None, [])
    if exact and not declared and layers == list(range(layers[-1] + 1)) and len(layers) < num_layers:
        raise LoraboundError(
            f"{where} lists exact module paths on layers 0..{layers[-1]} only and this model has {num_layers} "
            f"layers: it looks made for a {len(layers)}-layer model; pass the --model it was trained on, or, if it "
            f"targets these layers on purpose, set layers_to_transform to {json.dumps(layers)} in {ADAPTER_CONFIG}")


def _layer_index(module: str, layers_pattern) -> int | None:
    """The layer index PEFT reads from a module name (the first numbered segment, or after layers_pattern)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    regexes = [rf"(?:^|.*?\.){re.escape(p)}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    for regex in regexes:
        match = re.match(regex, module + ".")
        if match:
            return int(match["idx"])
    return None


def _selection_summary(config: dict) -> str:
    parts = [f"target_modules {json.dumps(config.get('target_modules'))}"]
    if config.get("layers_to_transform") not in (None, []):
        parts.append(f"layers_to_transform {json.dumps(config.get('layers_to_transform'))}")
    if config.get("use_dora"):
        parts.append("use_dora")
    return ", ".join(parts)


def _mapped_key(name: str, mapping: dict) -> str:
    """A file's tensor name as PEFT renames it for models with a _checkpoint_conversion_mapping."""
    prefix = _PEFT_PREFIX if name.startswith(_PEFT_PREFIX) else "base_model." if name.startswith("base_model.") else ""
    if not mapping or not prefix:
        return name
    key = name.removeprefix(prefix)
    for pattern, replacement in mapping.items():
        key, count = re.subn(pattern, replacement, key)
        if count:
            break
    return prefix + key


def _and_more(names: list[str]) -> str:
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return f"tensor {names[0]}{more}"


def _num_layers(model) -> int | None:
    try:
        return find_layer_stack(unwrap_model(model)).num_layers
    except LoraboundError:
        return None
