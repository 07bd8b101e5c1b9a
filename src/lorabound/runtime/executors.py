"""Where a study's cells run: one after another in this process (`local`), or as tasks on a Ray cluster (`ray`);
and which of them this process runs (`--shard I/N`).

- Shards are round-robin: shard I of N runs the cells whose position in the grid's fixed order (0-based) is
  I mod N. Neighbouring cells differ in seed or training, so each shard gets a mix of short and long cells.
  Shards share the study folder: each cell is run under its own lock, so shards never touch each other's cells,
  and the unsharded command over the finished cells only pools them.
- Ray: every cell is one task with declared resources (CPUs, and GPUs with --device cuda). A worker writes its
  cell into the study folder itself, which therefore lies on a file system every node mounts at the same path;
  the driver collects the cell records and writes the report. A task that dies (its worker crashed, its node was
  lost) comes back as a TaskFailure, which the study records as a failed cell; tasks are not retried (a rerun
  resumes the cell stage by stage).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Callable, Sequence, TypeVar

from ..errors import LoraboundError, first_line
from ..rules import check_arguments
from . import distributed

EXECUTORS = ("local", "ray")
INSTALL_RAY = "pip install 'lorabound[ray]'"

Item = TypeVar("Item")


# ---------------------------------------------------------------------------
# --shard I/N
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0 <= index < count): the items at positions index, index + count, ..."""
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> "Shard":
        if text is None:
            return cls()
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if match is None:
            raise LoraboundError(f"--shard {text!r} is not I/N; pass for example --shard 0/4 (shards 0/4 .. 3/4 "
                                 "together run every cell)")
        index, count = int(match[1]), int(match[2])
        if count < 1 or index >= count:
            raise LoraboundError(f"--shard {text} is out of range; pass I/N with N >= 1 and 0 <= I < N (for example "
                                 f"0/{max(count, 2)} .. {max(count, 2) - 1}/{max(count, 2)})")
        return cls(index, count)

    @property
    def whole(self) -> bool:
        return self.count == 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def pick(self, items: Sequence[Item]) -> list[Item]:
        return [item for position, item in enumerate(items) if position % self.count == self.index]

    def check_fits(self, n_items: int) -> None:
        """Refuse a shard count above the number of cells (shards that would run nothing are a mistake)."""
        if self.count > n_items:
            raise LoraboundError(f"--shard {self} splits a grid of {n_items} cells into {self.count} shards, so some "
                                 f"would run nothing; pass N <= {n_items} (for a SLURM array: --array=0-{n_items - 1})")


# ---------------------------------------------------------------------------
# --executor local|ray
# ---------------------------------------------------------------------------

@dataclass
class ExecutorOptions:
    executor: str = field(default="local", metadata={"help": "local: cells one after another in this process; "
                                                             "ray: each cell a task on a Ray cluster"})
    ray_address: str | None = field(default=None, metadata={
        "help": "the Ray cluster to join (e.g. auto, or ray://head:10001); None: start a local Ray instance"})
    cpus_per_cell: float = field(default=1.0, metadata={"help": "Ray: CPUs each cell's task reserves (also its "
                                                                "torch threads)"})
    gpus_per_cell: float | None = field(default=None, metadata={
        "help": "Ray: GPUs each cell's task reserves; None: 1 with --device cuda, else 0"})

    def __post_init__(self):
        check_arguments(**{f.name: getattr(self, f.name) for f in fields(self)})

    def check(self, device: str) -> None:
        """Refuse what cannot run, before any work: an unknown executor, Ray flags without Ray, Ray not installed."""
        if self.executor not in EXECUTORS:
            raise LoraboundError(f"unknown executor '{self.executor}'; choose one of {', '.join(EXECUTORS)}")
        if self.executor == "local":
            given = [name for name, value, default in (("--ray-address", self.ray_address, None),
                                                       ("--cpus-per-cell", self.cpus_per_cell, 1.0),
                                                       ("--gpus-per-cell", self.gpus_per_cell, None))
                     if value != default]
            if given:
                raise LoraboundError(f"{given[0]} applies to --executor ray only; add --executor ray or drop "
                                     f"{given[0]}")
            return
        if distributed.world_size() > 1:
            raise LoraboundError("--executor ray runs each cell as a Ray task; launch the study without torchrun, "
                                 "or use --executor local")
        if importlib.util.find_spec("ray") is None:
            raise LoraboundError(f"--executor ray needs Ray, which is not installed; {INSTALL_RAY}")
        if self.gpus_per_cell and device != "cuda":
            raise LoraboundError(f"--gpus-per-cell {self.gpus_per_cell:g} reserves GPUs that cells on --device "
                                 f"{device} never use; add --device cuda or drop --gpus-per-cell")

    def gpus(self, device: str) -> float:
        return self.gpus_per_cell if self.gpus_per_cell is not None else (1.0 if device == "cuda" else 0.0)


