"""The range of every argument, checked in one place before any work.

The option dataclasses (DataOptions, ModelOptions, GenerationOptions, TrainSettings) call `check_arguments`
from __post_init__, and each command calls it for its own arguments before it loads a model or data, so a
bad value is refused in one line before anything is computed or written. Rules are keyed by parameter
name; the flag named in a refusal is `--` plus the name with dashes (FLAGS lists the exceptions). A study's
grid file goes through the same rules (`check_settings`), its refusals naming the key and the table.

Every whole number has an upper bound, at most INT_MAX: torch and numpy pass these values on as C integers,
and a larger one ended in an overflow traceback (`--threads 10**12`) or an allocation of absurd size
(`--rank` in the trillions) instead of a refusal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import LoraboundError

ENGINES = ("hf", "vllm")  # the generation engines (generation/engines.py runs them)
CURVES = ("truncation", "logit_lens", "ablation")  # analyze's default
OPTIONAL_CURVES = ("joint",)  # asked by name: the joint curve costs about 2L/3 truncation sweeps (README)
EXPORT_FORMATS = ("peft", "zero-fill", "merged")  # prune --format (lora/export.py writes them)
DEFAULT_MODEL = "smollm2-135m"  # the embedded model (model/gguf.py)

SEED_MAX = 2**32 - 1  # numpy and torch accept it, and seed * 1_000_003 + step stays within torch's range
BOOTSTRAP_MAX = 100_000  # the resampling table is bootstrap x examples integers
INT_MAX = 2**31 - 1  # a C int: the largest whole number a rule accepts (seeds: SEED_MAX, 32 unsigned bits)
THREADS_MAX = 1024
RANK_MAX = 65_536  # above the hidden size of the largest open models: a LoRA rank cannot usefully exceed it
BATCH_MAX = 65_536
TOKENS_MAX = 1_048_576  # 2**20 tokens a sequence: more than the context of the models lorabound runs on a CPU
PARALLEL_MAX = 1024  # vLLM: GPUs per model, adapters batched together
EPOCHS_MAX = 10_000.0


@dataclass(frozen=True)
class Number:
    """A whole number (integer=True) or a finite real in [low, high]; `open_low` / `open_high` exclude the end."""
    integer: bool
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    optional: bool = False  # None allowed (a default chosen later)

    def range(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            return f"in {left}{_show(self.low)}, {_show(self.high)}{right}"
        if self.low is not None:
            return f"{'above' if self.open_low else 'at least'} {_show(self.low)}"
        return "any value"

    def accepts(self, value) -> bool:
        if isinstance(value, bool):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.open_high and value == self.high))


@dataclass(frozen=True)
class Choice:
    """One of a few names (e.g. the generation engine)."""
    names: tuple[str, ...]
    optional: bool = False


@dataclass(frozen=True)
class Text:
    """A non-empty string (a path, a name, a template)."""
    optional: bool = False


def _show(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _whole(low=None, high=INT_MAX, **kw) -> Number:
    return Number(True, low, high, **kw)


def _real(low=None, high=None, **kw) -> Number:
    return Number(False, low, high, **kw)


RULES: dict[str, Number | Text | Choice] = {
    # data (DataOptions)
    "data": Text(), "input_field": Text(), "target_field": Text(), "template": Text(optional=True),
    "train_size": _whole(0, optional=True), "validation_size": _whole(0), "test_size": _whole(0),
    "seed": _whole(0, SEED_MAX), "max_length": _whole(8, TOKENS_MAX),
    # model (ModelOptions)
    "model": Text(), "dtype": Text(), "device": Text(),
    # generation (GenerationOptions)
    "max_new_tokens": _whole(1, TOKENS_MAX), "generation_batch_size": _whole(1, BATCH_MAX),
    "engine": Choice(ENGINES),
    # training (TrainSettings)
    "rank": _whole(1, RANK_MAX), "alpha": _real(0, open_low=True), "dropout": _real(0, 1, open_high=True),
    "learning_rate": _real(0, open_low=True), "epochs": _real(0, EPOCHS_MAX, open_low=True),
    "batch_size": _whole(1, BATCH_MAX),
    "warmup": _real(0, 1), "checkpoint_every": _whole(1), "target_modules": Text(),
    "early_stopping": _whole(0), "eval_every": _whole(1, optional=True),
    # the commands' own arguments
    "out": Text(), "adapter": Text(), "adapters": Text(), "curves": Text(), "criterion": Text(),
    "format": Text(), "boundary": _whole(-1, optional=True), "boundaries": _whole(-1), "candidates": _whole(-1),
    "tolerance": _real(0, optional=True), "knee_fraction": _real(0, 1, open_low=True),
    "keep_fraction": _real(0, 1, open_low=True, optional=True), "bootstrap": _whole(1, BOOTSTRAP_MAX),
    "threads": _whole(1, THREADS_MAX, optional=True),
    # a selection other than a boundary (prune, evaluate): per-group boundaries, layer sets ("0-9,12,15")
    "boundary_attention": _whole(-1, optional=True), "boundary_mlp": _whole(-1, optional=True),
    "boundary_other": _whole(-1, optional=True), "layers": Text(optional=True),
    # speed (speed.SpeedSettings)
    "batch_sizes": _whole(1, BATCH_MAX), "new_tokens": _whole(1, TOKENS_MAX), "repeats": _whole(1, 1_000_000),
    "prompt_tokens": _whole(1, TOKENS_MAX), "run": Text(),
    # where a study's cells run (executors.ExecutorOptions, study --shard)
    "executor": Text(), "ray_address": Text(optional=True), "cpus_per_cell": _real(0, open_low=True),
    "gpus_per_cell": _real(0, optional=True), "shard": Text(optional=True),
    # the vLLM engine (engines.VLLMOptions)
    "tensor_parallel_size": _whole(1, PARALLEL_MAX), "gpu_memory_utilization": _real(0, 1, open_low=True),
    "max_model_len": _whole(1, TOKENS_MAX, optional=True), "max_lora_rank": _whole(1, RANK_MAX, optional=True),
    "max_loras": _whole(1, PARALLEL_MAX),
}

FLAGS = {"learning_rate": "--lr"}
LISTS = {"adapters", "batch_sizes", "boundaries", "candidates", "curves", "target_modules", "layers"}


def flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def check_arguments(**values) -> None:
    """Refuse the first value outside its rule. Names without a rule (booleans, other modules' options) pass."""
    for name, value in values.items():
        _check_value(name, value, Label(flag(name)))


def check_settings(values: dict, where: str, rename: dict[str, str] | None = None) -> None:
    """The same rules for settings read from a file: a refusal names `key = value in WHERE` instead of a flag.

    `rename` maps a key of the file to the rule it follows (the grid's `ranks` follow `rank`).
    """
    for key, value in values.items():
        _check_value((rename or {}).get(key, key), value, Label(key, " = ", f" in {where}"))


@dataclass(frozen=True)
class Label:
    """How a refusal names the value: `--rank 0` for a flag, `rank = 0 in [[training]] 'short'` for a setting."""
    name: str
    sep: str = " "
    where: str = ""

    def of(self, value) -> str:
        return f"{self.name}{self.sep}{value!r}{self.where}"


def _check_value(name: str, value, label: Label) -> None:
    rule = RULES.get(name)
    if rule is None or (name in LISTS and value is None):  # no rule, or no list given
        return
    items = value if name in LISTS and isinstance(value, (list, tuple)) else [value]
    for item in items:
        _check_one(label, item, rule)


def _check_one(label: Label, value, rule: Number | Text | Choice) -> None:
    if value is None and rule.optional:
        return
    if isinstance(rule, Choice):
        if value not in rule.names:
            raise LoraboundError(f"{label.of(value)} is unknown; choose one of {', '.join(rule.names)}")
        return
    if isinstance(rule, Text):
        if not isinstance(value, str) and not hasattr(value, "__fspath__"):
            raise LoraboundError(f"{label.name}{label.where} must be text, not {type(value).__name__}; pass a value")
        if not str(value).strip():
            raise LoraboundError(f"{label.name}{label.where} is empty; pass a value")
        if "\x00" in str(value):
            raise LoraboundError(f"{label.name}{label.where} contains a NUL character; pass plain text")
        return
    if not rule.accepts(value):
        kind = "a whole number" if rule.integer else "a finite number"
        raise LoraboundError(f"{label.of(value)} is out of range; pass {kind} {rule.range()}")
