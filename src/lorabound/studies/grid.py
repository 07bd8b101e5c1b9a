"""The grid of a study: :class:`Grid` (from flags or a TOML file), its cells (:class:`Cell`) in the fixed order models >
tasks > training settings > seeds, and :func:`check_grid`, which refuses an unknown model or task, bad sizes or
settings before any work.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .. import pipeline
from ..errors import LoraboundError
from ..formatting import slug
from ..generation.engines import check_engine_installed
from ..model import DEFAULT_MODEL, model_num_layers
from ..options import DataOptions, GenerationOptions, TrainSettings
from ..rules import check_settings
from ..runtime.files import TEXT_ENCODING
from ..decision.boundary import SearchSettings


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
    seeds_by_task: dict = field(default_factory=dict, metadata={
        "help": "a task's own seeds instead of `seeds` (a table: task = [seeds]); e.g. more seeds for a task whose "
                "data holds more disjoint test blocks than another's"})
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
        return [Cell(m, t, tr, s) for m, t, tr in itertools.product(self.models, self.tasks, self.training)
                for s in self.seeds_of(t)]

    def seeds_of(self, task: str) -> list[int]:
        """The seeds a task runs with: its own from `seeds_by_task`, else the grid's."""
        return self.seeds_by_task.get(task_label(task), self.seeds)

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
    by_task = given.get("seeds_by_task", {})
    if not isinstance(by_task, dict):
        raise LoraboundError(f"seeds_by_task must be a table of task = [seeds], got {by_task!r}; for example "
                             "[seeds_by_task] then webnlg = [0, 1, 2]")
    given["seeds_by_task"] = {name: _list_of(seeds, int, f"seeds_by_task.{name}") for name, seeds in by_task.items()}
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
    for task, seeds in grid.seeds_by_task.items():
        for value in seeds:
            check_settings({"seeds": value}, f"seeds_by_task.{task}", GRID_RULES)
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
    epochs or ranks replace the file's [[training]] tables, seeds its [seeds_by_task] table.
    """
    values = read_grid_file(path) if path is not None else {}
    given = {k: v for k, v in given.items() if v is not None}
    if {"epochs", "ranks"} & set(given):
        values.pop("training", None)
    if "seeds" in given:  # seeds asked for on the command line are every task's
        values.pop("seeds_by_task", None)
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
    for task in grid.seeds_by_task:
        if task not in {task_label(t) for t in grid.tasks}:
            raise LoraboundError(f"seeds_by_task.{task} names no task of the grid ({', '.join(grid.tasks)}); "
                                 "name a task of `tasks`")
    layers = {model: model_num_layers(model) for model in grid.models}  # an unknown model is refused here
    grid.generation_options(), grid.search_settings()
    checks = [(task, seed) for task in grid.tasks for seed in grid.seeds_of(task)]
    if grid.transfer:  # its test split is read with every cell's seed
        checks += [(grid.transfer, seed) for seed in dict.fromkeys(cell.seed for cell in grid.cells())]
    for task, seed in checks:
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
