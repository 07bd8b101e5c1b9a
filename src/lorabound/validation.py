"""The range of every argument, checked in one place before any work.

The option dataclasses (DataOptions, ModelOptions, GenerationOptions, TrainSettings) call `check_arguments`
from __post_init__, and each command calls it for its own arguments before it loads a model or data, so a
bad value is refused in one line before anything is computed or written. Rules are keyed by parameter
name; the flag named in a refusal is `--` plus the name with dashes (FLAGS lists the exceptions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import LoraboundError

SEED_MAX = 2**32 - 1  # numpy and torch accept it, and seed * 1_000_003 + step stays within torch's range
BOOTSTRAP_MAX = 100_000  # the resampling table is bootstrap x examples integers


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
class Text:
    """A non-empty string (a path, a name, a template)."""
    optional: bool = False


def _show(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _whole(low=None, high=None, **kw) -> Number:
    return Number(True, low, high, **kw)


def _real(low=None, high=None, **kw) -> Number:
    return Number(False, low, high, **kw)


RULES: dict[str, Number | Text] = {
    # data (DataOptions)
    "data": Text(), "input_field": Text(), "target_field": Text(), "template": Text(optional=True),
    "train_size": _whole(0, optional=True), "validation_size": _whole(0), "test_size": _whole(0),
    "seed": _whole(0, SEED_MAX), "max_length": _whole(8),
    # model (ModelOptions)
    "model": Text(), "dtype": Text(), "device": Text(),
    # generation (GenerationOptions)
    "max_new_tokens": _whole(1), "generation_batch_size": _whole(1),
    # training (TrainSettings)
    "rank": _whole(1), "alpha": _real(0, open_low=True), "dropout": _real(0, 1, open_high=True),
    "learning_rate": _real(0, open_low=True), "epochs": _real(0, open_low=True), "batch_size": _whole(1),
    "warmup": _real(0, 1), "checkpoint_every": _whole(1), "target_modules": Text(),
    # the commands' own arguments
    "out": Text(), "adapter": Text(), "adapters": Text(), "curves": Text(), "criterion": Text(),
    "format": Text(), "boundary": _whole(-1, optional=True), "boundaries": _whole(-1), "candidates": _whole(-1),
    "tolerance": _real(0), "knee_fraction": _real(0, 1, open_low=True),
    "keep_fraction": _real(0, 1, open_low=True, optional=True), "bootstrap": _whole(1, BOOTSTRAP_MAX),
    "threads": _whole(1, optional=True),
    # a selection other than a boundary (prune, evaluate): per-group boundaries, layer sets ("0-9,12,15")
    "boundary_attention": _whole(-1, optional=True), "boundary_mlp": _whole(-1, optional=True),
    "boundary_other": _whole(-1, optional=True), "layers": Text(optional=True),
    # speed (speed.SpeedSettings)
    "batch_sizes": _whole(1), "new_tokens": _whole(1), "repeats": _whole(1), "prompt_tokens": _whole(1), "run": Text(),
    # where a study's cells run (executors.ExecutorOptions, study --shard)
    "executor": Text(), "ray_address": Text(optional=True), "cpus_per_cell": _real(0, open_low=True),
    "gpus_per_cell": _real(0, optional=True), "shard": Text(optional=True),
    # the vLLM engine (engines.VLLMOptions)
    "tensor_parallel_size": _whole(1), "gpu_memory_utilization": _real(0, 1, open_low=True),
    "max_model_len": _whole(1, optional=True), "max_lora_rank": _whole(1, optional=True), "max_loras": _whole(1),
}

FLAGS = {"learning_rate": "--lr"}
LISTS = {"adapters", "batch_sizes", "boundaries", "candidates", "curves", "target_modules", "layers"}


def flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def check_arguments(**values) -> None:
    """Refuse the first value outside its rule. Names without a rule (booleans, other modules' options) pass."""
    for name, value in values.items():
        rule = RULES.get(name)
        if rule is None or (name in LISTS and value is None):  # no rule, or no list given
            continue
        items = value if name in LISTS and isinstance(value, (list, tuple)) else [value]
        for item in items:
            _check_one(name, item, rule)


def _check_one(name: str, value, rule: Number | Text) -> None:
    if value is None and rule.optional:
        return
    if isinstance(rule, Text):
        if not isinstance(value, str) and not hasattr(value, "__fspath__"):
            raise LoraboundError(f"{flag(name)} must be text, not {type(value).__name__}; pass a value")
        if not str(value).strip():
            raise LoraboundError(f"{flag(name)} is empty; pass a value")
        if "\x00" in str(value):
            raise LoraboundError(f"{flag(name)} contains a NUL character; pass plain text")
        return
    if not rule.accepts(value):
        kind = "a whole number" if rule.integer else "a finite number"
        raise LoraboundError(f"{flag(name)} {value!r} is out of range; pass {kind} {rule.range()}")
