"""Cache location, atomic writes and output folders: outputs appear whole or not at all.

Every output folder lorabound creates holds a marker file, MARKER. `--overwrite` replaces only a folder
holding it (never the working folder, the home folder, a filesystem root or a folder above those), and a
folder whose marker says its command never finished is simply started afresh by the next command, unless it
holds something older than that marker: that was there before lorabound claimed the folder, so it is the
user's, and the folder is refused instead of emptied.

Text files a user may have saved with a byte-order mark (templates, data, grid files, JSON) are read with
TEXT_ENCODING, which drops a leading U+FEFF and reads plain UTF-8 unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import LoraboundError

MARKER = ".lorabound"        # {"written_by": "lorabound", "finished": bool}
LOCK = ".lorabound.lock"     # flock'ed by the process writing an output folder; holds its pid
CLAIM = ".lorabound.claim"   # flock'ed while a process claims a folder that several processes share (a study)
_BOOKKEEPING = (MARKER, LOCK, CLAIM)
CACHE_ENV = "LORABOUND_CACHE"
TEXT_ENCODING = "utf-8-sig"  # UTF-8, with a leading byte-order mark (some editors write one) dropped
# Room kept in an output folder's name for the hidden siblings atomic_dir makes beside it (".NAME.tmp-PID-XXXXXXXX")
SIBLING_ROOM = 32


def cache_root() -> Path:
    """Where lorabound keeps converted models and extracted datasets (LORABOUND_CACHE overrides)."""
    return Path(os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "lorabound"))


def cache_dir() -> Path:
    """cache_root(), created if missing."""
    path = cache_root()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoraboundError(f"cannot create the cache folder {path} ({e.strerror}); "
                             f"set {CACHE_ENV} to a folder you can write to") from None
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


def read_json(path: str | Path, fix: str) -> Any:
    """Parse a JSON file lorabound wrote earlier; a damaged one is refused naming the file and `fix`."""
    try:
        return json.loads(Path(path).read_text(encoding=TEXT_ENCODING))
    except (UnicodeDecodeError, ValueError) as e:
        raise LoraboundError(f"{path} is damaged and cannot be parsed ({e}); {fix}") from None


def read_jsonl(path: str | Path, fix: str) -> list:
    """Parse a JSONL file lorabound wrote earlier (one value a line); a damaged one is refused naming the line."""
    rows = []
    text = Path(path).read_text(encoding=TEXT_ENCODING, errors="replace")
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may be inside a string
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise LoraboundError(f"{path} line {number} is damaged and cannot be parsed ({e}); {fix}") from None
    return rows


# ---------------------------------------------------------------------------
# Output folders: the marker, --overwrite, writability and the lock
# ---------------------------------------------------------------------------

def folder_contents(path: Path) -> list[Path]:
    """What a folder holds besides lorabound's own marker and lock file ([] if it does not exist)."""
    if not path.is_dir():
        return []
    return [p for p in path.iterdir() if p.name not in _BOOKKEEPING]


def write_marker(folder: str | Path, finished: bool) -> None:
    """Mark `folder` as written by lorabound; `finished` once its command completed."""
    write_json_atomic(Path(folder) / MARKER, {"written_by": "lorabound", "finished": finished})


def _marker(folder: Path) -> dict | None:
    try:
        value = json.loads((folder / MARKER).read_text(encoding=TEXT_ENCODING))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) and value.get("written_by") == "lorabound" else None


def _unfinished(folder: Path) -> bool:
    """A folder lorabound started and whose command stopped (refused, crashed or killed) before finishing."""
    marker = _marker(folder)
    return marker is not None and marker.get("finished") is False


def older_than_marker(folder: Path) -> Path | None:
    """The first entry below `folder` last modified before (or as) its marker file was written, or None.

    fresh_output_dir empties a folder before it writes the unfinished marker, so anything older was there before
    lorabound claimed the folder: the user's. The marker's ctime is used, which copying or moving a marker
    file (or setting its times) cannot put in the past.
    """
    claimed = os.lstat(folder / MARKER).st_ctime_ns
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            entry = Path(root) / name
            # <=: the clock that stamps files ticks every few ms, and a file of the same tick may be the user's
            if entry.name not in _BOOKKEEPING and os.lstat(entry).st_mtime_ns <= claimed:
                return entry
    return None


