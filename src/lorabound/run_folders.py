"""Output folders: those of the resumable commands (run, demo, study) claimed under a lock, resumed when asked the
same settings, refused (or, with --overwrite, replaced) otherwise; those of the one-shot commands locked too
(claim_output). Under torchrun only rank 0 writes, and only rank 0 locks."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

from . import distributed
from .errors import LoraboundError
from .files import (MARKER, check_folder_path, check_replaceable, empty_folder, folder_contents, lock_folder,
                    lock_output, output_folder, read_json, write_json_atomic, write_marker)


def claim_folder(out: Path, marker_name: str, asked: dict, overwrite: bool) -> None:
    """Lock a run (or demo) folder; resume one of the same settings, refuse one of other settings unless --overwrite.

    The lock is held until the calling @holds_folder_locks command returns: a second process is refused.
    """
    check_folder_path(out, "--out")
    folder_verdict(out, marker_name, asked, overwrite)  # refusals before the lock file is made
    distributed.barrier()  # under torchrun every rank has judged the folder before rank 0 changes it
    if distributed.is_main():
        lock_folder(out)
        if folder_verdict(out, marker_name, asked, overwrite) == "replace":  # again, now that no one else writes
            empty_folder(out)
        write_marker(out, finished=True)  # a run folder is resumed, never cleared unasked
        write_json_atomic(out / marker_name, asked)
    distributed.barrier()


def folder_verdict(out: Path, marker_name: str, asked: dict, overwrite: bool) -> str:
    """"new", "resume" or "replace" (--overwrite); refuses a folder of other settings or contents otherwise."""
    marker = out / marker_name
    # A folder holding only its settings stopped on a bad input before any work: start it afresh.
    if not any(p.name not in (marker.name, MARKER) for p in folder_contents(out)):
        return "new"
    settings = read_json(marker, "rerun with --overwrite to start afresh") if marker.is_file() else None
    if settings == json.loads(json.dumps(asked)):
        return "resume"
    if not overwrite:
        why = "holds a run with other settings" if marker.is_file() else "is not empty"
        raise LoraboundError(f"--out {out} {why}; pass a new folder, the same settings to resume, or --overwrite")
    check_replaceable(out, "--out")
    return "replace"


def claim_output(out, what: str = "--out") -> None:
    """files.lock_output on rank 0 (the only rank that writes); the caller is a @holds_folder_locks command."""
    if distributed.is_main():
        lock_output(out, what)


@contextlib.contextmanager
def rank0_output_folder(out, overwrite: bool) -> Iterator[Path]:
    """files.output_folder on rank 0; under torchrun the other ranks only use the path (rank 0 alone writes)."""
    if distributed.is_main():
        with output_folder(out, overwrite) as folder:
            yield folder
    else:
        yield Path(out)
