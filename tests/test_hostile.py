"""Hostile arguments: every command, driven through the CLI with a table of bad values.

Each case must give exit status 2 and exactly one line on stderr, `error: ...` naming the flag (or the
file and line) at fault, with no traceback; it must create no file outside its --out folder (all paths,
the working folder and LORABOUND_CACHE lie in a temporary folder) and change no input (hashes).
The argument rules themselves are checked property-style with Hypothesis at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorabound.cli import main
from lorabound.errors import LoraboundError
from lorabound.pipeline import DataOptions, GenerationOptions, ModelOptions
from lorabound.training import TrainSettings
from lorabound.validation import RULES, Number, check_arguments

from tiny import tiny_llama, tiny_lora, tiny_tokenizer

COMMANDS = ("train", "analyze", "search", "prune", "evaluate", "run", "demo", "speed")
MODEL_AND_DATA = {"train", "analyze", "search", "evaluate", "run"}
DATA = MODEL_AND_DATA | {"speed"}  # speed reads the test split's prompts
WITH_ADAPTER = {"analyze", "search", "prune", "evaluate", "run", "speed"}
WITH_OUT = {"train", "analyze", "prune", "evaluate", "run", "demo", "speed"}  # search's --out is optional
OVERWRITE = {"train", "analyze", "search", "prune", "evaluate", "run", "demo", "speed"}

# flag -> (commands that take it, bad values). Every numeric flag of every command is here.
NUMERIC = {
    "--validation-size": (DATA | {"demo"}, ["-1", "1.5", "nan", "ten"]),
    "--test-size": (DATA | {"demo"}, ["-1", "1e3"]),
    "--train-size": (DATA | {"demo"}, ["-5"]),
    "--seed": (DATA | {"demo"}, ["-1", str(2**40)]),
    "--max-length": (DATA, ["0", "7", "-64"]),
    "--batch-size": ({"train", "analyze", "search", "run"}, ["0", "-3"]),
    "--generation-batch-size": ({"search", "evaluate", "run"}, ["0"]),
    "--max-new-tokens": ({"search", "evaluate", "run", "demo"}, ["0", "-1"]),
    "--bootstrap": ({"search", "evaluate", "run"}, ["0", "-10", str(10**9)]),
    "--tolerance": ({"search", "run"}, ["nan", "inf", "-1"]),
    "--knee-fraction": ({"search", "run"}, ["0", "1.5", "nan", "-inf"]),
    "--keep-fraction": ({"search", "run"}, ["0", "1.5", "nan", "-inf", "-0.5",
                                            ("0.5", "--keep-fraction applies to --criterion greedy-drop only")]),
    "--boundary": ({"search", "run", "prune", "speed"}, ["-2", "x"]),
    "--batch-sizes": ({"speed"}, ["0", "1,0", "-16", "x", "1.5", "", "nan"]),
    "--new-tokens": ({"speed"}, ["0", "-1", "inf"]),
    "--repeats": ({"speed"}, ["0", "-3"]),
    "--prompt-tokens": ({"speed"}, ["0"]),
    "--boundaries": ({"evaluate", "run"}, ["-5"]),
    "--candidates": ({"search"}, ["-3"]),
    "--epochs": ({"train", "demo"}, ["0", "-1", "inf", "nan"]),
    "--lr": ({"train"}, ["0", "-1e-3", "inf", "nan"]),
    "--warmup": ({"train"}, ["nan", "2", "-0.1"]),
    "--alpha": ({"train"}, ["0", "nan", "inf"]),
    "--dropout": ({"train"}, ["1", "-0.1", "nan"]),
    "--rank": ({"train"}, ["0", "-4"]),
    "--checkpoint-every": ({"train"}, ["0"]),
    "--threads": (set(COMMANDS), ["0", "-2"]),
    "--tensor-parallel-size": ({"search", "evaluate", "run"}, ["0"]),
    "--gpu-memory-utilization": ({"search", "evaluate", "run"}, ["0", "1.5", "nan"]),
    "--max-model-len": ({"search", "evaluate", "run"}, ["0"]),
    "--max-lora-rank": ({"search", "evaluate", "run"}, ["0"]),
    "--max-loras": ({"search", "evaluate", "run"}, ["0"]),
    "--boundary-attention": ({"prune", "evaluate"}, ["-2", "x", "1.5"]),
    "--boundary-mlp": ({"prune", "evaluate"}, ["-2", "nan"]),
    "--boundary-other": ({"prune", "evaluate"}, ["-3"]),
}
# flags naming a path or a text: the empty value, and values naming nothing usable; a (value, expected) pair
# gives the words the refusal must hold where that is not the flag itself
TEXT = {
    "--data": (DATA, ["", " ", ("{missing}", "unknown task")]),
    "--model": (DATA, ["", ("{missing}", "unknown model spec"), ("{adapter}", "not a model folder")]),
    "--adapter": (WITH_ADAPTER, ["", ("{missing}", "adapter folder"), ("{data}", "adapter"),
                                 ("{base}", "not a PEFT adapter folder")]),
    "--out": (WITH_OUT, ["", "{file}/x", "{file}", "/proc/lorabound-x"]),
    "--template": (DATA, ["", ("no placeholder here", "template")]),
    "--input-field": (DATA, ["", ("no_such_field", "no field 'no_such_field'")]),
    "--target-field": (DATA, [""]),
    "--adapters": ({"evaluate"}, ["", ("{missing}", "adapter folder")]),
    "--target-modules": ({"train"}, ["", "nonexistent_proj"]),
    "--dtype": (DATA, ["", ("float64", "unknown dtype")]),
    "--run": ({"speed"}, ["", ("{missing}", "not a folder"), ("{mine}", "has no run.json")]),
    "--prompts": ({"speed"}, ["bogus"]),
    "--device": (MODEL_AND_DATA, ["", ("tpu", "unknown device")]),
    "--criterion": ({"search", "run"}, ["bogus"]),
    "--curves": ({"analyze"}, ["bogus"]),
    "--format": ({"prune"}, ["bogus"]),
    "--layers": ({"prune", "evaluate"}, ["", (",", "not a layer set"), ("3-1", "not a layer set"),
                                         ("x", "not a layer set"), ("-1", "not a layer set"),
                                         ("0-1000000000", "beyond any model")]),
}
# selections the adapter or model cannot have, or given twice: (command, flag, value, words the refusal holds).
# The world's adapter has attention and MLP LoRA on 4 layers; prune's valid arguments already hold --boundary 1.
SELECTIONS = [
    ("evaluate", "--boundary-other", "1", "no LoRA on other modules"),
    ("evaluate", "--layers", "0,9", "layer 9 is outside 0..3"),
    ("evaluate", "--boundary-mlp", "9", "--boundary-mlp 9 is outside -1..3"),
    ("prune", "--layers", "0,2", "--boundary and --layers each say what to keep"),
    ("prune", "--boundary-attention", "2", "--boundary and --boundary-GROUP each say what to keep"),
]
# data files that must be refused naming the line (written by the `world` fixture)
BAD_DATA = {
    "cells.csv": ("input,target\na,b\nc,d,e\n", "line 3 has 3 cells"),
    "short.csv": ("input,target\na,b\nc\n", "line 3 has 1 cell"),
    "header.csv": ("input,target,input\na,b,c\n", "'input' twice"),
    "nul.csv": ("input,target\na\x00,b\n", "line 2 contains a NUL"),
    "bom.csv": ("\ufeff\ufeffinput,target\na,b\n", "line 1 starts with a byte-order mark"),
    "null.jsonl": ('{"input": "a", "target": "b"}\n{"input": null, "target": "b"}\n', "line 2: field 'input' is null"),
    "twice.jsonl": ('{"input": "a", "target": "b", "target": "c"}\n', "line 1 gives the field 'target' twice"),
    "nullref.jsonl": ('{"input": "a", "target": ["b", null]}\n', "line 1: field 'target' holds null"),
    "surrogate.jsonl": ('{"input": "a\\ud800", "target": "b"}\n', "line 1 holds an unpaired surrogate"),
    "broken.jsonl": ('{"input": "a", "target": "b"}\n{"input": \n', "line 2 is not valid JSON"),
    "empty.jsonl": ("\n", "has no rows"),
    "data.txt": ("input,target\n", "unsupported extension"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs (model, adapter, data, template) and a working folder, all inside one temporary folder."""
    root = tmp_path_factory.mktemp("hostile")
    model = tiny_llama()
    model.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    tiny_lora().save_pretrained(root / "adapter")
    tiny_lora(tiny_llama(), target_modules=["q_proj", "v_proj"]).save_pretrained(root / "adapter-attention")
    rows = [{"input": f"name: Place {i}, area: riverside", "target": f"Place {i} is by the river."} for i in range(20)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "template.txt").write_text("Describe: {input}\nText:", encoding="utf-8")
    (root / "a-file").write_text("not a folder")
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("the user's own folder")
    (root / "work").mkdir()
    (root / "work" / "draft.txt").write_text("the user's working folder")
    (root / "link").symlink_to(root / "mine")
    for name, (content, _) in BAD_DATA.items():
        (root / "bad").mkdir(exist_ok=True)
        (root / "bad" / name).write_text(content, encoding="utf-8")
    return SimpleNamespace(root=root, base=root / "base", adapter=root / "adapter", data=root / "data.jsonl",
                           template=root / "template.txt")


