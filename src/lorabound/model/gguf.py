"""GGUF files: converted once into a safetensors model folder in the cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from ..errors import LoraboundError, first_line
from ..rules import DEFAULT_MODEL

# Written last into a converted folder; its presence marks a finished conversion.
_CONVERSION_STAMP = "lorabound_conversion.json"


def gguf_cache_key(path: Path) -> str:
    """Names the cache folder of a .gguf file: changes when the file is replaced or rewritten."""
    stat = path.stat()
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _is_converted(folder: Path) -> bool:
    return (folder / _CONVERSION_STAMP).is_file() and (folder / "config.json").is_file()


def convert_gguf_once(gguf_path: Path, target: Path) -> Path:
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
            f"cannot read {gguf_path} as a GGUF language model ({first_line(err, typed=True)}); "
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