def check_output_dir(path: str | Path, overwrite: bool, what: str = "output folder") -> Path:
    """Refuse an output folder that cannot be written, or that is not empty unless --overwrite may replace it.

    A folder left unfinished by an earlier lorabound command counts as empty: its rerun starts it afresh, unless
    it holds files older than its marker (the user's own, which lorabound never deletes unasked).
    """
    path = check_folder_path(path, what)
    if not folder_contents(path):
        return path
    if not overwrite and _unfinished(path):
        theirs = older_than_marker(path)
        if theirs is None:
            return path
        raise LoraboundError(f"{what} {path} holds {theirs.relative_to(path)}, which an unfinished earlier "
                             f"lorabound command did not write, so it will not be deleted; choose another path, "
                             f"or move your files out (or pass --overwrite to delete them)")
    if not overwrite:
        raise LoraboundError(f"{what} {path} already exists and is not empty; "
                             "choose another path or pass --overwrite")
    check_replaceable(path, what)
    return path


def check_folder_path(path: str | Path, what: str = "output folder") -> Path:
    """Refuse a path that cannot become an output folder: empty, a file, a broken link, unwritable."""
    path = Path(path)
    if str(path) == "":
        raise LoraboundError(f"{what} is empty; pass a folder path")
    check_name_lengths(path, what)
    if path.is_symlink() and not path.exists():
        raise LoraboundError(f"{what} {path} is a symbolic link to the missing {os.readlink(path)}; "
                             "pass an existing folder or a new path")
    if path.exists() and not path.is_dir():
        raise LoraboundError(f"{what} {path} is a file, not a folder; pass a folder path")
    check_writable(path, what)
    return path


def check_name_lengths(path: Path, what: str = "output folder") -> None:
    """Refuse a folder name the filesystem cannot hold (ENAMETOOLONG), naming the flag, before any work.

    The last name keeps SIBLING_ROOM characters spare for the hidden siblings an atomic export makes beside it.
    """
    probe = Path(path.anchor or ".")
    limits = {"name": 255, "path": 4096}
    with contextlib.suppress(OSError, ValueError):
        limits = {"name": os.pathconf(probe, "PC_NAME_MAX"), "path": os.pathconf(probe, "PC_PATH_MAX")}
    shown = str(path) if len(str(path)) <= 80 else str(path)[:60] + "..."
    longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
    last = len(os.fsencode(path.name))
    if longest > limits["name"] or last > limits["name"] - SIBLING_ROOM:
        raise LoraboundError(f"{what} {shown} has a name of {max(longest, last)} bytes, more than the "
                             f"{limits['name'] - SIBLING_ROOM} this filesystem allows lorabound; pass a shorter name")
    if len(os.fsencode(str(path.absolute()))) > limits["path"] - 512:  # room for the files written inside
        raise LoraboundError(f"{what} {shown} is a path of {len(os.fsencode(str(path.absolute())))} bytes, more "
                             f"than the {limits['path'] - 512} this filesystem allows lorabound; pass a shorter path")


def check_replaceable(path: Path, what: str = "output folder") -> None:
    """--overwrite empties only a folder lorabound wrote, and never a folder whose loss would be a disaster."""
    if path.is_symlink():
        raise LoraboundError(f"{what} {path} is a symbolic link to {os.readlink(path)}; --overwrite replaces "
                             "only a real folder: pass the folder it points to, or a new path")
    real = path.resolve()
    for name, place in (("the working folder", Path.cwd()), ("your home folder", Path.home())):
        place = place.resolve()
        if real == place or real in place.parents:
            raise LoraboundError(f"{what} {path} is {name} or holds it; --overwrite never empties it, "
                                 "pass a new folder")
    if real == Path(real.anchor) or os.path.ismount(real):
        raise LoraboundError(f"{what} {path} is the root of a filesystem; --overwrite never empties it, "
                             "pass a new folder")
    if _marker(path) is None:
        raise LoraboundError(f"{what} {path} was not written by lorabound (it has no {MARKER} file), so "
                             "--overwrite will not empty it; pass a new folder, or empty it yourself")


def check_writable(path: Path, what: str = "output folder") -> None:
    """Refuse a folder that cannot be created or written (inside a file, read-only, /proc...) before any work."""
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise LoraboundError(f"{what} {path} lies inside the file {probe}; pass a folder path")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".lorabound-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise LoraboundError(f"{what} {path} cannot be written ({e.strerror} in {probe}); "
                             "pass a folder you can write to") from None


