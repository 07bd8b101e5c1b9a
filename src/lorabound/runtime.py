"""How many CPU threads torch uses (--threads).

On a machine shared with other busy processes, torch's default (one thread per core) makes its threads wait
on each other: decoding slowed 20-fold beside one busy process on 2 cores (README, Measurements). The
default here is the cores free when the command starts: usable cores minus the 1-minute load average,
at least 1.
"""

from __future__ import annotations

import os



def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def free_cores(usable: int, load: float) -> int:
    """Cores not busy with other work: usable minus the load, rounded, between 1 and usable."""
    return max(1, min(usable, int(usable - load + 0.5)))


def default_threads() -> int:
    try:
        load = os.getloadavg()[0]
    except OSError:
        return usable_cores()
    return free_cores(usable_cores(), load)


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
