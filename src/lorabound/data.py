"""Tasks, built-in datasets, splits, prompt templates and batching.

A task is a list of examples (an input and one or more references) plus a prompt template
containing ``{input}``. Training expands each example into one (prompt, target) pair per reference;
teacher-forced analysis uses the first reference; metrics use every reference.

The built-in tasks (e2e, webnlg, xsum) are the GEM tasks shipped in the ``bigbench==1.0.0`` sdist
on PyPI. The first use downloads that sdist once, extracts only the three ``task.json`` files into
``cache_dir()/datasets`` and deletes the sdist.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import LoraboundError
from .runtime.files import TEXT_ENCODING, cache_dir, sha256_file, write_text_atomic

BUILTIN_TASKS: dict[str, str] = {
    "e2e": "Describe the restaurant.\nData: {input}\nText:",
    "webnlg": "Describe the facts.\nTriples: {input}\nText:",
    "xsum": "Summarize the article in one sentence.\nArticle: {input}\nSummary:",
}

# Built-in task name -> folder under bigbench/benchmark_tasks/gem/ in the sdist.
BIGBENCH_TASK_DIRS: dict[str, str] = {"e2e": "e2e_nlg", "webnlg": "webnlg_en", "xsum": "xsum"}

BIGBENCH_SDIST_ENV = "LORABOUND_BIGBENCH_SDIST"
BIGBENCH_SDIST_NAME = "bigbench-1.0.0.tar.gz"
BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
# pip >= 24 refuses this sdist after downloading it (it declares a file:// dependency); this pip still saves it.
PIP_THAT_SAVES_BIGBENCH = "pip==23.2.1"
BIGBENCH_SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
_SDIST_GEM_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/gem/"

# The default for user files when no template is given: the input itself is the prompt.
USER_DEFAULT_TEMPLATE = "{input}"

IGNORE_INDEX = -100


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
        # str.replace, not str.format: braces in templates and data stay literal.
        return self.template.replace("{input}", example.input)


# ---------------------------------------------------------------------------------------------
# Loading


def load_task(spec: str, *, input_field: str = "input", target_field: str = "target",
              template: str | None = None) -> Task:
    """A built-in name (e2e, webnlg, xsum) or a .jsonl/.csv path. `template` is inline text or a path to a file.

    Rows with identical inputs become one Example holding every reference (first-seen order).
    """
    if spec in BUILTIN_TASKS:
        path = builtin_task_file(spec)
        rows = _read_bigbench_json(path)
        examples = _group_examples(rows)
        source = f"bigbench==1.0.0 gem/{BIGBENCH_TASK_DIRS[spec]}/task.json"
        return Task(spec, examples, resolve_template(template, BUILTIN_TASKS[spec]), source)

    path = Path(spec)
    if not _is_file(path):
        raise LoraboundError(
            f"unknown task {spec!r}: not a built-in task and not an existing file; "
            f"use one of {', '.join(BUILTIN_TASKS)} or a path to a .jsonl or .csv file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(path, input_field, target_field)
    elif suffix == ".csv":
        rows = _read_csv(path, input_field, target_field)
    else:
        raise LoraboundError(
            f"task file {path} has unsupported extension {path.suffix or '(none)'!r}; "
            f"give a .jsonl (one JSON object a line) or .csv (with a header row) file")
    if not rows:
        raise LoraboundError(f"task file {path} has no rows; add at least one row with "
                             f"{input_field!r} and {target_field!r}")
    return Task(path.name, _group_examples(rows), resolve_template(template, USER_DEFAULT_TEMPLATE),
                str(path))


def resolve_template(template: str | None, default: str) -> str:
    """Inline text containing {input}, or the path of a file whose text contains {input}."""
    if template is None:
        return default
    if "{input}" in template:
        return template
    path = Path(template)
    if _is_file(path):
        try:
            # not read_text: a lone "\r" must stay "\r"; an editor's byte-order mark is not part of the prompt
            text = path.read_bytes().decode(TEXT_ENCODING)
        except (OSError, UnicodeDecodeError) as e:
            raise LoraboundError(f"cannot read template file {path} ({e}); "
                                 f"pass a readable UTF-8 text file") from None
        # Drop the editor's final newline: the target starts with " " right after the prompt.
        if text.endswith("\r\n"):
            text = text[:-2]
        elif text.endswith("\n"):
            text = text[:-1]
        if "{input}" not in text:
            raise LoraboundError(f"template file {path} does not contain {{input}}; "
                                 f"add {{input}} where the example's input should go")
        return text
    raise LoraboundError(f"template {template!r} does not contain {{input}} and is not an existing file; "
                         f"pass text with {{input}} where the input goes, or a path to such a file")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long to be a path
        return False


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, as the user wrote it."""
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", dict: "object", list: "list"}
    return names.get(type(value), type(value).__name__)


