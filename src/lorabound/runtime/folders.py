"""Output folders: those of the resumable commands (run, demo, study) claimed under a lock, resumed when asked the
same settings, refused (or, with --overwrite, replaced) otherwise; those of the one-shot commands locked too
(claim_output). Under torchrun only rank 0 writes, and only rank 0 locks."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

from ..errors import LoraboundError
from . import distributed
from .files import (CLAIM, MARKER, check_folder_path, check_replaceable, empty_folder, folder_contents, folder_in_use,
                    lock_folder, lock_output, output_folder, read_json, waiting_lock, write_json_atomic, write_marker)


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


def claim_shared_folder(out: Path, marker_name: str, asked: dict, overwrite: bool) -> None:
    """claim_folder for a folder that several processes fill at once (the shards of one study).

    Each holds a shared lock until the calling @holds_folder_locks command returns, so shards of the same settings
    run side by side; --overwrite (which empties the folder) needs it alone and is refused while another process
    holds it. The verdict and the markers are written under a short exclusive claim lock, so two processes of
    other settings starting at once cannot both take a new folder.
    """
    check_folder_path(out, "--out")
    try:
        folder_verdict(out, marker_name, asked, overwrite)  # refusals before the lock files are made
    except LoraboundError:
        if not (out / CLAIM).exists():
            raise
        # another process may be claiming the folder right now (its markers half written): judge under the lock
    distributed.barrier()
    if distributed.is_main():
        with waiting_lock(out / CLAIM):
            verdict = folder_verdict(out, marker_name, asked, overwrite)  # again, now that no one else claims
            marker = out / marker_name
            same = marker.is_file() and read_json(marker, "rerun with --overwrite") == json.loads(json.dumps(asked))
            if not same and folder_in_use(out):  # a process of other settings claimed it and has not written yet
                raise LoraboundError(f"--out {out} is in use by a lorabound process of other settings; wait for it "
                                     "to finish, or pass another folder")
            lock_folder(out, shared=verdict != "replace")
            if verdict == "replace":
                empty_folder(out)
            write_marker(out, finished=True)
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