@dataclass
class TaskFailure:
    """A cell whose task did not return a record (its worker raised or died): `reason` says why, in one line."""
    reason: str


def run_local(items: Sequence[Item], work: Callable[[Item], dict], announce: Callable[[int, Item], None]) -> list[dict]:
    """Each item in turn, in this process (an exception stops the study, as it always has)."""
    results = []
    for position, item in enumerate(items):
        announce(position, item)
        results.append(work(item))
    return results


def run_ray(items: Sequence[Item], work: Callable[[Item], dict], options: ExecutorOptions, device: str,
            announce: Callable[[int, Item], None]) -> list[dict | TaskFailure]:
    """Each item as a Ray task (all submitted at once; Ray runs as many side by side as the resources allow).

    Results come back in the order of `items`; a task that raised or whose worker died is a TaskFailure.
    A Ray instance already started in this process (ray.init) is used as it is; otherwise one is started
    (or joined, with --ray-address) here and shut down at the end.
    """
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=options.ray_address, include_dashboard=False, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise LoraboundError(f"cannot start or reach Ray at {options.ray_address or 'this machine'} "
                                 f"({first_line(err, 300, typed=True)}); check --ray-address (start a cluster with "
                                 "'ray start --head'), or use --executor local") from None
    try:
        gpus = options.gpus(device)
        _check_resources(ray.cluster_resources(), options.cpus_per_cell, gpus)
        task = ray.remote(_in_worker).options(num_cpus=options.cpus_per_cell, num_gpus=gpus, max_retries=0)
        threads = max(1, math.floor(options.cpus_per_cell))
        pending = {}
        for position, item in enumerate(items):
            announce(position, item)
            pending[task.remote(work, item, os.getcwd(), threads)] = position
        results: list = [None] * len(items)
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                position = pending.pop(done[0])
                try:
                    results[position] = ray.get(done[0])
                except ray.exceptions.RayError as err:  # a raising task, a crashed worker, a lost node
                    results[position] = TaskFailure(f"its Ray task failed: {first_line(_cause(err), 300, typed=True)}")
        except BaseException:  # interrupted: stop the cells still running (a rerun resumes them)
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        return results
    finally:
        if started_here:
            ray.shutdown()


def _in_worker(work: Callable, item, cwd: str, threads: int) -> dict:
    """A task's body on a worker: the driver's working folder (relative grid paths mean the same on a shared file
    system) and as many torch threads as CPUs were reserved."""
    from .threads import set_threads

    if os.path.isdir(cwd):
        os.chdir(cwd)
    set_threads(threads)
    return work(item)


def _check_resources(available: dict, cpus: float, gpus: float) -> None:
    """A cell asking for more than the whole cluster has would wait forever: refuse it."""
    for name, need, flag in (("CPU", cpus, "--cpus-per-cell"), ("GPU", gpus, "--gpus-per-cell")):
        have = available.get(name, 0)
        if need > have:
            raise LoraboundError(f"each cell asks for {need:g} {name}(s) ({flag}) but the Ray cluster has {have:g}; "
                                 f"lower {flag}, or add nodes with {name}s to the cluster")


def _cause(err: BaseException) -> BaseException:
    """The task's own exception inside Ray's wrapper, when there is one."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err
