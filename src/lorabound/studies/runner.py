"""`study`: does dropping upper-layer LoRA help, across models x tasks x seeds x training settings?

Read top to bottom:

1. the grid: :class:`Grid` (from flags or a TOML file) and :func:`check_grid`, which refuses an unknown model or
   task, bad sizes or settings before any work;
2. the cells: each trains an adapter (or takes a given one), then `pipeline.run` into its own folder, and with
   ``transfer`` also evaluates the chosen b on another task's test split. Cells run in the grid's fixed order;
   a rerun skips finished cells and `run` resumes a cell stage by stage. A cell that raises a LoraboundError
   (a diverged training, say) is marked failed with the reason, and the study goes on. Where cells run (this
   process, or Ray tasks) and which (--shard I/N) is runtime/executors.py's; each cell runs under its own lock, so
   shards fill one study folder side by side;
3. the summaries: per cell, read from its report.json; pooled across cells, the mean difference of pruned vs
   full with a bootstrap interval over cells, and Holm-corrected per-cell significance counts;
4. the report: study.json, study.md and a self-contained study.html with the plots embedded.

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
import itertools
import json
import math
import re
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from . import pipeline
from .errors import LoraboundError
from .formatting import slug
from .generation.cache import BASE, FULL
from .generation.engines import check_engine_installed
from .lora.surgery import ADAPTER_WEIGHTS
from .metrics.scores import METRIC_LABELS, format_p, paired_test
from .model import DEFAULT_MODEL, model_num_layers
from .options import DataOptions, GenerationOptions, ModelOptions, TrainSettings
from .rules import check_settings
from .runtime import distributed
from .runtime.executors import ExecutorOptions, Shard, TaskFailure, run_local, run_ray
from .runtime.files import (LOCK, TEXT_ENCODING, check_not_input, holds_folder_locks, waiting_lock, write_bytes_atomic,
                            write_json_atomic, write_text_atomic)
from .runtime.folders import claim_shared_folder
from .decision.boundary import COMBINED, DEFAULT_MARGIN, SearchSettings, pick_for_goal
from .metrics.stats import power, t_quantile
from .results import CellComparison, CellRow, Pooled, StudySummary

METRICS = ("bleu", "rougeL", "chrf")
# sacrebleu gives no public per-example chrF statistics, so the paired bootstrap (and the pooled test) covers
# BLEU and ROUGE-L; chrF is shown as a score.
TESTED = ("bleu", "rougeL")
PAPER = {"params_dropped": 0.286, "bleu": 1.4, "rougeL": 0.9}  # arXiv 2503.23360, averages over its grid
LEVEL = 0.05
MIN_TEST_SETS = 3  # a pooled interval needs at least this many independent test sets
CELL_BOOTSTRAP = 10_000  # resamples of the bootstrap over cells
GRID_MARKER = "study-grid.json"


# ---------------------------------------------------------------------------
# 1. The grid
# ---------------------------------------------------------------------------

@dataclass
class Training:
    name: str = field(metadata={"help": "label of this setting in folder names and reports (e.g. short, long)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training split"})
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: 2 x rank, the scale of r=16, "
                                                                "alpha=32)"})
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW peak learning rate"})
    batch_size: int = field(default=8, metadata={"help": "pairs per optimiser step"})
    early_stopping: int = field(default=0, metadata={"help": "train --early-stopping: evaluations without a lower "
                                                             "validation loss before stopping (0: off)"})
    eval_every: int | None = field(default=None, metadata={"help": "train --eval-every (default: once an epoch)"})
    adapter: str | None = field(default=None, metadata={
        "help": "use this adapter instead of training: a folder, with {model}, {task} and {seed} filled in"})

    def settings(self, seed: int, max_length: int) -> TrainSettings:
        return TrainSettings(rank=self.rank, alpha=self.alpha if self.alpha is not None else 2.0 * self.rank,
                             epochs=self.epochs, learning_rate=self.learning_rate, batch_size=self.batch_size,
                             early_stopping=self.early_stopping, eval_every=self.eval_every, seed=seed,
                             max_length=max_length)


@dataclass
class Grid:
    models: list[str] = field(default_factory=lambda: [DEFAULT_MODEL], metadata={"help": "model specs"})
    tasks: list[str] = field(default_factory=lambda: ["e2e"], metadata={"help": "built-in tasks or .jsonl/.csv files"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "seeds (split, training, bootstrap)"})
    training: list[Training] = field(default_factory=lambda: [Training("e1-r16")],
                                     metadata={"help": "training settings"})
    data: dict = field(default_factory=dict, metadata={
        "help": "DataOptions values for every task (train_size, validation_size, test_size, max_length, ...); "
                "a sub-table named after a task overrides them for that task"})
    generation: dict = field(default_factory=dict, metadata={"help": "GenerationOptions values"})
    search: dict = field(default_factory=dict, metadata={"help": "criterion, tolerance, knee_fraction"})
    bootstrap: int = field(default=1000, metadata={"help": "paired bootstrap resamples per test"})
    transfer: str | None = field(default=None, metadata={
        "help": "also apply each cell's b to this task's test split (domain shift)"})

    def cells(self) -> list["Cell"]:
        """Every cell, in the fixed order models > tasks > training settings > seeds."""
        return [Cell(m, t, tr, s) for m, t, tr, s in itertools.product(self.models, self.tasks, self.training,
                                                                        self.seeds)]

    def data_options(self, task: str, seed: int) -> DataOptions:
        shared = {k: v for k, v in self.data.items() if not isinstance(v, dict)}
        own = self.data.get(task_label(task), {}) if isinstance(self.data.get(task_label(task)), dict) else {}
        return DataOptions(**{**shared, **own, "data": task, "seed": seed})

    def generation_options(self) -> GenerationOptions:
        return GenerationOptions(**self.generation)

    def search_settings(self) -> SearchSettings:
        return SearchSettings(**self.search)


@dataclass(frozen=True)
class Cell:
    model: str
    task: str
    training: Training
    seed: int

    @property
    def id(self) -> str:
        return f"{model_label(self.model)}-{task_label(self.task)}-{self.training.name}-s{self.seed}"

    def given_adapter(self) -> Path | None:
        pattern = self.training.adapter
        if pattern is None:
            return None
        return Path(pattern.replace("{model}", model_label(self.model)).replace("{task}", task_label(self.task))
                    .replace("{seed}", str(self.seed)))


def model_label(spec: str) -> str:
    """A short name for folders and tables: the alias, or the folder / file name."""
    return slug(Path(spec).stem if Path(spec).suffix == ".gguf" else Path(spec).name)


def task_label(spec: str) -> str:
    return slug(Path(spec).stem)


GRID_KEYS = {f.name for f in fields(Grid)} | {"epochs", "ranks"}
TRAINING_KEYS = {f.name for f in fields(Training)}
DATA_KEYS = {f.name for f in fields(DataOptions)} - {"data", "seed"}
GENERATION_KEYS = {f.name for f in fields(GenerationOptions)}
SEARCH_KEYS = {"criterion", "tolerance", "knee_fraction"}


def _refuse_unknown(given: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise LoraboundError(f"unknown key {unknown[0]!r} in {where}; use {', '.join(sorted(known))}")


def _check_types(table: dict, cls, where: str) -> None:
    """Each value has its dataclass field's type (a whole number where an int is meant, text where a str is)."""
    kinds = {f.name: str(f.type) for f in fields(cls)}
    for key, value in table.items():
        kind = kinds.get(key, "")
        if value is None and "None" in kind:
            continue
        if kind.startswith("bool"):
            ok = isinstance(value, bool)
        elif kind.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind.startswith("float"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind.startswith("str"):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise LoraboundError(f"{key} = {value!r} in {where} must be {kind.replace(' | None', '')}; fix its type")


def _list_of(value, kind, name: str) -> list:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise LoraboundError(f"{name} must be a non-empty list of {kind.__name__ if isinstance(kind, type) else 'numbers'}"
                             f", got {value!r}; for example {name} = {[1] if kind is not str else ['e2e']}")
    if len(set(map(str, values))) != len(values):
        raise LoraboundError(f"{name} lists a value twice ({value!r}); list each once")
    return values


def read_grid_file(path: str | Path) -> dict:
    """The grid file's values (TOML), unchecked: :func:`grid_from_dict` checks them."""
    path = Path(path)
    if not path.is_file():
        raise LoraboundError(f"grid file {path} does not exist; pass a .toml file (see studies/paper.toml)")
    try:
        return tomllib.loads(path.read_text(encoding=TEXT_ENCODING))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise LoraboundError(f"cannot parse grid file {path}: {err}; fix it (TOML syntax)") from None


def grid_from_dict(values: dict) -> Grid:
    """Check every key and type; training settings come as [[training]] tables or as epochs x ranks lists."""
    _refuse_unknown(values, GRID_KEYS, "the grid")
    given = dict(values)
    if "training" in given and ({"epochs", "ranks"} & set(given)):
        raise LoraboundError("the grid gives both [[training]] tables and epochs/ranks lists; use one of them")
    epochs = _list_of(given.pop("epochs", [1.0]), (int, float), "epochs")
    ranks = _list_of(given.pop("ranks", [16]), int, "ranks")
    for key, items in (("epochs", epochs), ("ranks", ranks)):  # named as given, before they become [[training]]
        for value in items:
            check_settings({key: value}, "the grid", GRID_RULES)
    if "training" in given:
        tables = given["training"] if isinstance(given["training"], list) else [given["training"]]
        training = []
        for table in tables:
            if not isinstance(table, dict) or "name" not in table:
                raise LoraboundError("each [[training]] table needs a name; for example name = \"short\"")
            _refuse_unknown(table, TRAINING_KEYS, f"[[training]] {table.get('name')!r}")
            _check_types(table, Training, f"[[training]] {table.get('name')!r}")
            training.append(Training(**table))
    else:
        training = [Training(f"e{e:g}-r{r}", epochs=float(e), rank=r) for e, r in itertools.product(epochs, ranks)]
    names = [t.name for t in training]
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(name)):
            raise LoraboundError(f"training name {name!r} must be letters, digits, '_', '.' or '-'; rename it")
    if len(set(names)) != len(names):
        raise LoraboundError(f"training names repeat ({', '.join(names)}); give each [[training]] its own name")
    given["training"] = training
    for key, kind in (("models", str), ("tasks", str), ("seeds", int)):
        if key in given:
            given[key] = _list_of(given[key], kind, key)
    for key, known in (("data", DATA_KEYS), ("generation", GENERATION_KEYS), ("search", SEARCH_KEYS)):
        table = given.get(key, {})
        if not isinstance(table, dict):
            raise LoraboundError(f"{key} must be a table of settings, got {table!r}; for example [{key}]")
        for name, value in table.items():
            if key == "data" and isinstance(value, dict):  # per-task overrides
                _refuse_unknown(value, DATA_KEYS, f"[data.{name}]")
                _check_types(value, DataOptions, f"[data.{name}]")
            else:
                _refuse_unknown({name: value}, known, f"[{key}]")
                _check_types({name: value}, {"data": DataOptions, "generation": GenerationOptions,
                                             "search": SearchSettings}[key], f"[{key}]")
    grid = Grid(**given)
    if grid.transfer is not None and not isinstance(grid.transfer, str):
        raise LoraboundError(f"transfer must be a task name or file, got {grid.transfer!r}; for example webnlg")
    check_grid_values(grid)
    return grid


