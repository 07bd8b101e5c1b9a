"""The cells of a study, and :func:`study`, the command.

Each cell trains an adapter (or takes a given one), then `pipeline.run` into its own folder, and with ``transfer``
also evaluates the chosen b on another task's test split. Cells run in the grid's fixed order; a rerun skips
finished cells and `run` resumes a cell stage by stage. A cell that raises a LoraboundError (a diverged training,
say) is marked failed with the reason, and the study goes on. Where cells run (this process, or Ray tasks) and which
(--shard I/N) is runtime/executors.py's; each cell runs under its own lock, so shards fill one study folder side by
side. The unsharded call then pools the cells (:mod:`.pooling`) and writes the report (:mod:`.render`).

STUDY_DIR layout:
  study-grid.json             the grid (another grid is refused unless --overwrite)
  cells/ID/adapter/           the trained adapter (absent when the grid gives one)
  cells/ID/run/               pipeline.run's folder (report.json and everything else)
  cells/ID/transfer-TASK/     pipeline.evaluate's folder: the in-domain b on TASK's test split
  cells/ID/cell.json          status (ok / failed and why) and the times measured while the cell ran
  cells/ID/.lorabound.lock    held while a process runs the cell
  study.json / .md / .html, *.png
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from .. import pipeline
from ..errors import LoraboundError
from ..lora.export import ADAPTER_WEIGHTS
from ..options import ModelOptions
from ..runtime import distributed
from ..runtime.executors import ExecutorOptions, Shard, TaskFailure, run_local, run_ray
from ..runtime.files import (LOCK, check_not_input, holds_folder_locks, waiting_lock, write_json_atomic,
                             write_marker)
from ..runtime.folders import claim_shared_folder
from .grid import Cell, Grid, check_grid, load_grid, task_label
from .pooling import build_summary, summarise_cell
from .render import write_study_report

GRID_MARKER = "study-grid.json"


@holds_folder_locks  # the study folder's shared lock, taken in claim_shared_folder
def study(out: str | Path, grid: Grid | str | Path | None = None, *, overwrite: bool = False, retry_failed: bool = False,
          progress: bool = True, shard: str | Shard | None = None, executor: ExecutorOptions | None = None,
          device: str = "cpu") -> dict:
    """Run every cell of `grid` (a Grid, or a TOML file's path) into OUT (resumable), then write study.json,
    study.md and study.html.

    `executor` says where the cells run (this process, or Ray tasks: runtime/executors.py); with `shard` ("I/N") only
    the cells at positions I mod N run and no report is written: the unsharded call over the finished cells pools
    them. Processes (shards) share OUT; each cell runs under its own lock.
    """
    out = Path(out)
    grid = grid if isinstance(grid, Grid) else load_grid(grid)
    shard = shard if isinstance(shard, Shard) else Shard.parse(shard)
    executor = executor or ExecutorOptions()
    if overwrite and not shard.whole:
        raise LoraboundError(f"--overwrite with --shard {shard} would let each shard empty the folder the others "
                             "fill; start the shards without --overwrite (clear the folder once beforehand)")
    executor.check(device)
    ModelOptions(device=device)  # refuses a bad device before any work
    check_grid(grid)
    cells = grid.cells()
    shard.check_fits(len(cells))
    given = [c.given_adapter() for c in cells]
    check_not_input(out, [*grid.models, *grid.tasks, grid.transfer, *given])
    claim_shared_folder(out, GRID_MARKER, grid_record(grid), overwrite)
    started = time.time()
    mine = shard.pick(cells)
    records = _execute(mine, grid, out, executor, device, retry_failed, progress)
    rows = [summarise_cell(record, out / "cells" / cell.id, grid) for cell, record in zip(mine, records)]
    if not shard.whole:
        return {"shard": str(shard), "cells": rows,
                "failed": [{"id": r["id"], "reason": r["reason"]} for r in rows if r["status"] != "ok"]}
    summary = build_summary(grid, rows, seconds=time.time() - started)
    write_study_report(out, summary)
    return summary


def _execute(cells: list[Cell], grid: Grid, out: Path, executor: ExecutorOptions, device: str, retry_failed: bool,
             progress: bool) -> list[dict]:
    """Each cell's record (cell.json), its cells run by the executor; a Ray task that died is a failed cell."""
    work = functools.partial(run_cell, grid=grid, out=out.resolve(), retry_failed=retry_failed, progress=progress,
                             device=device)

    def announce(position: int, cell: Cell) -> None:
        verb = "cell" if executor.executor == "local" else "submitted cell"
        distributed.print_progress(progress, f"=== {verb} {position + 1}/{len(cells)}: {cell.id}")

    if executor.executor == "local":
        return run_local(cells, work, announce)
    records = []
    for cell, result in zip(cells, run_ray(cells, work, executor, device, announce)):
        if isinstance(result, TaskFailure):
            distributed.print_progress(progress, f"cell {cell.id} failed: {result.reason}")
            result = {"cell": _cell_dict(cell), "status": "failed", "reason": result.reason, "seconds": {}}
            write_json_atomic(out / "cells" / cell.id / "cell.json", result)
        records.append(result)
    return records


def run_cell(cell: Cell, *, grid: Grid, out: Path, retry_failed: bool, progress: bool, device: str = "cpu") -> dict:
    """One cell into OUT/cells/ID under that folder's lock, in this process or in a Ray worker: a second process
    reaching the same cell (the unsharded command beside running shards) waits for it, then finds it finished."""
    folder = Path(out) / "cells" / cell.id

    def waiting(holder: str) -> None:
        distributed.print_progress(progress, f"cell {cell.id} is running in another process (pid {holder}); "
                                             "waiting for it")
    if not distributed.is_main():  # under torchrun rank 0 holds the lock for every rank
        distributed.barrier()
        return _run_cell(cell, grid, folder, retry_failed, progress, device)
    with waiting_lock(folder / LOCK, on_wait=waiting):
        distributed.barrier()
        return _run_cell(cell, grid, folder, retry_failed, progress, device)


def grid_record(grid: Grid) -> dict:
    """What the study folder was made for (resuming needs the same); each cell's run checks its own inputs."""
    return {"grid": asdict(grid), "cells": [c.id for c in grid.cells()]}


def adopt_cells(out: str | Path, grid: Grid | str | Path, cells_from: str | Path) -> list[str]:
    """Copy the cell folders of another study folder (a committed study, or one made for a grid that had fewer
    cells) into OUT and make OUT a study folder of `grid`, so that `study(out, grid)` runs only the cells not yet
    finished, then pools them all. Returns the ids copied.

    OUT must be new (or empty), and every copied cell a cell of `grid`: a cell of other settings would be pooled
    as if it were this grid's. The cells' own run folders still check their inputs when a cell is resumed."""
    out, source = Path(out), Path(cells_from) / "cells"
    grid = grid if isinstance(grid, Grid) else load_grid(grid)
    if not source.is_dir():
        raise LoraboundError(f"{cells_from} has no cells/ folder; pass a study folder (e.g. studies/powered-2026-12-02)")
    if out.exists() and any(out.iterdir()):
        raise LoraboundError(f"--out {out} is not empty; adopt cells into a new folder")
    ids = {cell.id for cell in grid.cells()}
    found = sorted(p.name for p in source.iterdir() if p.is_dir())
    stray = [name for name in found if name not in ids]
    if stray:
        raise LoraboundError(f"{source} holds cell {stray[0]}, which is not a cell of this grid; adopt it with the "
                             "grid that made it")
    for name in found:
        shutil.copytree(source / name, out / "cells" / name, ignore=shutil.ignore_patterns(LOCK))
    write_json_atomic(out / GRID_MARKER, grid_record(grid))
    write_marker(out, finished=True)
    return found


def _run_cell(cell: Cell, grid: Grid, folder: Path, retry_failed: bool, progress: bool, device: str = "cpu") -> dict:
    """Train (unless given or done), run, transfer; a LoraboundError marks the cell failed. Returns cell.json."""
    record_file = folder / "cell.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else None
    if record and (record["status"] == "ok" or (record["status"] == "failed" and not retry_failed)):
        distributed.print_progress(progress, f"already {record['status']}: {cell.id}")
        return record
    folder.mkdir(parents=True, exist_ok=True)
    data_options = grid.data_options(cell.task, cell.seed)
    model_options = ModelOptions(model=cell.model, device=device)
    times: dict[str, float] = {}
    try:
        adapter = cell.given_adapter() or folder / "adapter"
        if cell.given_adapter() is None and not (adapter / ADAPTER_WEIGHTS).is_file():
            clock = time.time()
            pipeline.train(cell.model, cell.task, adapter, progress=progress, data_options=data_options,
                           model_options=model_options,
                           settings=cell.training.settings(cell.seed, data_options.max_length))
            times["train"] = time.time() - clock
        _check_training_finite(adapter)
        clock = time.time()
        report = pipeline.run(cell.model, adapter, cell.task, folder / "run", data_options=data_options,
                              model_options=model_options, generation=grid.generation_options(),
                              bootstrap=grid.bootstrap, progress=progress, **_search_kwargs(grid))
        times.update(_run_stage_times(folder / "run", clock, time.time()))
        if grid.transfer and task_label(grid.transfer) != task_label(cell.task):
            clock = time.time()
            _transfer(cell, grid, adapter, report, folder / f"transfer-{task_label(grid.transfer)}", progress)
            times["transfer"] = time.time() - clock
        record = {"cell": _cell_dict(cell), "status": "ok", "reason": None, "adapter": str(adapter), "seconds": times}
    except LoraboundError as error:
        distributed.print_progress(progress, f"cell {cell.id} failed: {error}")
        record = {"cell": _cell_dict(cell), "status": "failed", "reason": str(error), "seconds": times}
    write_json_atomic(record_file, record)
    return record


def _cell_dict(cell: Cell) -> dict:
    return {"id": cell.id, "model": cell.model, "task": cell.task, "training": asdict(cell.training),
            "seed": cell.seed}


def _search_kwargs(grid: Grid) -> dict:
    settings = grid.search_settings()
    return {"criterion": settings.criterion, "tolerance": settings.tolerance, "knee_fraction": settings.knee_fraction}


def _check_training_finite(adapter: Path) -> None:
    """A training whose loss went NaN or infinite diverged: its adapter is not worth analysing."""
    info_file = adapter / "lorabound_train.json"
    if not info_file.is_file():
        return  # a given adapter not trained by lorabound
    losses = json.loads(info_file.read_text()).get("losses") or []
    bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
    if bad is not None:
        raise LoraboundError(f"training diverged: the loss was {losses[bad]} at step {bad + 1}; "
                             "lower the learning rate or check the data")


RUN_STAGE_FILES = (("analysis", "curves.json"), ("search", "search.json"), ("prune", "prune.json"),
                   ("evaluate", "report.json"))


def _run_stage_times(run_dir: Path, started: float, ended: float) -> dict[str, float]:
    """Each stage's time from when its output file appeared (a stage done in an earlier call counts 0).

    "analysis" includes loading the model and data; "evaluate" the report writing after report.json.
    """
    times, previous = {}, started
    for stage, name in RUN_STAGE_FILES:
        path = run_dir / name
        if not path.is_file():
            continue
        stamp = min(max(path.stat().st_mtime, started), ended)
        times[stage] = max(0.0, stamp - previous)
        previous = max(previous, stamp)
    times["evaluate"] = times.get("evaluate", 0.0) + max(0.0, ended - previous)
    return times


def _transfer(cell: Cell, grid: Grid, adapter: Path, report: dict, out: Path, progress: bool) -> dict:
    """The in-domain b, applied on the transfer task's test split (evaluation.json in `out`; reused when there)."""
    b = report["search"]["boundary"]
    marker = {"adapter": str(adapter), "boundary": b, "task": grid.transfer}
    done = out / "evaluation.json"
    if done.is_file() and (out / "transfer.json").is_file() and json.loads((out / "transfer.json").read_text()) == marker:
        return json.loads(done.read_text())
    distributed.print_progress(progress, f"transfer: b = {b} on {grid.transfer} test")
    result = pipeline.evaluate(cell.model, adapter, grid.transfer, boundaries=[b] if b >= 0 else [], out=out,
                               data_options=grid.data_options(grid.transfer, cell.seed),
                               generation=grid.generation_options(), bootstrap=grid.bootstrap, overwrite=True,
                               progress=progress)
    write_json_atomic(out / "transfer.json", marker)
    return result
