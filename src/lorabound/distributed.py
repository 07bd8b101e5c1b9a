"""Data parallelism on torch.distributed, for `torchrun --nproc-per-node N lorabound ...` (or accelerate launch).

Every rank runs the same command on the same data. Work items (analysis batches, generation batches) are shared
out by one fixed rule: item i goes to rank i % world_size. Running sums are added up across ranks in float64,
outputs are gathered back into item order, and only rank 0 writes files and prints. Without torchrun (no
WORLD_SIZE in the environment) every helper is a no-op for one process, so the same code serves both.

The process group starts on first use: gloo on CPU, nccl when the model runs on CUDA.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import threading
import time
from typing import Any, Sequence

from .errors import LoraboundError

_TIMEOUT_MINUTES = 30


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on rank 0, the one that writes files and prints (and in a plain single process)."""
    return rank() == 0


def print_progress(progress: bool, message: str) -> None:
    """A progress line, printed once (by rank 0) under torchrun."""
    if progress and is_main():
        print(message, flush=True)


def shard(items: Sequence) -> list:
    """This rank's items: item i goes to rank i % world_size (the same rule on every rank)."""
    return [item for i, item in enumerate(items) if i % world_size() == rank()]


def start(device: str = "cpu") -> None:
    """Join the ranks (once, before the model loads): nccl when the model runs on CUDA, each rank on its own
    GPU (LOCAL_RANK), else gloo. A no-op in a single process."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=float(os.environ.get("LORABOUND_DIST_TIMEOUT_MIN", _TIMEOUT_MINUTES)))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    # Every rank learns where the others run, so that a survivor can name a rank that dies.
    global _peers
    _peers = [None] * world_size()
    dist.all_gather_object(_peers, (socket.gethostname(), os.getpid()))
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stopped_by_launcher)


def _stopped_by_launcher(signum, frame) -> None:
    """torchrun sends SIGTERM to the other ranks as soon as one fails, often before they reach a collective and
    notice: say which rank stopped, in the same one line as a failed collective, instead of dying silently."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise LoraboundError(_failure_line("the command", "SIGTERM from the launcher"))


_peers: list[tuple[str, int]] | None = None  # (host, pid) of every rank, in rank order, once started


def _process_gone(pid: int) -> bool:
    """True when process `pid` has exited (or is a zombie its parent has not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return False


def stopped_ranks() -> list[int] | None:
    """The ranks on this host whose process has gone; None when some rank runs on another host (unknown)."""
    if _peers is None:
        return None
    here = socket.gethostname()
    for _ in range(20):  # a peer's sockets close while it exits: give its exit a moment to finish
        gone = [r for r, (host, pid) in enumerate(_peers) if host == here and r != rank() and _process_gone(pid)]
        if gone:
            break
        time.sleep(0.1)
    if gone or all(host == here for host, _ in _peers):
        return gone
    return None


def _group():
    import torch.distributed as dist

    if not dist.is_initialized():
        start()
    return dist


def _collective(what: str, call):
    """Run one collective; a peer that died turns into a one-line error naming this rank and the fix."""
    try:
        return call()
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise LoraboundError(_failure_line(what, first)) from err


def _failure_line(what: str, cause: str) -> str:
    """One line naming this rank, what failed, the rank that stopped (when it can be told) and the fix."""
    gone = stopped_ranks()
    if gone:
        who = f"rank {gone[0]} stopped" if len(gone) == 1 else f"ranks {', '.join(map(str, gone))} stopped"
        fix = "see why in its output above"
    else:
        who, fix = "another rank stopped", "see torchrun's summary for the failed rank"
    return (f"rank {rank()} of {world_size()}: {what} failed because {who} ({cause}); {fix}, then rerun the same "
            f"command to resume")


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over all ranks, in float64 (every rank gets the result)."""
    if world_size() == 1:
        return list(values)
    import torch

    dist = _group()
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    _collective("adding up the sums", lambda: dist.all_reduce(tensor))
    return tensor.cpu().tolist()


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    dist = _group()
    gathered: list[Any] = [None] * world_size()
    _collective("gathering the outputs", lambda: dist.all_gather_object(gathered, value))
    return gathered


def agree(value: Any, what: str) -> None:
    """Refuse to go on unless every rank holds the same `value` (same command, same data, same checkpoint)."""
    values = gather_objects(value)
    if any(v != values[0] for v in values):
        differing = [r for r, v in enumerate(values) if v != values[0]]
        raise LoraboundError(f"ranks {differing} disagree with rank 0 on {what}; launch every rank with the same "
                             "command, inputs and folder")


def barrier() -> None:
    if world_size() > 1:
        dist = _group()
        _collective("waiting for the other ranks", dist.barrier)


def _device():
    import torch
    import torch.distributed as dist
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def finish() -> None:
    """Close the process group (at the end of a command), so torchrun sees a clean exit."""
    if world_size() > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