# The grid's keys that follow another name's rule in rules.py (a list key, the rule of one item)
GRID_RULES = {"models": "model", "tasks": "data", "seeds": "seed", "transfer": "data", "ranks": "rank"}


def check_grid_values(grid: Grid) -> None:
    """Every value of the grid against the rule of its flag in rules.py (ranges, NaN, the engine)."""
    where = "the grid"
    for key in ("models", "tasks", "seeds"):
        for value in getattr(grid, key):
            check_settings({key: value}, where, GRID_RULES)
    check_settings({"bootstrap": grid.bootstrap}, where)
    if grid.transfer is not None:
        check_settings({"transfer": grid.transfer}, where, GRID_RULES)
    for training in grid.training:
        given = {k: v for k, v in asdict(training).items() if v is not None}  # None: the default (alpha)
        check_settings(given, f"[[training]] {training.name!r}")
    for name, value in grid.data.items():
        if isinstance(value, dict):
            check_settings(value, f"[data.{name}]")
        else:
            check_settings({name: value}, "[data]")
    check_settings(grid.generation, "[generation]")
    check_settings(grid.search, "[search]")
    engine = grid.generation.get("engine", "hf")
    check_engine_installed(engine, f"engine = {engine!r} in [generation]")


def load_grid(path: str | Path | None = None, **given) -> Grid:
    """The grid of a TOML file (or the defaults), with the values in `given` that are not None on top.

    `given` takes the top-level keys (models, tasks, seeds, epochs, ranks, transfer, bootstrap), DataOptions
    fields (train_size, ...), GenerationOptions fields (max_new_tokens, ...) and search keys (criterion, ...).
    epochs or ranks replace the file's [[training]] tables.
    """
    values = read_grid_file(path) if path is not None else {}
    given = {k: v for k, v in given.items() if v is not None}
    if {"epochs", "ranks"} & set(given):
        values.pop("training", None)
    for key, value in given.items():
        table = "data" if key in DATA_KEYS else "generation" if key in GENERATION_KEYS else \
            "search" if key in SEARCH_KEYS else None
        if table is None:
            values[key] = value
        else:
            values.setdefault(table, {})
            if not isinstance(values[table], dict):
                raise LoraboundError(f"{table} in the grid file must be a table; for example [{table}]")
            values[table][key] = value
    return grid_from_dict(values)


