"""Cache location and atomic writes: outputs appear whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
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


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write a file through a temporary sibling and a rename, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


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


def existing_path(value) -> Path | None:
    """`value` as a Path if it names an existing file or folder; None for inline text, hub ids, built-in names."""
    if value is None:
        return None
    try:
        path = Path(value)
        return path if path.exists() else None
    except (OSError, ValueError):  # e.g. an inline template longer than a file name may be
        return None


def check_not_input(out: str | Path, inputs, what: str = "--out") -> None:
    """Refuse an output folder that is, holds, or lies inside an input (adapter, data, template, model).

    Inputs are only ever read; paths in `inputs` that do not exist (a hub id, a built-in task) are skipped.
    """
    target = Path(out).resolve()
    for given in inputs:
        if existing_path(given) is None:
            continue
        source = Path(given).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise LoraboundError(f"{what} {out} is, holds or lies inside the input {given}; "
                                 "lorabound never writes into its inputs, choose a new folder outside it")


def fresh_output_dir(path: str | Path, overwrite: bool, what: str = "--out") -> Path:
    """check_output_dir, then with --overwrite empty the folder, so nothing cached there for other inputs is reused."""
    path = check_output_dir(path, overwrite, what)
    if overwrite and path.is_dir():
        for child in path.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    return path


def input_identity(path: str | Path | None) -> dict | str | None:
    """What a rerun must find unchanged to resume: sha256 of small files, size and mtime of large ones."""
    path = existing_path(path)
    if path is None:
        return None
    if path.is_file():
        stat = path.stat()
        return sha256_file(path) if stat.st_size < 64 << 20 else f"{stat.st_size}:{stat.st_mtime_ns}"
    return {str(p.relative_to(path)): input_identity(p) for p in sorted(path.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False, what: str = "output folder") -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    If the body raises (or the process dies), `path` keeps its old state and the temporary
    folder is removed (or, after a kill, left as a hidden `.name.tmp-PID-*` sibling, never at `path`;
    the next atomic_dir for the same `path` removes such leftovers of dead processes).
    An existing `path` is swapped with the new folder in one atomic exchange where Linux offers it.
    """
    path = Path(path)
    _clean_stale_siblings(path)
    path = check_output_dir(path, overwrite, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-"))
    try:
        yield tmp
        if path.exists() and _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old state
        elif path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-{os.getpid()}-"))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists
        return True
    return True


def _clean_stale_siblings(path: Path) -> None:
    """Remove the hidden `.name.tmp-PID-*` / `.name.old-PID-*` folders that killed processes left beside `path`.

    An old state parked in `.name.old-PID-*/x` (a kill between two renames) is first put back at `path`.
    """
    if not path.parent.is_dir() or not path.name:
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-(\d+)-[^/]+")
    for sibling in sorted(path.parent.iterdir()):
        found = pattern.fullmatch(sibling.name)
        if not found or not sibling.is_dir() or _pid_alive(int(found.group(2))):
            continue
        if found.group(1) == "old" and (sibling / "x").exists() and not path.exists():
            os.replace(sibling / "x", path)
        shutil.rmtree(sibling, ignore_errors=True)


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
