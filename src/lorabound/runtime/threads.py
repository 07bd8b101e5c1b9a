"""How the command's process runs: CPU threads (--threads), the hub offline, library warnings held back.

Threads (--threads):

On a machine shared with other busy processes, torch's default (one thread per core) makes its threads wait
on each other: decoding slowed 20-fold beside one busy process on 2 cores (README, Measurements). The
default here is the cores free when the command starts: usable cores minus the cores busy over a 0.2 s
sample of /proc/stat, at least 1. (The 1-minute load average lingers: right after another command ended it
still counted that command, and the next one ran on half the cores.)

The hub: the command sets HF_HUB_OFFLINE=1 unless HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set already, so
a model the cache lacks is refused at once instead of after a minute of the hub client's retries printed on
stderr (`offline_unless_asked`; HF_HUB_OFFLINE=0 lets it download).

Library warnings (`held_library_warnings`): Python warnings and the records of the libraries' loggers are held
while the command runs, shown when it ends, and dropped when it is refused, so that a refusal is one line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
import warnings
from typing import Iterator

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
LIBRARY_LOGGERS = ("transformers", "huggingface_hub", "peft", "accelerate", "torch", "safetensors")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def free_cores(usable: int, load: float) -> int:
    """Cores not busy with other work: usable minus the load, rounded, between 1 and usable."""
    return max(1, min(usable, int(usable - load + 0.5)))


def busy_cores(interval: float = 0.2) -> float | None:
    """How many CPUs other work keeps busy now, from two reads of /proc/stat; None where it cannot be read."""
    def times() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    try:
        total0, idle0 = times()
        time.sleep(interval)
        total1, idle1 = times()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0
    if elapsed <= 0:
        return None
    return (1 - (idle1 - idle0) / elapsed) * (os.cpu_count() or 1)


def default_threads() -> int:
    busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            return usable_cores()
    return free_cores(usable_cores(), busy)


def set_threads(threads: int | None) -> int:
    """Use `threads` torch threads (None: the cores free now). Returns the number set."""
    import torch

    from ..rules import check_arguments

    check_arguments(threads=threads)
    chosen = threads or default_threads()
    torch.set_num_threads(chosen)
    return chosen


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def offline_unless_asked() -> None:
    """HF_HUB_OFFLINE=1 unless the user set an offline variable; call before the hub libraries are imported (they
    read it once), the rest of lorabound reads it at each load."""
    if not any(name in os.environ for name in OFFLINE_VARIABLES):
        os.environ["HF_HUB_OFFLINE"] = "1"


class _Hold(logging.Filter):
    """A handler filter that keeps each record (and its handler) instead of letting the handler write it."""

    def __init__(self, handler: logging.Handler, held: list):
        super().__init__()
        self.handler, self.held = handler, held

    def filter(self, record: logging.LogRecord) -> bool:
        self.held.append((self.handler, record))
        return False


def _library_handlers_ready() -> None:
    """transformers adds its own stderr handler when its logging is first used. The commands import it lazily,
    inside the hold, so the handler is made here first, where the hold can see it (no torch is imported)."""
    if importlib.util.find_spec("transformers") is not None:
        from transformers.utils import logging as transformers_logging

        transformers_logging.get_logger("transformers")


@contextlib.contextmanager
def held_library_warnings(refusals: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Hold library warnings while the body runs; show them after it, unless it raised one of `refusals` (or was
    interrupted): then the refusal's one line is all that is printed."""
    records: list = []
    _library_handlers_ready()
    handlers = {h for name in ("", *LIBRARY_LOGGERS) for h in logging.getLogger(name).handlers}
    handlers |= {logging.lastResort} if logging.lastResort is not None else set()
    holds = [(h, _Hold(h, records)) for h in handlers]
    for handler, hold in holds:
        handler.addFilter(hold)
    shown = True
    try:
        with warnings.catch_warnings(record=True) as caught:
            try:
                yield
            except (*refusals, KeyboardInterrupt):
                shown = False
                raise
    finally:
        for handler, hold in holds:
            handler.removeFilter(hold)
        if shown:
            for w in caught:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
            for handler, record in records:
                handler.handle(record)