def check_grid(grid: Grid) -> dict[str, int]:
    """Refuse anything that would fail later, before any work: models, tasks and their splits, settings.

    Returns each model's layer count (read from its config; the embedded GGUF is converted once, into the cache).
    """
    for task in grid.data:
        if isinstance(grid.data[task], dict) and task not in {task_label(t) for t in grid.tasks + [grid.transfer or ""]}:
            raise LoraboundError(f"[data.{task}] names no task of the grid ({', '.join(grid.tasks)}); "
                                 "name a sub-table after a task")
    layers = {model: model_num_layers(model) for model in grid.models}  # an unknown model is refused here
    grid.generation_options(), grid.search_settings()
    tasks = grid.tasks + ([grid.transfer] if grid.transfer else [])
    for task, seed in itertools.product(tasks, grid.seeds):
        options = grid.data_options(task, seed)
        _, splits = options.load()  # an unknown task, a bad file or sizes that do not fit are refused here
        for name in ("validation", "test") if task in grid.tasks else ("test",):
            pipeline.require_nonempty(getattr(splits, name), name)
    ids = [cell.id for cell in grid.cells()]
    if len(set(ids)) != len(ids):
        raise LoraboundError(f"two cells would share the folder {next(i for i in ids if ids.count(i) > 1)} (models or "
                             "tasks with the same name); give the model folders or task files distinct names")
    for cell in grid.cells():
        cell.training.settings(cell.seed, grid.data_options(cell.task, cell.seed).max_length)
        given = cell.given_adapter()
        if given is not None and not (given / "adapter_config.json").is_file():
            raise LoraboundError(f"cell {cell.id}: adapter folder {given} does not exist or has no "
                                 "adapter_config.json; fix the [[training]] adapter pattern")
    return layers


# ---------------------------------------------------------------------------
# 2. The cells
# ---------------------------------------------------------------------------

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
    claim_shared_folder(out, GRID_MARKER, _grid_record(grid), overwrite)
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


def _grid_record(grid: Grid) -> dict:
    """What the study folder was made for (resuming needs the same); each cell's run checks its own inputs."""
    return {"grid": asdict(grid), "cells": [c.id for c in grid.cells()]}


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


# ---------------------------------------------------------------------------
# 3. Summaries: per cell, and pooled across cells
# ---------------------------------------------------------------------------

def _pruned_row(variants: list[dict], b: int | None, top: int) -> dict | None:
    """The variant the chosen b stands for: the full adapter at or above the top LoRA layer, else b's own row."""
    by_name = {v.get("name"): v for v in variants}
    if b is None or b >= top:
        return by_name.get(FULL)
    if b < 0:
        return by_name.get(BASE)
    return next((v for v in variants if v.get("boundary") == b and v.get("name") not in (FULL, BASE)), None)


def compare_with_full(result: dict, folder: Path, b: int | None, top: int, bootstrap: int, seed: int) -> CellComparison | None:
    """Base / full / pruned test metrics and, per metric, pruned minus full with its paired-bootstrap test.

    `result` is a report.json or evaluation.json. A test the report lacks (e.g. chrF) is computed from the saved
    hypotheses with the same bootstrap; when b keeps every LoRA layer, pruned is the full adapter (difference 0).
    b None: the search chose a selection that is no prefix (per-module, greedy-drop), compared on test apart from
    the table (the report's selection_test); a result without that comparison has none.
    """
    variants = result.get("variants") or []
    if b is None:
        return _compare_selection_with_full(result, top) if result.get("selection_test") else None
    full, base, pruned = _pruned_row(variants, None, top), _pruned_row(variants, -1, top), _pruned_row(variants, b, top)
    if full is None or pruned is None:
        return None
    total = full.get("lora_params") or result.get("lora_params_total") or 0
    row = {"boundary": b, "pruned_name": pruned.get("name"),
           "share_dropped": 1 - (pruned.get("lora_params") or 0) / total if total else None,
           "metrics": {name: (v or {}).get("metrics", {}) for name, v in (("base", base), ("full", full),
                                                                            ("pruned", pruned))},
           "tests": {}}
    tests = {(s.get("a"), s.get("b"), s.get("metric")): s for s in result.get("significance") or []}
    for metric in TESTED:
        if pruned is full:
            value = full.get("metrics", {}).get(metric)
            row["tests"][metric] = {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0,
                                    "a_score": value, "b_score": value, "source": "nothing dropped"}
            continue
        test = tests.get((pruned["name"], FULL, metric))
        source = "report"
        if test is None:
            test = _bootstrap_from_files(folder, pruned, full, metric, bootstrap, seed)
            source = "computed from the saved hypotheses"
        if test is not None:
            row["tests"][metric] = {"diff": test["a_score"] - test["b_score"], "ci_low": test["ci_low"],
                                    "ci_high": test["ci_high"], "p_value": test["p_value"], "mdd": test.get("mdd"),
                                    "a_score": test["a_score"], "b_score": test["b_score"], "source": source}
    return row


