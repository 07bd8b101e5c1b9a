"""How many CPU threads torch uses (--threads).

On a machine shared with other busy processes, torch's default (one thread per core) makes its threads wait
on each other: decoding slowed 20-fold beside one busy process on 2 cores (README, Measurements). The
default here is the cores free when the command starts: usable cores minus the cores busy over a 0.2 s
sample of /proc/stat, at least 1. (The 1-minute load average lingers: right after another command ended it
still counted that command, and the next one ran on half the cores.)
"""

from __future__ import annotations

import os
import time


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

    from .validation import check_arguments

    check_arguments(threads=threads)
    chosen = threads or default_threads()
    torch.set_num_threads(chosen)
    return chosen


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
