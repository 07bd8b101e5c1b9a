"""Cache location and atomic writes: outputs appear whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import LoraboundError


def cache_dir() -> Path:
    """Where lorabound keeps converted models and extracted datasets (LORABOUND_CACHE overrides)."""
    root = os.environ.get("LORABOUND_CACHE") or os.path.join(Path.home(), ".cache", "lorabound")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def check_output_dir(path: str | Path, overwrite: bool, what: str = "output folder") -> Path:
    """Refuse a non-empty output folder unless the user said --overwrite."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LoraboundError(f"{what} {path} is a file, not a folder; pass a folder path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise LoraboundError(f"{what} {path} already exists and is not empty; choose another path or pass --overwrite")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False, what: str = "output folder") -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    If the body raises (or the process dies), `path` keeps its old state and the temporary
    folder is removed (or, after a kill, left as a hidden `.name.tmp-*` sibling, never at `path`).
    """
    path = check_output_dir(path, overwrite, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_hashes(path: str | Path) -> dict[str, str]:
    """sha256 of every file below `path`, keyed by relative path (to prove inputs were not touched)."""
    root = Path(path)
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