def _compare_selection_with_full(report: dict, top: int) -> dict | None:
    """compare_with_full for a chosen selection: its test scores and paired bootstraps against the full adapter,
    from the report's selection_test; "nothing dropped" only when the selection keeps every LoRA module."""
    variants = report.get("variants") or []
    full, base = _pruned_row(variants, None, top), _pruned_row(variants, -1, top)
    on_test, search = report["selection_test"], report.get("search") or {}
    if full is None:
        return None
    kept = search.get("kept_fraction")
    row = {"boundary": None, "selection": on_test.get("describe"), "pruned_name": on_test.get("describe"),
           "share_dropped": 1 - kept if kept is not None else None,
           "metrics": {"base": (base or {}).get("metrics", {}), "full": full.get("metrics", {}),
                       "pruned": on_test.get("metrics", {})},
           "tests": {}}
    against_full = (on_test.get("against") or {}).get("full adapter")
    for metric in TESTED:
        if against_full is None:  # selection_on_test leaves out the full adapter only when it is the selection
            value = full.get("metrics", {}).get(metric)
            row["tests"][metric] = {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0,
                                    "a_score": value, "b_score": value, "source": "nothing dropped"}
        elif metric in against_full:
            test = against_full[metric]
            row["tests"][metric] = {"diff": test["a_score"] - test["b_score"], "ci_low": test["ci_low"],
                                    "ci_high": test["ci_high"], "p_value": test["p_value"],
                                    "a_score": test["a_score"], "b_score": test["b_score"], "source": "report"}
    return row


def _bootstrap_from_files(folder: Path, pruned: dict, full: dict, metric: str, bootstrap: int, seed: int):
    files = [folder / (v.get("hypotheses_file") or "") for v in (pruned, full)]
    if not all(f.is_file() for f in files):
        return None
    rows = [[json.loads(line) for line in f.read_text().splitlines()] for f in files]
    references = [r["references"] for r in rows[1]]
    return paired_test([r["output"] for r in rows[0]], [r["output"] for r in rows[1]], references,
                            metric=metric, n_resamples=bootstrap, seed=seed)


def summarise_cell(record: dict, cell_dir: Path, grid: Grid) -> CellRow:
    """The study's row for one cell, read from its folder (report.json, the adapter's training record)."""
    row = {**record["cell"], "status": record["status"], "reason": record.get("reason"),
           "seconds": record.get("seconds", {})}
    if record["status"] != "ok":
        return row
    report = json.loads((cell_dir / "run" / "report.json").read_text())
    curves = report.get("curves") or {}
    layers = (curves.get("meta") or {}).get("adapter_layers") or []
    num_layers = (report.get("meta") or {}).get("num_layers") or (curves.get("meta") or {}).get("num_layers")
    top = max(layers) if layers else num_layers - 1
    b = (report.get("search") or {}).get("boundary")
    seed = record["cell"]["seed"]
    row.update({"num_layers": num_layers, "boundary": b, "criterion": (report.get("search") or {}).get("criterion"),
                "truncation": {k: (curves.get("truncation") or {}).get(k) for k in ("boundary", "mean_prob")},
                "in_domain": compare_with_full(report, cell_dir / "run", b, top, grid.bootstrap, seed)})
    test_set = f"{record['cell']['task']}|seed {seed}"  # cells of one task and seed share their test examples
    if row["in_domain"] is not None:
        row["in_domain"]["test_set"] = test_set
    row["test_curve"] = curve_on_test(report, top)
    row["rules"] = {}
    for rule, chosen in rule_decisions(report.get("search") or {}).items():
        compared = None if chosen is None else compare_with_full(report, cell_dir / "run", chosen, top, grid.bootstrap,
                                                                 seed)
        row["rules"][rule] = None if compared is None else {**compared, "test_set": test_set}
    train_file = Path(record.get("adapter") or cell_dir / "adapter") / "lorabound_train.json"
    if train_file.is_file():
        info = json.loads(train_file.read_text())
        row["training_run"] = {k: info.get(k) for k in ("steps", "train_pairs", "train_loss_first", "train_loss_last",
                                                         "validation_loss_before", "validation_loss_after")}
    transfer_dir = cell_dir / f"transfer-{task_label(grid.transfer)}" if grid.transfer else None
    if transfer_dir is not None and (transfer_dir / "evaluation.json").is_file():
        evaluation = json.loads((transfer_dir / "evaluation.json").read_text())
        row["transfer"] = {"task": grid.transfer,
                           **(compare_with_full(evaluation, transfer_dir, b, top, grid.bootstrap, seed) or {})}
    return row


def curve_on_test(report: dict, top: int) -> list[dict]:
    """The cell's test-side curve: every pruned boundary the report evaluated on test (each validation
    candidate, the chosen b and its comparisons), with the share of LoRA parameters it keeps and, per metric,
    its test difference from the full adapter and that difference's 95% interval."""
    variants = report.get("variants") or []
    full = _pruned_row(variants, None, top)
    total = (full or {}).get("lora_params") or report.get("lora_params_total")
    tests = {(s.get("a"), s.get("metric")): s for s in report.get("significance") or [] if s.get("b") == FULL}
    points = []
    for v in variants:
        b = v.get("boundary")
        if b is None or b < 0 or b >= top or v.get("name") in (FULL, BASE) or not total:
            continue
        found = {m: tests[(v["name"], m)] for m in TESTED if (v["name"], m) in tests}
        if found:
            points.append({"boundary": b, "share_kept": (v.get("lora_params") or 0) / total,
                           # reports before the power fields carry no "diff": the corpus scores' difference
                           "diff": {m: t["diff"] if "diff" in t else t["a_score"] - t["b_score"] for m, t in found.items()},
                           "ci": {m: [t["ci_low"], t["ci_high"]] for m, t in found.items()}})
    return sorted(points, key=lambda point: point["boundary"])


CURVE_BINS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))  # share of the adapter's LoRA parameters kept


def pool_curve_on_test(rows: list[dict]) -> list[dict]:
    """The test-side curves of all cells, pooled by share of LoRA kept: in each bin, each cell's mean
    difference over its boundaries there, then the mean over cells with its interval over independent test sets.

    It answers "does any depth of dropping beat the full adapter on held-out data?" without any selection
    rule: every boundary a cell evaluated counts, chosen or not."""
    pooled = []
    for low, high in CURVE_BINS:
        cells = [(r, [p for p in r.get("test_curve") or [] if low <= p["share_kept"] < high]) for r in rows]
        cells = [(r, points) for r, points in cells if points]
        entry = {"share_kept": [low, high], "cells": len(cells),
                 "boundaries": sorted({p["boundary"] for _, points in cells for p in points})}
        for metric in TESTED:
            values = [float(np.mean([p["diff"][metric] for p in points if metric in p["diff"]]))
                      for _, points in cells if any(metric in p["diff"] for p in points)]
            groups = [f"{r['task']}|seed {r['seed']}" for r, points in cells if any(metric in p["diff"] for p in points)]
            entry[metric] = pooled_interval(values, groups, None) if values else None
        pooled.append(entry)
    return pooled


