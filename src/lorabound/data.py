"""Tasks, built-in datasets, splits, prompt templates and batching.  (CONTRACT STUB: to be implemented)

A task is a list of examples (an input and one or more references) plus a prompt template
containing ``{input}``. Training expands each example into one (prompt, target) pair per reference;
teacher-forced analysis uses the first reference; metrics use every reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BUILTIN_TASKS: dict[str, str]  # name -> default template, e.g. "e2e": "Describe the restaurant.\nData: {input}\nText:"


@dataclass(frozen=True)
class Example:
    input: str
    references: tuple[str, ...]  # at least one, none empty


@dataclass
class Task:
    name: str            # "e2e", or the user's file name
    examples: list[Example]
    template: str        # contains "{input}"
    source: str          # where the examples came from, for reports

    def prompt(self, example: Example) -> str:
        """The template filled with the example's input."""
        raise NotImplementedError


def load_task(spec: str, *, input_field: str = "input", target_field: str = "target",
              template: str | None = None) -> Task:
    """A built-in name (e2e, webnlg, xsum) or a .jsonl/.csv path. `template` is inline text or a path to a file."""
    raise NotImplementedError


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    seed: int


def split_task(task: Task, *, train: int, validation: int, test: int, seed: int = 0) -> Splits:
    """Shuffle with `seed` (deterministic) and cut into disjoint train / validation / test of these sizes."""
    raise NotImplementedError


@dataclass
class Encoded:
    """Token ids for teacher forcing: prompt + " " + target + eos, labels -100 on the prompt."""
    input_ids: list[list[int]]
    labels: list[list[int]]
    n_truncated: int   # target cut to fit max_length
    n_skipped: int     # prompt alone >= max_length: dropped


def encode_pairs(tokenizer, task: Task, pairs: list[tuple[Example, str]], max_length: int) -> Encoded:
    raise NotImplementedError


def training_pairs(examples: list[Example]) -> list[tuple[Example, str]]:
    """One (example, reference) pair per reference."""
    raise NotImplementedError


def first_reference_pairs(examples: list[Example]) -> list[tuple[Example, str]]:
    """One (example, first reference) pair per example: the teacher-forcing target for analysis."""
    raise NotImplementedError


@dataclass
class Batch:
    input_ids: torch.Tensor       # (B, T) right-padded with pad_token_id
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor          # (B, T) -100 on prompt and padding


def batches(encoded: Encoded, batch_size: int, pad_token_id: int, *, shuffle_seed: int | None = None):
    """Yield Batch objects in order (or shuffled with the seed)."""
    raise NotImplementedError