def valid_args(world, command: str, out: Path) -> list[str]:
    """Arguments the command accepts (each test case then spoils one of them)."""
    args = {"prune": ["--adapter", world.adapter, "--boundary", 1], "demo": []}.get(command)
    if args is None:
        args = ["--model", world.base, "--data", world.data, "--template", world.template,
                "--validation-size", 4, "--test-size", 3, "--max-length", 64]
        if command in WITH_ADAPTER:
            args += ["--adapter", world.adapter]
        if command == "speed":
            args += ["--boundary", 1]
    return [command, *map(str, args), "--out", str(out)]


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with `flag` set to `value` (replacing its value if already there)."""
    if flag in args:
        i = args.index(flag)
        return args[:i + 1] + [value] + args[i + 2:]
    return args + [flag, value]


def cases() -> list:
    table = []
    for flag, (commands, values) in {**NUMERIC, **TEXT}.items():
        for command in COMMANDS:
            for value, expected in (v if isinstance(v, tuple) else (v, flag) for v in values):
                if command in commands:
                    table.append(pytest.param(command, flag, value, expected, id=f"{command} {flag}={value!r}"))
    for command, flag, value, expected in SELECTIONS:
        table.append(pytest.param(command, flag, value, expected, id=f"{command} {flag}={value!r} (selection)"))
    for command in DATA:
        for name, (_, expected) in BAD_DATA.items():
            table.append(pytest.param(command, "--data", f"{{bad}}/{name}", expected, id=f"{command} --data {name}"))
    for command in COMMANDS:
        table += [
            pytest.param(command, "--no-such-flag", "1", "unrecognized arguments", id=f"{command} unknown flag"),
            pytest.param(command, "--out", "{work}", "working folder", id=f"{command} --out . --overwrite"),
            pytest.param(command, "--out", "{mine}", "not written by lorabound", id=f"{command} --out user folder"),
            pytest.param(command, "--out", "{link}", "symbolic link", id=f"{command} --out symlink --overwrite"),
        ]
    table += [pytest.param(c, "", "", "required", id=f"{c} missing required") for c in COMMANDS if c != "demo"]
    return sorted(table, key=lambda p: COMMANDS.index(p.values[0]))


CASES = cases()


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root (links not followed), by relative path."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def unexpected(name: str):
    def reached(*args, **kwargs):
        raise AssertionError(f"a hostile case reached {name}")
    return reached


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(["--quiet", *argv])
    except SystemExit as stop:  # argparse
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command,flag,value,expected", CASES)
def test_hostile_argument_is_refused_in_one_line(command, flag, value, expected, world, tmp_path, capsys,
                                                   monkeypatch):
    monkeypatch.setenv("LORABOUND_CACHE", str(world.root / "cache"))
    monkeypatch.chdir(world.root / "work")
    for slow in ("lorabound.data._fetch_builtin_tasks", "lorabound.model.loading.embedded_gguf_path"):
        monkeypatch.setattr(slow, unexpected(slow))  # every case must be refused before such work
    out = tmp_path / "out"
    places = {"missing": world.root / "missing.jsonl", "data": world.data, "file": world.root / "a-file",
              "adapter": world.adapter, "base": world.base,
              "bad": world.root / "bad", "work": world.root / "work", "mine": world.root / "mine",
              "link": world.root / "link"}
    value = value.format(**{k: str(v) for k, v in places.items()})
    args = valid_args(world, command, out)
    if flag == "":  # a required flag left out
        args = args[:1]
    elif flag == "--out" and value in (str(places["work"]), str(places["mine"]), str(places["link"])):
        args = with_flag(args, flag, value) + ["--overwrite"]
    elif flag == "--no-such-flag":
        args = args + [flag, value]
    else:
        args = with_flag(args, flag, value)
    assert_refused(args, expected, command, world, out, capsys)


# Refusals that need two flags together (the selection searches); each is checked like a table case.
PAIRS = [
    ("search", ["--criterion", "greedy-drop", "--keep-fraction", "0.01"], "keeps fewer LoRA parameters than any one"),
    ("run", ["--criterion", "greedy-drop", "--keep-fraction", "0.01"], "keeps fewer LoRA parameters than any one"),
    ("search", ["--criterion", "greedy-drop", "--keep-fraction", "0.5", "--tolerance", "1"], "two ways to stop"),
    ("run", ["--criterion", "greedy-drop", "--keep-fraction", "0.5", "--tolerance", "1"], "two ways to stop"),
    ("search", ["--criterion", "per-module", "--adapter", "{root}/adapter-attention"], "no LoRA on mlp modules"),
    ("run", ["--criterion", "per-module", "--adapter", "{root}/adapter-attention"], "no LoRA on mlp modules"),
    ("search", ["--criterion", "greedy-drop", "--goal", "size"], "--goal applies to --criterion auto or per-module"),
    ("search", ["--criterion", "greedy-drop", "--candidates", "1"], "--candidates lists boundaries"),
]


@pytest.mark.parametrize("command,flags,expected", PAIRS, ids=[f"{c} {' '.join(f)}" for c, f, _ in PAIRS])
def test_selection_search_refusals_are_one_line(command, flags, expected, world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORABOUND_CACHE", str(world.root / "cache"))
    monkeypatch.chdir(world.root / "work")
    for slow in ("lorabound.data._fetch_builtin_tasks", "lorabound.model.loading.embedded_gguf_path"):
        monkeypatch.setattr(slow, unexpected(slow))
    out = tmp_path / "out"
    args = valid_args(world, command, out)
    for flag, value in zip(flags[::2], flags[1::2]):
        args = with_flag(args, flag, value.format(root=world.root))
    assert_refused(args, expected, command, world, out, capsys)


def assert_refused(args: list[str], expected: str, command: str, world, out: Path, capsys) -> None:
    before = snapshot(world.root)

    code, stdout, stderr = run_cli(args, capsys)

    assert code == 2, (args, stdout, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr and ";" in lines[0], lines[0]  # what is wrong; how to fix it
    assert expected in lines[0], (expected, lines[0])
    assert snapshot(world.root) == before  # inputs unchanged, and nothing new beside them
    assert not out.exists() or command == "run"  # a refused run may keep its settings (run.json) only
    if out.exists():
        assert {p.name for p in out.iterdir()} <= {".lorabound", ".lorabound.lock", "run.json"}


def test_the_table_covers_every_command_and_is_large():
    """The README's count: the table runs each command, and every numeric flag of each command's parser."""
    from lorabound.cli import build_parser

    covered = {c.values[0] for c in CASES}
    assert covered == set(COMMANDS)
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command in COMMANDS:
        numeric = {a.option_strings[0] for a in sub[command]._actions
                   if a.option_strings and a.type in (int, float)}
        tested = {flag for flag, (commands, _) in NUMERIC.items() if command in commands}
        assert numeric <= tested, (command, numeric - tested)
    assert len(CASES) >= 200, len(CASES)


def test_a_real_process_prints_one_line(world, tmp_path):
    """The same contract from a real process: argparse's own errors and a late refusal."""
    env = {**os.environ, "LORABOUND_CACHE": str(tmp_path / "cache")}
    for argv in (["train", "--epochs", "nan"], ["run", "--model"],
                 valid_args(world, "train", tmp_path / "out") + ["--target-modules", "nonexistent_proj"]):
        done = subprocess.run([sys.executable, "-m", "lorabound.cli", "--quiet", *argv], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path, env=env)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# The rules, property-based