RULES = {
    "plain": "the paper's plain search: the highest validation BLEU among the candidates (ties to the smaller b)",
    "quality": "auto --goal quality: a validation gain beyond noise (sign-flip test, Bonferroni), else every layer",
    "size": f"auto --goal size: the smallest b shown non-inferior within {DEFAULT_MARGIN:g} point (fixed sequence)",
}


def rule_decisions(search: dict) -> dict[str, int | None]:
    """The b each of the three rules picks from one search's validation candidates (None: not computable, e.g.
    a report written before the candidates carried their tests' spread, or a search without candidates).

    All three read the same generated validation outputs, so a cell compares rules, not luck of generation."""
    rows = {c["boundary"]: c for c in search.get("candidates") or [] if c.get("boundary") is not None
            and c.get(COMBINED) is not None}
    full = [b for b, c in rows.items() if c.get("vs_full") is None]
    usable = len(full) == 1 and len(rows) > 1 and all(
        "se" in c["vs_full"][COMBINED] for c in rows.values() if c.get("vs_full"))
    if not usable:
        return {rule: None for rule in RULES}
    best = max(c["bleu"] for c in rows.values())
    scored = {b: dict(c) for b, c in rows.items()}
    return {"plain": min(b for b, c in rows.items() if c["bleu"] == best),
            "quality": pick_for_goal(scored, "quality", 0.0, full[0])[0],
            "size": pick_for_goal(scored, "size", DEFAULT_MARGIN, full[0])[0]}


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (family-wise error control)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def bootstrap_mean(values: list[float], groups: list[str] | None = None, *, resamples: int = CELL_BOOTSTRAP,
                   seed: int = 0) -> tuple[float, float, float, float]:
    """Mean of `values`, its 95% interval and standard error, from a bootstrap over independent units.

    With `groups`, whole groups are resampled (a cluster bootstrap): cells that share a test set are not
    independent evidence, so the interval counts test sets, not cells. With k units the bootstrap's SD is
    scaled by sqrt(k / (k - 1)) and the interval is mean +- t(k - 1) x that: a percentile interval over a few
    test sets is too narrow (at 4 it covers the true mean about 80% of the time, not 95%)."""
    data = np.asarray(values, dtype=float)
    labels = list(range(len(data))) if groups is None else groups
    clusters = [np.flatnonzero([g == label for g in labels]) for label in dict.fromkeys(labels)]
    k = len(clusters)
    if k < 2:
        return float(data.mean()), float(data.mean()), float(data.mean()), 0.0
    sums = np.array([data[c].sum() for c in clusters])
    sizes = np.array([len(c) for c in clusters], dtype=float)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, k, size=(resamples, k))
    means = sums[draw].sum(axis=1) / sizes[draw].sum(axis=1)
    se = float(means.std()) * math.sqrt(k / (k - 1))
    half = t_quantile(k) * se
    return float(data.mean()), float(data.mean() - half), float(data.mean() + half), se


def pooled_interval(values: list[float], groups: list[str], effect: float | None) -> dict:
    """The pooled mean of per-cell differences with its interval over independent test sets, what it could
    detect (80% power, t with k - 1 degrees of freedom), and the paper's claim judged by it. Below
    MIN_TEST_SETS test sets no interval is given: a bootstrap over one or two units has no width to speak of."""
    mean, low, high, se = bootstrap_mean(values, groups)
    independent = len(set(groups))
    if independent < MIN_TEST_SETS:
        return {"n": len(values), "test_sets": independent, "mean_diff": mean, "ci_low": None, "ci_high": None,
                "se": None, "mdd": None,
                "claim": None if effect is None else (f"not judged: {independent} independent test set(s), fewer "
                                                      f"than {MIN_TEST_SETS}; see each cell's own interval")}
    detect = power(se * math.sqrt((independent - 1) / independent), independent, effect or 1.0)
    return {"n": len(values), "test_sets": independent, "mean_diff": mean, "ci_low": low, "ci_high": high,
            "se": se, "mdd": detect["mdd"],
            "claim": None if effect is None else claim_verdict(low, high, effect)}


def claim_verdict(low: float, high: float, effect: float) -> str:
    """The paper's claimed gain against a pooled 95% interval."""
    if low > 0 and high >= effect:
        return "reproduced" if low <= effect else "reproduced (a larger gain than claimed)"
    if high < effect:
        return "not reproduced (the interval excludes the claimed gain)"
    return "inconclusive (the interval holds both no change and the claimed gain)"


def pool(comparisons: list[dict], level: float = LEVEL) -> Pooled:
    """Across cells, per metric: mean pruned - full, its interval resampling independent test sets, what that
    could detect, the paper's claim judged by the interval, and Holm-corrected counts.

    The Holm family of a metric is the cells where something was dropped (a cell that kept every layer tests
    nothing and counts as not different). Each metric is its own family.
    """
    pooled: dict = {"n_cells": len(comparisons)}
    shares = [c["share_dropped"] for c in comparisons if c.get("share_dropped") is not None]
    pooled["share_dropped"] = float(np.mean(shares)) if shares else None
    for metric in METRICS:
        cells = [c for c in comparisons if metric in c.get("tests", {})]
        tests = [c["tests"][metric] for c in cells]
        if not tests:
            continue
        groups = [c.get("test_set") or str(i) for i, c in enumerate(cells)]
        tested = [t for t in tests if t["source"] != "nothing dropped"]
        adjusted = holm([t["p_value"] for t in tested])
        better = sum(1 for t, p in zip(tested, adjusted) if p < level and t["diff"] > 0)
        worse = sum(1 for t, p in zip(tested, adjusted) if p < level and t["diff"] < 0)
        found = pooled_interval([t["diff"] for t in tests], groups, PAPER.get(metric))
        if not tested and found["claim"] is not None:  # every difference is 0 by construction, not by measurement
            found["claim"] = ("not judged: no cell dropped anything, so every pruned variant is the full adapter; "
                              "see the test-side curve")
        pooled[metric] = {**found, "better": better, "worse": worse, "not_different": len(tests) - better - worse,
                          "holm_family": len(tested), "holm_adjusted_p": adjusted}
    return pooled