def existing_path(value) -> Path | None:
    """`value` as a Path if it names an existing file or folder; None for inline text, hub ids, built-in names."""
    if value is None or str(value) == "":  # Path("") would be the working folder
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
    """check_output_dir, then an empty folder marked unfinished (mark_finished at the end of the command).

    With --overwrite the old contents go, so nothing cached there for other inputs is reused.
    """
    path = check_output_dir(path, overwrite, what)
    empty_folder(path)
    path.mkdir(parents=True, exist_ok=True)
    write_marker(path, finished=False)
    return path


@contextlib.contextmanager
def output_folder(path: str | Path, overwrite: bool, what: str = "--out") -> Iterator[Path]:
    """fresh_output_dir for the body, marked finished when the body completes.

    If the body refuses its input (LoraboundError), a folder this call created is removed again, so a refusal
    leaves nothing; after a crash the folder stays marked unfinished and the rerun starts it afresh.
    """
    created = not os.path.lexists(path)
    path = fresh_output_dir(path, overwrite, what)
    try:
        yield path
    except LoraboundError:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    write_marker(path, finished=True)


def empty_folder(path: Path) -> None:
    """Remove everything in `path` but its lock file (which another process may be waiting on)."""
    for child in folder_contents(path) + [path / MARKER]:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        elif os.path.lexists(child):
            child.unlink()


_held_locks: contextvars.ContextVar[contextlib.ExitStack] = contextvars.ContextVar("lorabound_held_locks")


def holds_folder_locks(function: Callable) -> Callable:
    """Decorator: the folder locks `lock_folder` takes during `function` are released when it returns or raises."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            token = _held_locks.set(stack)
            try:
                return function(*args, **kwargs)
            finally:
                _held_locks.reset(token)
    return wrapper


def lock_folder(folder: Path, what: str = "--out", shared: bool = False) -> None:
    """Create `folder` and hold its lock until the enclosing @holds_folder_locks function ends.

    flock: the kernel drops the lock when its process dies, so a crashed or killed run never leaves a stale
    lock; the pid in the file only names the holder in the refusal. A `shared` lock admits other shared holders
    (the shards of one study) and refuses, and is refused by, an exclusive one.
    """
    stack = _held_locks.get(None)
    if stack is None:
        raise RuntimeError("lock_folder must be called inside a @holds_folder_locks function")
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise LoraboundError(f"{what} {folder} is in use by another lorabound process (pid {holder}); "
                             "wait for it to finish, or pass another folder") from None
    stack.callback(os.close, fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)


def lock_output(path: str | Path, what: str = "--out") -> None:
    """lock_folder for the output folder of a one-shot command (analyze, search, evaluate, prune, train, speed),
    taken after its input checks and before any work, so that a second process writing there is refused at once.

    What this call made (the folder, or the lock file in an existing folder) goes again when the command refuses
    its input (LoraboundError), or stops before writing anything there (Ctrl-C while the model loads): a refusal
    leaves --out as it found it.
    """
    path = Path(path)
    made = path if not os.path.lexists(path) else path / LOCK if not os.path.lexists(path / LOCK) else None
    lock_folder(path, what)
    if made is not None:  # pushed after the lock's own callback, so it runs first: the lock is still held
        _held_locks.get().push(functools.partial(_remove_unused_output, path, made))


def _remove_unused_output(path: Path, made: Path, error_type, error, traceback) -> bool:
    unused = not folder_contents(path) and not (path / MARKER).exists()
    if error_type is not None and (issubclass(error_type, LoraboundError) or unused):
        if made == path:
            shutil.rmtree(path, ignore_errors=True)
        elif unused:  # an existing folder: only the lock file, and only while nothing else was written
            made.unlink(missing_ok=True)
    return False  # the exception, if any, goes on


def folder_in_use(folder: Path) -> bool:
    """Whether another process holds `folder`'s lock (shared or exclusive)."""
    if not (folder / LOCK).is_file():
        return False
    fd = os.open(folder / LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock


@contextlib.contextmanager
def waiting_lock(path: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """An exclusive flock on the file `path` for the block, waiting for its holder (told to `on_wait` by pid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            if on_wait is not None:
                on_wait(os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


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
    check_name_lengths(path, what)
    _clean_stale_siblings(path)
    path = check_output_dir(path, overwrite, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-"))
    try:
        yield tmp
        write_marker(tmp, finished=True)
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