# ---------------------------------------------------------------------------

def refused(**values) -> bool:
    try:
        check_arguments(**values)
    except LoraboundError:
        return True
    return False


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_real_valued_flags_accept_exactly_their_finite_range(x):
    finite = math.isfinite(x)
    assert refused(warmup=x) != (finite and 0 <= x <= 1)
    assert refused(dropout=x) != (finite and 0 <= x < 1)
    assert refused(knee_fraction=x) != (finite and 0 < x <= 1)
    assert refused(keep_fraction=x) != (finite and 0 < x <= 1)
    assert refused(tolerance=x) != (finite and x >= 0)
    for name in ("learning_rate", "epochs", "alpha"):
        assert refused(**{name: x}) != (finite and x > 0), name


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_whole_number_flags_accept_exactly_their_range(n):
    assert refused(batch_size=n) != (n >= 1)
    assert refused(bootstrap=n) != (1 <= n <= 100_000)
    assert refused(boundary=n) != (n >= -1)
    for group in ("attention", "mlp", "other"):
        assert refused(**{f"boundary_{group}": n}) != (n >= -1)
    assert refused(seed=n) != (0 <= n <= 2**32 - 1)
    assert refused(validation_size=n) != (n >= 0)
    assert refused(max_length=n) != (n >= 8)


@settings(max_examples=100, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not float(x).is_integer()))
def test_whole_number_flags_refuse_fractions(x):
    for name, rule in RULES.items():
        if isinstance(rule, Number) and rule.integer:
            assert refused(**{name: x}), name


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=" \t\n\r", max_size=3))
def test_blank_values_are_refused_naming_the_flag(blank):
    for options, field in ((DataOptions, "data"), (DataOptions, "template"), (DataOptions, "input_field"),
                           (ModelOptions, "model"), (ModelOptions, "device")):
        with pytest.raises(LoraboundError, match=f"--{field.replace('_', '-')} is empty"):
            options(**{field: blank})
    with pytest.raises(LoraboundError, match="--out is empty"):
        check_arguments(out=blank)


def test_every_numeric_option_field_has_a_rule():
    """A new numeric field in an options dataclass must get a rule (and so a check) in validation.py."""
    import dataclasses

    for cls in (DataOptions, ModelOptions, GenerationOptions, TrainSettings):
        for f in dataclasses.fields(cls):
            if str(f.type).startswith(("int", "float")):
                assert f.name in RULES, (cls.__name__, f.name)