def paper_line(pooled: dict) -> str:
    """One line: the pooled result beside the paper's averages."""
    if not pooled.get("n_cells"):
        return "No finished cell: nothing to compare with the paper's claims."
    parts = []
    if pooled.get("share_dropped") is not None:
        parts.append(f"{pooled['share_dropped']:.1%} of LoRA parameters dropped on average "
                     f"(paper: {PAPER['params_dropped']:.1%} fewer)")
    for metric in ("bleu", "rougeL"):
        p = pooled.get(metric)
        if p is None:
            continue
        if p.get("ci_low") is None:
            parts.append(f"{METRIC_LABELS[metric]} {p['mean_diff']:+.2f} (paper: {PAPER[metric]:+.1f}: {p['claim']})")
            continue
        parts.append(f"{METRIC_LABELS[metric]} {p['mean_diff']:+.2f} (95% CI {p['ci_low']:+.2f} to {p['ci_high']:+.2f} "
                     f"over {p['test_sets']} independent test sets; detects {p['mdd']:.2f} with 80% power; paper: "
                     f"{PAPER[metric]:+.1f}: {p['claim']})")
    return (f"Against the paper's claims (arXiv 2503.23360), pooled over {pooled['n_cells']} cells, pruned vs full "
            "adapter: " + "; ".join(parts) + ".")


def build_summary(grid: Grid, rows: list[dict], seconds: float | None) -> StudySummary:
    ok = [r for r in rows if r["status"] == "ok" and r.get("in_domain")]
    pooled = pool([r["in_domain"] for r in ok])
    by_rule = {rule: pool([r["rules"][rule] for r in ok if (r.get("rules") or {}).get(rule)]) for rule in RULES}
    transfers = [r["transfer"] for r in ok if r.get("transfer", {}).get("tests")]
    stage_totals: dict[str, float] = {}
    for r in rows:
        for stage, value in (r.get("seconds") or {}).items():
            stage_totals[stage] = stage_totals.get(stage, 0.0) + value
    measured = sum(stage_totals.values())
    return {
        "grid": asdict(grid),
        "cells": rows,
        "failed": [{"id": r["id"], "reason": r["reason"]} for r in rows if r["status"] != "ok"],
        "pooled": pooled,
        "test_curve": pool_curve_on_test(ok),
        "rules": {rule: {"rule": RULES[rule], "pooled": by_rule[rule], "comparison": paper_line(by_rule[rule])}
                  for rule in RULES},
        "paper": {**PAPER, "comparison": paper_line(pooled)},
        "transfer": {"task": grid.transfer, "pooled": pool(transfers)} if grid.transfer else None,
        "timing": {"seconds": seconds, "stages_seconds": stage_totals,
                   "stage_shares": {k: v / measured for k, v in stage_totals.items()} if measured else {},
                   "note": "measured in the call that finished each cell; stages done in an earlier, interrupted "
                           "call count 0; a run stage's time is read from when its file appeared"},
    }


# ---------------------------------------------------------------------------
# 4. The report
# ---------------------------------------------------------------------------

def plot_overlay(rows: list[dict]) -> bytes | None:
    """Every cell's truncation curve, normalised to the full adapter's gain over the base (0 = base, 1 = full)."""
    from .formatting import figure, png

    curves = [r for r in rows if r.get("truncation", {}).get("mean_prob")]
    if not curves:
        return None
    same_depth = len({r["num_layers"] for r in curves}) == 1
    fig, (ax,) = figure()
    for r in curves:
        bs, ps = r["truncation"]["boundary"], r["truncation"]["mean_prob"]
        gain = ps[-1] - ps[0]
        ys = [(p - ps[0]) / gain if gain else 0.0 for p in ps]
        xs = bs if same_depth else [(b + 1) / r["num_layers"] for b in bs]
        line, = ax.plot(xs, ys, linewidth=1, alpha=0.7, label=r["id"])
        if r.get("boundary") in bs:
            i = bs.index(r["boundary"])
            ax.plot([xs[i]], [ys[i]], "o", color=line.get_color(), markersize=5)
    ax.axhline(1.0, color="#888", linewidth=0.8, linestyle=":")
    ax.set_xlabel("b (LoRA kept on layers 0..b)" if same_depth else "share of layers keeping LoRA")
    ax.set_ylabel("share of the full adapter's gain")
    ax.set_title("Truncation curves of every cell, normalised (dot: the chosen b)", fontsize=10)
    if len(curves) <= 12:
        ax.legend(fontsize=6, ncol=2)
    return png(fig)


def plot_differences(rows: list[dict], pooled: dict) -> bytes | None:
    """Per cell, pruned minus full with its 95% interval, for BLEU and ROUGE-L; the pooled mean as a line."""
    from .formatting import figure, png

    ok = [r for r in rows if r.get("in_domain")]
    if not ok:
        return None
    fig, axes = figure(rows=2)
    for ax, metric in zip(axes, ("bleu", "rougeL")):
        tests = [(r["id"], r["in_domain"]["tests"].get(metric)) for r in ok]
        tests = [(name, t) for name, t in tests if t]
        ys = list(range(len(tests)))
        ax.errorbar([t["diff"] for _, t in tests], ys, fmt="o", color="#1f77b4", markersize=4,
                    xerr=[[t["diff"] - t["ci_low"] for _, t in tests], [t["ci_high"] - t["diff"] for _, t in tests]])
        ax.axvline(0, color="#888", linewidth=0.8)
        if metric in pooled:
            ax.axvline(pooled[metric]["mean_diff"], color="#2ca02c", linestyle="--", linewidth=1.2)
        ax.set_yticks(ys, [name for name, _ in tests], fontsize=6)
        ax.set_ylabel(METRIC_LABELS[metric])
    axes[-1].set_xlabel("pruned minus full adapter on test (points; bars: 95% paired-bootstrap interval)")
    return png(fig)


PLOT_FILES = {"overlay": "truncation_overlay.png", "differences": "differences.png"}
PLOT_CAPTIONS = {
    "overlay": "Each cell's truncation curve on validation (mean ground-truth probability with LoRA kept on layers "
               "0..b), rescaled so the base model is 0 and the full adapter 1. Dots: the b each cell chose.",
    "differences": "Test score of the pruned variant (the chosen b) minus the full adapter, per cell, with the "
                   "paired-bootstrap 95% interval; dashed: the pooled mean; a cell that kept every layer sits at 0.",
}