def _references(value, where: str, target_field: str) -> tuple[str, ...]:
    """A target value (string or list of strings) as a tuple of stripped, non-empty references."""
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, list):
        raise LoraboundError(f"{where}: field {target_field!r} is {_json_type(value)}, not a string "
                             f"or a list of strings; give the reference text as a string or list of strings")
    if not refs:
        raise LoraboundError(f"{where}: field {target_field!r} is an empty list of references; "
                             f"give at least one reference or remove the row")
    out = []
    for ref in refs:
        if not isinstance(ref, str):
            raise LoraboundError(f"{where}: field {target_field!r} holds {_json_type(ref)}, not a string; "
                                 f"give every reference as a string")
        if not ref.strip():
            raise LoraboundError(f"{where}: field {target_field!r} has an empty reference; "
                                 f"give non-empty reference text or remove the row")
        out.append(ref.strip())
    return tuple(out)


def _input_text(value, where: str, input_field: str) -> str:
    if not isinstance(value, str):
        raise LoraboundError(f"{where}: field {input_field!r} is {_json_type(value)}, not a string; "
                             f"give the input as text")
    return value


def _check_text(line: str, where: str) -> None:
    """Refuse characters a reader would pass on as something other than what the user meant to write."""
    if "\x00" in line:
        raise LoraboundError(f"{where} contains a NUL byte (a UTF-16 or binary file?); save the file as UTF-8 text")
    if line.startswith("\ufeff"):
        raise LoraboundError(f"{where} starts with a byte-order mark (U+FEFF), as if files were joined together; "
                             f"remove it")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: a key given twice would silently keep only its last value."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(ValueError):
    pass


def _check_strings(value, where: str) -> None:
    """Refuse a JSON string escape that is no character (an unpaired surrogate such as \\ud800)."""
    for text in ([value] if isinstance(value, str) else value if isinstance(value, list) else []):
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise LoraboundError(f"{where} holds an unpaired surrogate escape (\\ud800-\\udfff); "
                                     f"write the character itself or its full surrogate pair") from None


def _missing_field(where: str, name: str, present) -> LoraboundError:
    fields = ", ".join(repr(k) for k in present) or "none"
    return LoraboundError(f"{where} has no field {name!r} (fields: {fields}); "
                          f"name the right ones with --input-field and --target-field")


