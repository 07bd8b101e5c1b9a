"""Data parallelism on torch.distributed, for `torchrun --nproc-per-node N lorabound ...` (or accelerate launch).

Every rank runs the same command on the same data, so every rank meets the same refusal: rank 0 says it once
(refuse) and every rank exits with status 2; torchrun then still prints its own summary of the failed ranks.
Work items (analysis batches, generation batches) are shared out by one fixed rule: item i goes to rank
i % world_size. Running sums are added up across ranks in float64,
outputs are gathered back into item order, and only rank 0 writes files and prints. Without torchrun (no
WORLD_SIZE in the environment) every helper is a no-op for one process, so the same code serves both.

The process group starts on first use: gloo on CPU, nccl when the model runs on CUDA.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Sequence

from ..errors import LoraboundError

_TIMEOUT_MINUTES = 30
_REFUSAL_WAIT_SECONDS = 60  # how long a rank waits for rank 0 to give the same refusal (LORABOUND_DIST_REFUSAL_WAIT_S)


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
    _stop_watching()
    # Every rank learns where the others run, so that a survivor can name a rank that dies.
    global _peers
    _peers = [None] * world_size()
    dist.all_gather_object(_peers, (socket.gethostname(), os.getpid()))
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stopped_by_launcher)


def stop_quietly_until_started() -> None:
    """Under torchrun, from the command's start until the ranks join: the launcher's SIGTERM (sent once another rank
    has ended: rank 0 with the refusal it printed, or a rank that said why itself) ends this rank with status 2 and
    no word of its own. After start() the SIGTERM names the rank that stopped instead."""
    if world_size() > 1 and threading.current_thread() is threading.main_thread():
        _stopped.clear()
        signal.signal(signal.SIGTERM, _stopped_before_start)
        _watch_for_sigterm()


_stopped = threading.Event()
_watch: list[int] = []  # the write end of the signal wakeup pipe while a watcher thread reads it


def _watch_for_sigterm() -> None:
    """A rank waiting for the others inside init_process_group is in C code, where no Python signal handler runs:
    a thread reads the signals' wakeup pipe and, if the handler has not ended the rank 2 s after a SIGTERM,
    ends it with status 2 itself."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)
    _watch.append(write)

    def watch() -> None:
        while data := os.read(read, 1):
            if data[0] == signal.SIGTERM and _watch:
                time.sleep(2)
                if _watch:
                    sys.stderr.flush()
                    os._exit(2)
        os.close(read)

    threading.Thread(target=watch, name="lorabound-sigterm-watch", daemon=True).start()


def _stop_watching() -> None:
    """The ranks have joined (or the command ends): SIGTERM is the Python handler's alone again."""
    if _watch and threading.current_thread() is threading.main_thread():
        signal.set_wakeup_fd(-1)
        os.close(_watch.pop())  # the watcher reads end-of-file and stops


def _stopped_before_start(signum, frame) -> None:
    _stopped.set()
    raise SystemExit(2)


def stopped_by_launcher() -> bool:
    """Whether the launcher stopped this rank before the ranks joined (the CLI then exits 2 without a word, even if
    a library wrapped the SystemExit into another exception)."""
    return _stopped.is_set()


def refuse(line: str) -> None:
    """Print the refusal `line` (`error: ...`) once under torchrun.

    Rank 0 prints it. Another rank prints nothing and waits for the launcher's SIGTERM, which comes once rank 0 has
    exited with the same refusal; a line naming this rank (a failed collective), or a refusal rank 0 did not share
    (no SIGTERM within LORABOUND_DIST_REFUSAL_WAIT_S seconds), this rank prints itself, naming itself.
    """
    if world_size() == 1 or is_main() or line.startswith(f"error: rank {rank()} of "):
        print(line, file=sys.stderr, flush=True)
        return
    wait = float(os.environ.get("LORABOUND_DIST_REFUSAL_WAIT_S", _REFUSAL_WAIT_SECONDS))
    if not _stopped_within(wait):
        print(f"error: rank {rank()} of {world_size()}: {line.removeprefix('error: ')}", file=sys.stderr, flush=True)


def _stopped_within(seconds: float) -> bool:
    """Wait up to `seconds` for a SIGTERM; True if it came (then this rank just exits)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    stopped = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped.set())
    try:
        return stopped.wait(seconds)
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    _stop_watching()
    if world_size() > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