def _num(value, digits: int = 2, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _cell_rows(summary: dict) -> list[list[str]]:
    rows = []
    for r in summary["cells"]:
        label = [r["id"], task_label(r["task"]), r["training"]["name"], str(r["seed"])]
        d = r.get("in_domain")
        if r["status"] != "ok" or not d:
            reason = r.get("reason") or "the report has no row for the chosen b"
            rows.append(label + [f"failed: {reason}"] + [""] * (len(CELL_COLUMNS) - 5))
            continue
        share = f"{d['share_dropped']:.1%}" if d["share_dropped"] is not None else "n/a"
        scores = ["/".join(_num(d["metrics"][v].get(m), 1) for v in ("base", "full", "pruned")) for m in METRICS]
        chosen = str(r["boundary"]) if r["boundary"] is not None else d.get("selection") or "selection"
        rows.append(label + [chosen, share] + scores + [_test_text(d["tests"].get(m)) for m in METRICS]
                    + [_transfer_text(r)])
    return rows


CELL_COLUMNS = ["Cell", "Task", "Training", "Seed", "b", "LoRA dropped", "BLEU base/full/pruned",
                "ROUGE-L base/full/pruned", "chrF base/full/pruned", "Δ BLEU [95% CI] p", "Δ ROUGE-L [95% CI] p",
                "Δ chrF [95% CI] p", "Transfer Δ ROUGE-L"]


def _test_text(test: dict | None) -> str:
    if not test:
        return "n/a"
    if test["source"] == "nothing dropped":
        return "0 (nothing dropped)"
    detect = f", detects {_num(test['mdd'], 1)}" if test.get("mdd") is not None else ""
    return f"{_num(test['diff'], sign=True)} [{_num(test['ci_low'], sign=True)}, {_num(test['ci_high'], sign=True)}] " \
           f"{format_p(test['p_value'])}{detect}"


def _transfer_text(row: dict) -> str:
    t = (row.get("transfer") or {}).get("tests", {}).get("rougeL")
    return f"{task_label(row['transfer']['task'])}: {_test_text(t)}" if t else "—"


POOLED_COLUMNS = ["Metric", "Cells (test sets)", "Mean Δ pruned − full", "95% CI (bootstrap over test sets)",
                  "Detectable (80% power)", "The paper's claim", "Better / not different / worse (Holm)"]


def _pooled_rows(pooled: dict) -> list[list[str]]:
    rows = []
    for metric in METRICS:
        p = pooled.get(metric)
        if p:
            rows.append([METRIC_LABELS[metric], f"{p['n']} ({p['test_sets']})", _num(p["mean_diff"], sign=True),
                         f"{_num(p['ci_low'], sign=True)} to {_num(p['ci_high'], sign=True)}", _num(p["mdd"]),
                         p.get("claim") or "—", f"{p['better']} / {p['not_different']} / {p['worse']}"])
    return rows


RULE_COLUMNS = ["Rule", "Cells (test sets)", "LoRA dropped", "BLEU Δ (95% CI)", "BLEU detectable", "BLEU: the claim",
                "ROUGE-L Δ (95% CI)", "ROUGE-L detectable", "ROUGE-L: the claim"]


def _rule_rows(summary: dict) -> list[list[str]]:
    """Per rule, pooled over independent test sets: share dropped and the test differences against the full adapter."""
    rows = []
    for rule, found in (summary.get("rules") or {}).items():
        pooled = found["pooled"]
        if not pooled.get("n_cells"):
            rows.append([rule, "0", "—", "no cell", "", "", "", "", ""])
            continue
        cells = [rule, f"{pooled['n_cells']} ({(pooled.get('bleu') or {}).get('test_sets', '—')})",
                 "—" if pooled.get("share_dropped") is None else f"{pooled['share_dropped']:.1%}"]
        for metric in TESTED:
            p = pooled.get(metric)
            cells += (["—", "—", "—"] if p is None else
                      [f"{_num(p['mean_diff'], sign=True)} ({_num(p['ci_low'], sign=True)} to "
                       f"{_num(p['ci_high'], sign=True)})", _num(p["mdd"]), p.get("claim") or "—"])
        rows.append(cells)
    return rows


CURVE_COLUMNS = ["LoRA kept (share of parameters)", "Cells (test sets)", "Boundaries", "BLEU Δ (95% CI)",
                 "BLEU detectable", "ROUGE-L Δ (95% CI)", "ROUGE-L detectable"]


def _curve_rows(summary: dict) -> list[list[str]]:
    """The pooled test-side curve: per share of LoRA kept, the test difference from the full adapter."""
    rows = []
    for entry in summary.get("test_curve") or []:
        if not entry["cells"]:
            continue
        low, high = entry["share_kept"]
        cells = [f"{low:.0%} to {high:.0%}", f"{entry['cells']} ({(entry.get('bleu') or {}).get('test_sets', '—')})",
                 ", ".join(map(str, entry["boundaries"]))]
        for metric in TESTED:
            p = entry.get(metric)
            cells += (["—", "—"] if p is None else
                      [f"{_num(p['mean_diff'], sign=True)}" + ("" if p["ci_low"] is None else
                                                                f" ({_num(p['ci_low'], sign=True)} to "
                                                                f"{_num(p['ci_high'], sign=True)})"),
                       "—" if p["mdd"] is None else _num(p["mdd"])])
        rows.append(cells)
    return rows


CURVE_NOTE = ("Every boundary each cell evaluated on test (its validation candidates, chosen or not), against the "
              "full adapter: in each band of LoRA kept, a cell counts once (the mean over its boundaries there); "
              "the interval is over independent test sets, as above.")


def _rule_notes(summary: dict) -> list[str]:
    return [f"{rule}: {found['rule']}." for rule, found in (summary.get("rules") or {}).items()]


def _timing_rows(summary: dict) -> list[list[str]]:
    timing = summary["timing"]
    rows = [[stage, f"{seconds:.0f} s", f"{timing['stage_shares'].get(stage, 0):.0%}"]
            for stage, seconds in sorted(timing["stages_seconds"].items(), key=lambda kv: -kv[1])]
    if timing["stages_seconds"]:
        rows.append(["all stages, summed over cells", f"{sum(timing['stages_seconds'].values()):.0f} s", "100%"])
    if timing.get("seconds") is not None:
        rows.append(["this call, wall (cells finished by earlier calls are not in it)", f"{timing['seconds']:.0f} s",
                     ""])
    return rows


def _method_notes(summary: dict) -> list[str]:
    grid = summary["grid"]
    notes = [
        "Δ = test score of the pruned variant (LoRA kept on layers 0..b, b chosen on validation) minus the full "
        f"adapter's; per cell a paired bootstrap over test examples ({grid['bootstrap']} resamples).",
        "Pooled: the mean Δ over finished cells (one adapter each, equal weight). Its standard error comes from "
        f"{CELL_BOOTSTRAP:,} seeded bootstrap resamples of the k independent test sets (cells of one task and seed "
        "share theirs, so they are resampled together; unless [data] disjoint_tests = true, seeds reshuffle one "
        "pool of examples, so the test sets of two seeds of a task can share examples, and the interval is then "
        "somewhat too narrow), scaled by sqrt(k / (k - 1)); the 95% interval is the mean +- t(k - 1) standard "
        "errors, and detectable is the difference found with 80% power, (t(0.975) + t(0.8)) standard errors. "
        "With fewer than 3 test sets nothing is judged. The paper's claim is reproduced when the interval lies "
        "above 0 and holds the claimed gain, not reproduced when it lies below the claimed gain, inconclusive "
        "when it holds both.",
        f"Better / worse: the cell's p-value stays below {LEVEL} after Holm correction across the cells where "
        "something was dropped (each metric its own family); cells that kept every layer count as not different.",
        "Per-cell tests cover BLEU and ROUGE-L (sacrebleu gives no per-sentence chrF statistics); a BLEU or "
        "ROUGE-L test a cell's report lacks is computed from the cell's saved hypotheses with the same seed.",
        "Times: " + summary["timing"]["note"] + ".",
    ]
    if summary["failed"]:
        notes.insert(0, f"{len(summary['failed'])} cell(s) failed and are left out of the pooled figures: "
                     + "; ".join(f"{f['id']}: {f['reason']}" for f in summary["failed"]))
    return notes


def _headline(summary: dict) -> str:
    n, failed = len(summary["cells"]), len(summary["failed"])
    return f"{n - failed} of {n} cells finished" + (f", {failed} failed (see below)" if failed else "") + "."


def render_study_markdown(summary: dict, plot_files: dict[str, str]) -> str:
    from .formatting import markdown_table

    pooled = summary["pooled"]
    out = ["# lorabound study: does dropping upper-layer LoRA help?", "", _headline(summary), "",
           f"**{summary['paper']['comparison']}**", "", "## Three rules, pooled over independent test sets", "",
           markdown_table(RULE_COLUMNS, _rule_rows(summary)), ""] + [f"- {n}" for n in _rule_notes(summary)] + [
           "", "## The test-side curve, pooled: does any depth of dropping beat the full adapter?", "",
           markdown_table(CURVE_COLUMNS, _curve_rows(summary)), "", CURVE_NOTE, "",
           "## Pooled across cells (each cell's own search)", "",
           markdown_table(POOLED_COLUMNS, _pooled_rows(pooled)), ""]
    if pooled.get("share_dropped") is not None:
        out += [f"Mean share of LoRA parameters dropped: {pooled['share_dropped']:.1%}.", ""]
    transfer = summary.get("transfer")
    if transfer and transfer["pooled"].get("n_cells"):
        out += [f"## Transfer: each cell's b applied on {task_label(transfer['task'])} test", "",
                markdown_table(POOLED_COLUMNS, _pooled_rows(transfer["pooled"])), ""]
    out += ["## Cells", "", markdown_table(CELL_COLUMNS, _cell_rows(summary), right=range(4, len(CELL_COLUMNS))), ""]
    for name, file in plot_files.items():
        out += [f"![{name}]({file})", "", PLOT_CAPTIONS[name], ""]
    out += ["## Time", "", markdown_table(["Stage", "Time", "Share"], _timing_rows(summary)), ""]
    out += ["## Notes", ""] + [f"- {n}" for n in _method_notes(summary)]
    return "\n".join(out) + "\n"


def render_study_html(summary: dict, plots: dict[str, bytes]) -> str:
    import base64

    from .formatting import CSS, esc, html_table

    pooled = summary["pooled"]
    parts = ["<h1>lorabound study: does dropping upper-layer LoRA help?</h1>",
             f'<p class="meta">{esc(_headline(summary))}</p>',
             f'<p class="verdict" id="paper">{esc(summary["paper"]["comparison"])}</p>',
             "<h2>Three rules, pooled over independent test sets</h2>",
             html_table(RULE_COLUMNS, _rule_rows(summary), table_id="rules"),
             "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in _rule_notes(summary)) + "</ul>",
             "<h2>The test-side curve, pooled: does any depth of dropping beat the full adapter?</h2>",
             html_table(CURVE_COLUMNS, _curve_rows(summary), table_id="test-curve"),
             f"<p>{esc(CURVE_NOTE)}</p>",
             "<h2>Pooled across cells (each cell's own search)</h2>",
             html_table(POOLED_COLUMNS, _pooled_rows(pooled), table_id="pooled")]
    if pooled.get("share_dropped") is not None:
        parts.append(f"<p>Mean share of LoRA parameters dropped: {pooled['share_dropped']:.1%}.</p>")
    transfer = summary.get("transfer")
    if transfer and transfer["pooled"].get("n_cells"):
        parts += [f"<h2>Transfer: each cell's b applied on {esc(task_label(transfer['task']))} test</h2>",
                  html_table(POOLED_COLUMNS, _pooled_rows(transfer["pooled"]), table_id="transfer")]
    parts += ["<h2>Cells</h2>", html_table(CELL_COLUMNS, _cell_rows(summary), table_id="cells", numeric=range(4, len(CELL_COLUMNS)))]
    for name, data in plots.items():
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        parts.append(f'<figure><img src="{uri}" alt="{esc(name)}"><figcaption>{esc(PLOT_CAPTIONS[name])}'
                     "</figcaption></figure>")
    parts += ["<h2>Time</h2>", html_table(["Stage", "Time", "Share"], _timing_rows(summary), table_id="time"),
              "<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in _method_notes(summary)) + "</ul>"]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>lorabound study</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def write_study_report(out: Path, summary: dict) -> dict[str, Path]:
    """study.json, study.md, study.html and the PNGs, each written atomically."""
    plots = {name: data for name, data in (("overlay", plot_overlay(summary["cells"])),
                                           ("differences", plot_differences(summary["cells"], summary["pooled"])))
             if data is not None}
    paths = {}
    for name, data in plots.items():
        paths[name] = out / PLOT_FILES[name]
        write_bytes_atomic(paths[name], data)
    paths["json"], paths["markdown"], paths["html"] = out / "study.json", out / "study.md", out / "study.html"
    write_json_atomic(paths["json"], summary)
    write_text_atomic(paths["markdown"], render_study_markdown(summary, {n: PLOT_FILES[n] for n in plots}))
    write_text_atomic(paths["html"], render_study_html(summary, plots))
    return paths