def _read_jsonl(path: Path, input_field: str, target_field: str) -> list[tuple[str, tuple[str, ...]]]:
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path} line {number}"
            try:
                line = raw.decode(TEXT_ENCODING if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise LoraboundError(f"{where} is not valid UTF-8; save the file as UTF-8") from None
            _check_text(line, where)
            if not line.strip():
                continue
            try:
                obj = json.loads(line, object_pairs_hook=_unique_keys)
            except _DuplicateKey as e:
                raise LoraboundError(f"{where} gives the field {e.args[0]!r} twice; keep one") from None
            except json.JSONDecodeError as e:
                raise LoraboundError(f"{where} is not valid JSON ({e.msg}); "
                                     f"write one JSON object per line") from None
            if not isinstance(obj, dict):
                raise LoraboundError(f"{where} is a JSON {_json_type(obj)}, not an object; "
                                     f"write one JSON object per line")
            for name in (input_field, target_field):
                if name not in obj:
                    raise _missing_field(where, name, obj.keys())
                _check_strings(obj[name], where)
            rows.append((_input_text(obj[input_field], where, input_field),
                         _references(obj[target_field], where, target_field)))
    return rows


def _read_csv(path: Path, input_field: str, target_field: str) -> list[tuple[str, tuple[str, ...]]]:
    """Rows of a CSV file with a header; any row that would not map cell for cell onto it is refused."""
    data = path.read_bytes()
    try:
        text = data.decode(TEXT_ENCODING)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LoraboundError(f"{path} line {line} is not valid UTF-8; save the file as UTF-8") from None
    for number, line in enumerate(text.split("\n"), start=1):
        _check_text(line, f"{path} line {number}")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, line = [], 1
    try:
        columns = next(reader, [])
        _check_header(path, columns, input_field, target_field)
        line = reader.line_num + 1
        for cells in reader:
            where = f"{path} line {line}"  # where the row starts (a quoted cell may span lines)
            line = reader.line_num + 1
            if not cells:
                continue  # a blank line
            if len(cells) != len(columns):
                cells_word = "cell" if len(cells) == 1 else "cells"
                raise LoraboundError(f"{where} has {len(cells)} {cells_word} but the header has {len(columns)}; "
                                     f"give every row one cell per column (quote cells holding commas)")
            row = dict(zip(columns, cells))
            # A cell is one reference, as written (never parsed: "[1, 2]" is text); several references are
            # several rows with the same input, which _group_examples joins.
            rows.append((row[input_field], _references(row[target_field], where, target_field)))
    except csv.Error as e:
        raise LoraboundError(f"{path} line {line} is not valid CSV ({e}); "
                             f"quote cells that contain commas, quotes or newlines") from None
    return rows


def _check_header(path: Path, columns: list[str], input_field: str, target_field: str) -> None:
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise LoraboundError(f"{path} line 1 names the column {repeated[0]!r} twice; give each column its own name")
    for name in (input_field, target_field):
        if columns and name not in columns:
            listed = ", ".join(repr(c) for c in columns)
            raise LoraboundError(f"{path} has no column {name!r} (columns: {listed}); "
                                 f"name the right ones with --input-field and --target-field")


def _group_examples(rows: list[tuple[str, tuple[str, ...]]]) -> list[Example]:
    """Merge rows with identical input into one Example (first-seen order, identical references once)."""
    refs_by_input: dict[str, list[str]] = {}
    for text, refs in rows:
        kept = refs_by_input.setdefault(text, [])
        kept.extend(r for r in refs if r not in kept)
    return [Example(text, tuple(refs)) for text, refs in refs_by_input.items()]


# ---------------------------------------------------------------------------------------------
# Built-in tasks: extracted once from the bigbench==1.0.0 sdist


def bigbench_cache_root() -> Path:
    return cache_dir() / "datasets" / "bigbench-1.0.0" / "gem"


def builtin_task_file(name: str) -> Path:
    """The cached task.json of a built-in task, extracting all three from the sdist if any is missing."""
    root = bigbench_cache_root()
    paths = {n: root / d / "task.json" for n, d in BIGBENCH_TASK_DIRS.items()}
    if not all(p.is_file() for p in paths.values()):
        _fetch_builtin_tasks(root)
    return paths[name]


def _fetch_builtin_tasks(root: Path) -> None:
    """Extract the three task.json files from LORABOUND_BIGBENCH_SDIST, or from a one-off download."""
    local = os.environ.get(BIGBENCH_SDIST_ENV)
    if local:
        if not _is_file(Path(local)):
            raise LoraboundError(f"{BIGBENCH_SDIST_ENV}={local} is not a file; point it at a local "
                                 f"{BIGBENCH_SDIST_NAME} or unset it to download from PyPI")
        extract_bigbench_tasks(Path(local), root)
        return
    # Download next to the cache (not /tmp, which may be small); removed even on failure.
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".bigbench-download-"))
    try:
        extract_bigbench_tasks(_download_bigbench_sdist(tmp), root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_bigbench_sdist(dest_dir: Path) -> Path:
    """`pip download --no-deps bigbench==1.0.0` into dest_dir (never installed), then check its sha256.

    A pip too new to save this sdist is answered by a throwaway environment with an older pip.
    """
    print("lorabound: downloading bigbench==1.0.0 from PyPI once (~358 MB) for the built-in tasks",
          file=sys.stderr, flush=True)
    fix = f"set {BIGBENCH_SDIST_ENV} to a local copy of {BIGBENCH_SDIST_NAME} (pip download --no-deps bigbench==1.0.0)"
    download = ["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", BIGBENCH_REQUIREMENT,
                "-d", str(dest_dir)]
    done = _run_quietly([sys.executable, *download])
    if done.returncode != 0 and "direct URL dependencies" in done.stdout:
        env = dest_dir / "pip-env"
        python = env / "bin" / "python"
        _run_quietly([sys.executable, "-m", "venv", str(env)])
        _run_quietly([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", PIP_THAT_SAVES_BIGBENCH])
        done = _run_quietly([str(python), *download])
    dest = dest_dir / BIGBENCH_SDIST_NAME
    if done.returncode != 0 or not dest.is_file():
        last = (done.stdout.strip().splitlines() or ["no output"])[-1]
        raise LoraboundError(f"could not download bigbench==1.0.0 from PyPI ({last}); {fix}")
    if sha256_file(dest) != BIGBENCH_SDIST_SHA256:
        raise LoraboundError(f"the downloaded bigbench==1.0.0 sdist has the wrong sha256 (incomplete or altered "
                             f"download); try again, or {fix}")
    return dest


def _run_quietly(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def extract_bigbench_tasks(sdist: Path, root: Path) -> None:
    """Stream the sdist once and write the three gem task.json files under root, each atomically."""
    wanted = {_SDIST_GEM_PREFIX + d + "/task.json": d for d in BIGBENCH_TASK_DIRS.values()}
    fix = f"point {BIGBENCH_SDIST_ENV} at the {BIGBENCH_SDIST_NAME} sdist from PyPI"
    try:
        with tarfile.open(sdist, "r|gz") as archive:
            for member in archive:
                folder = wanted.get(member.name)
                if folder is None or not member.isfile():
                    continue
                text = archive.extractfile(member).read().decode("utf-8")
                json.loads(text)  # never cache a broken file
                write_text_atomic(root / folder / "task.json", text)
                del wanted[member.name]
                if not wanted:  # the gem tasks lie early in the archive: stop reading there
                    break
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraboundError(f"cannot read the bigbench tasks from {sdist} ({e}); {fix}") from None
    if wanted:
        raise LoraboundError(f"{sdist} lacks {', '.join(sorted(wanted))}; {fix}")


def _read_bigbench_json(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraboundError(f"cached task file {path} is unreadable ({e}); delete it and run again "
                             f"to extract it anew") from None
    rows = []
    for number, obj in enumerate(data.get("examples", []), start=1):
        where = f"{path} example {number}"
        rows.append((_input_text(obj.get("input"), where, "input"),
                     _references(obj.get("target"), where, "target")))
    return rows


# ---------------------------------------------------------------------------------------------
# Splits


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    seed: int


def split_task(task: Task, *, train: int, validation: int, test: int, seed: int = 0,
               disjoint_tests: bool = False) -> Splits:
    """Shuffle with `seed` (deterministic) and cut into disjoint train / validation / test of these sizes.

    Validation is cut first, then test, then train, so the train size never changes the other two. With
    `disjoint_tests`, the test split is block number `seed` of `test` examples in one fixed order (the task
    shuffled with seed 0), so splits of different seeds never share a test example (independent test sets for
    a study); validation and train are then cut from the other examples, shuffled with `seed`.
    """
    sizes = {"train": train, "validation": validation, "test": test}
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 0:
            raise LoraboundError(f"the {name} size is {size!r}; pass --{name}-size as a whole number >= 0")
    n = len(task.examples)
    asked = train + validation + test
    if asked > n:
        raise LoraboundError(
            f"task {task.name} has {n} examples but train {train} + validation {validation} + test {test} "
            f"= {asked} were asked for; pass smaller --train-size/--validation-size/--test-size")
    order = list(range(n))
    if disjoint_tests:
        if (seed + 1) * test > n:
            raise LoraboundError(
                f"--disjoint-tests takes test block {seed} (the seed) of {test} examples, but task {task.name} has "
                f"{n} examples, room for {n // max(test, 1)} blocks; use seeds 0 to {n // max(test, 1) - 1} or a "
                "smaller --test-size")
        random.Random(0).shuffle(order)
        test_ids = order[seed * test:(seed + 1) * test]
        rest = order[:seed * test] + order[(seed + 1) * test:]
        random.Random(seed).shuffle(rest)
        order = rest[:validation] + test_ids + rest[validation:]
    else:
        random.Random(seed).shuffle(order)
    picked = [task.examples[i] for i in order]
    return Splits(train=picked[validation + test:validation + test + train],
                  validation=picked[:validation],
                  test=picked[validation:validation + test],
                  seed=seed)


def require_nonempty(examples: list[Example], split_name: str) -> list[Example]:
    """Raise if a split a stage needs is empty; return it otherwise."""
    if not examples:
        raise LoraboundError(f"the {split_name} split is empty; pass --{split_name}-size N with N >= 1")
    return examples


def input_fingerprints(examples: list[Example]) -> list[str]:
    """Short hashes of the examples' inputs: enough to prove two splits share no input, without storing data."""
    return sorted(hashlib.sha1(e.input.encode("utf-8")).hexdigest()[:16] for e in examples)


def training_pairs(examples: list[Example]) -> list[tuple[Example, str]]:
    """One (example, reference) pair per reference."""
    return [(ex, ref) for ex in examples for ref in ex.references]


def first_reference_pairs(examples: list[Example]) -> list[tuple[Example, str]]:
    """One (example, first reference) pair per example: the teacher-forcing target for analysis."""
    return [(ex, ex.references[0]) for ex in examples]


# ---------------------------------------------------------------------------------------------
# Tokenising and batching


@dataclass
class Encoded:
    """Token ids for teacher forcing: prompt + " " + target + eos, labels -100 on the prompt."""
    input_ids: list[list[int]]
    labels: list[list[int]]
    n_truncated: int   # target cut to fit max_length
    n_skipped: int     # prompt alone >= max_length: dropped
    indices: list[int] = field(default_factory=list)  # per kept row: its index into the `pairs` given


def encode_pairs(tokenizer, task: Task, pairs: list[tuple[Example, str]], max_length: int) -> Encoded:
    """Tokenise each (example, reference); keep the prompt whole and cut the target's end to fit."""
    if max_length < 2:
        raise LoraboundError(f"--max-length {max_length} is too small; pass at least 2 (a prompt token "
                             f"and a target token)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LoraboundError("the tokenizer has no end-of-sequence token; use a model whose tokenizer defines one")
    out = Encoded(input_ids=[], labels=[], n_truncated=0, n_skipped=0, indices=[])
    longest_prompt = 0
    for index, (example, ref) in enumerate(pairs):
        prompt_ids = list(tokenizer(task.prompt(example), add_special_tokens=True)["input_ids"])
        target_ids = list(tokenizer(" " + ref, add_special_tokens=False)["input_ids"]) + [eos]
        longest_prompt = max(longest_prompt, len(prompt_ids))
        room = max_length - len(prompt_ids)
        if room < 1:
            out.n_skipped += 1
            continue
        if len(target_ids) > room:
            target_ids = target_ids[:room]
            out.n_truncated += 1
        out.input_ids.append(prompt_ids + target_ids)
        out.labels.append([IGNORE_INDEX] * len(prompt_ids) + target_ids)
        out.indices.append(index)
    if pairs and not out.input_ids:
        raise LoraboundError(f"every prompt is longer than --max-length {max_length} tokens "
                             f"(longest: {longest_prompt}); raise --max-length or shorten the template/input")
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor       # (B, T) right-padded with pad_token_id
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor          # (B, T) -100 on prompt and padding
    indices: list[int] = field(default_factory=list)  # row of each sequence in the Encoded given

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.indices)


def by_length(encoded: Encoded, start: int = 0, stop: int | None = None) -> list[int]:
    """Rows start..stop-1, longest first (ties in order): batches of similar lengths, the least padding."""
    rows = range(len(encoded.input_ids))[start:stop]
    return sorted(rows, key=lambda i: -len(encoded.input_ids[i]))


def batches(encoded: Encoded, batch_size: int, pad_token_id: int, *, shuffle_seed: int | None = None,
            order: list[int] | None = None):
    """Yield Batch objects in order, shuffled with the seed, or in the given `order` of rows."""
    if batch_size < 1:
        raise LoraboundError(f"--batch-size {batch_size} is too small; pass at least 1")
    if order is None:
        order = list(range(len(encoded.input_ids)))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(encoded.input_ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for b, i in enumerate(rows):
            n = len(encoded.input_ids[i])
            input_ids[b, :n] = torch.tensor(encoded.input_ids[i], dtype=torch.long)
            attention_mask[b, :n] = 1
            labels[b, :n] = torch.tensor(encoded.labels[i], dtype=torch.long)
        yield Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels, indices=rows)
