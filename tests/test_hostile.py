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
from lorabound.options import TrainSettings
from lorabound.rules import RULES, Number, check_arguments

from tiny import tiny_llama, tiny_lora, tiny_tokenizer

COMMANDS = ("train", "analyze", "search", "prune", "evaluate", "run", "demo", "speed")
MODEL_AND_DATA = {"train", "analyze", "search", "evaluate", "run"}
DATA = MODEL_AND_DATA | {"speed"}  # speed reads the test split's prompts
WITH_ADAPTER = {"analyze", "search", "prune", "evaluate", "run", "speed"}
WITH_OUT = {"train", "analyze", "prune", "evaluate", "run", "demo", "speed"}  # search's --out is optional
OVERWRITE = {"train", "analyze", "search", "prune", "evaluate", "run", "demo", "speed"}

BIG = str(10**12)  # beyond a C int: every whole-number flag has an upper bound (threads, rank, sizes, ...)
# flag -> (commands that take it, bad values). Every numeric flag of every command is here.
NUMERIC = {
    "--validation-size": (DATA | {"demo"}, ["-1", "1.5", "nan", "ten", BIG]),
    "--test-size": (DATA | {"demo"}, ["-1", "1e3", BIG]),
    "--train-size": (DATA | {"demo"}, ["-5", BIG]),
    "--seed": (DATA | {"demo"}, ["-1", str(2**40)]),
    "--max-length": (DATA, ["0", "7", "-64", BIG]),
    "--batch-size": ({"train", "analyze", "search", "run"}, ["0", "-3", BIG]),
    "--generation-batch-size": ({"search", "evaluate", "run"}, ["0", BIG]),
    "--max-new-tokens": ({"search", "evaluate", "run", "demo"}, ["0", "-1", BIG]),
    "--bootstrap": ({"search", "evaluate", "run"}, ["0", "-10", str(10**9)]),
    "--tolerance": ({"search", "run"}, ["nan", "inf", "-1"]),
    "--knee-fraction": ({"search", "run"}, ["0", "1.5", "nan", "-inf"]),
    "--keep-fraction": ({"search", "run"}, ["0", "1.5", "nan", "-inf", "-0.5",
                                            ("0.5", "--keep-fraction applies to --criterion greedy-drop only")]),
    "--boundary": ({"search", "run", "prune", "speed"}, ["-2", "x", BIG]),
    "--batch-sizes": ({"speed"}, ["0", "1,0", "-16", "x", "1.5", "", "nan", BIG]),
    "--new-tokens": ({"speed"}, ["0", "-1", "inf", BIG]),
    "--repeats": ({"speed"}, ["0", "-3", BIG]),
    "--prompt-tokens": ({"speed"}, ["0", BIG]),
    "--boundaries": ({"evaluate", "run"}, ["-5", BIG]),
    "--candidates": ({"search"}, ["-3", BIG]),
    "--epochs": ({"train", "demo"}, ["0", "-1", "inf", "nan", "1e6"]),
    "--lr": ({"train"}, ["0", "-1e-3", "inf", "nan"]),
    "--warmup": ({"train"}, ["nan", "2", "-0.1"]),
    "--alpha": ({"train"}, ["0", "nan", "inf"]),
    "--dropout": ({"train"}, ["1", "-0.1", "nan"]),
    "--rank": ({"train"}, ["0", "-4", BIG]),
    "--checkpoint-every": ({"train"}, ["0", BIG]),
    "--early-stopping": ({"train"}, ["-1", "1.5", BIG]),
    "--eval-every": ({"train"}, ["0", "-2", BIG]),
    "--threads": (set(COMMANDS), ["0", "-2", BIG]),
    "--tensor-parallel-size": ({"search", "evaluate", "run"}, ["0", BIG]),
    "--gpu-memory-utilization": ({"search", "evaluate", "run"}, ["0", "1.5", "nan"]),
    "--max-model-len": ({"search", "evaluate", "run"}, ["0", BIG]),
    "--max-lora-rank": ({"search", "evaluate", "run"}, ["0", BIG]),
    "--max-loras": ({"search", "evaluate", "run"}, ["0", BIG]),
    "--boundary-attention": ({"prune", "evaluate"}, ["-2", "x", "1.5", BIG]),
    "--boundary-mlp": ({"prune", "evaluate"}, ["-2", "nan", BIG]),
    "--boundary-other": ({"prune", "evaluate"}, ["-3", BIG]),
}
# flags naming a path or a text: the empty value, and values naming nothing usable; a (value, expected) pair
# gives the words the refusal must hold where that is not the flag itself
TEXT = {
    "--data": (DATA, ["", " ", ("{missing}", "unknown task")]),
    "--model": (DATA, ["", ("{missing}", "unknown model spec"), ("{adapter}", "not a model folder")]),
    "--adapter": (WITH_ADAPTER, ["", ("{missing}", "adapter folder"), ("{data}", "adapter"),
                                 ("{base}", "not a PEFT adapter folder")]),
    "--out": (WITH_OUT, ["", "{file}/x", "{file}", "/proc/lorabound-x", ("{work}/" + "n" * 300, "shorter name"),
                         ("{work}/" + "/".join(["d" * 200] * 25), "shorter path"),
                         ("{work}/" + "é" * 120, "shorter name")]),  # 240 bytes: no room for .NAME.tmp-PID-*
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
    claimed_by_hand(root)
    hostile_models(root)
    for name, (content, _) in BAD_DATA.items():
        (root / "bad").mkdir(exist_ok=True)
        (root / "bad" / name).write_text(content, encoding="utf-8")
    return SimpleNamespace(root=root, base=root / "base", adapter=root / "adapter", data=root / "data.jsonl",
                           template=root / "template.txt")


LONG_AGO = 1_600_000_000  # 2020: when the user's files were last changed


def claimed_by_hand(root: Path) -> None:
    """Folders of the user's own files beside the marker of an unfinished lorabound command: one marker written
    there, one copied in with its old times kept (cp -p), one beside a subfolder of the user's."""
    unfinished = json.dumps({"written_by": "lorabound", "finished": False})
    for name in ("claimed", "claimed-old-marker", "claimed-subfolder"):
        folder = root / name
        (folder / "mine").mkdir(parents=True)
        (folder / "mine" / "thesis.tex").write_text("the user's own file")
        if name != "claimed-subfolder":
            (folder / "notes.txt").write_text("the user's own notes")
            os.utime(folder / "notes.txt", (LONG_AGO, LONG_AGO))
        os.utime(folder / "mine" / "thesis.tex", (LONG_AGO, LONG_AGO))
        os.utime(folder / "mine", (LONG_AGO, LONG_AGO))
        (folder / ".lorabound").write_text(unfinished)
        if name == "claimed-old-marker":
            os.utime(folder / ".lorabound", (LONG_AGO - 10, LONG_AGO - 10))


# model folders transformers would fail on with a traceback: config.json edits of the tiny base model
CONFIG_EDITS = {"zero-heads": {"num_attention_heads": 0}, "no-layers": {"num_hidden_layers": 0},
                "negative-vocab": {"vocab_size": -5}, "text-size": {"hidden_size": "32"},
                "zero-kv-heads": {"num_key_value_heads": 0}}


def hostile_models(root: Path) -> None:
    """The model folders of MODELS: bad config sizes, a small vocabulary, a config with a BOM, a GPT-2 of 16
    positions (and an adapter for it)."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    for name, edit in CONFIG_EDITS.items():
        shutil.copytree(root / "base", root / name)
        config = json.loads((root / name / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps({**config, **edit}))
    shutil.copytree(root / "base", root / "bom-config")
    (root / "bom-config" / "config.json").write_text("\ufeff" + (root / "base" / "config.json").read_text())
    tiny_llama(vocab_size=100).save_pretrained(root / "small-vocab")
    tiny_tokenizer().save_pretrained(root / "small-vocab")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=1, eos_token_id=1, pad_token_id=0))
    gpt2.save_pretrained(root / "gpt2-16")
    tiny_tokenizer().save_pretrained(root / "gpt2-16")
    tiny_lora(gpt2, target_modules=["c_attn"]).save_pretrained(root / "adapter-gpt2")


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
                    shown = repr(value) if len(value) < 60 else repr(value[:40] + "...")
                    table.append(pytest.param(command, flag, value, expected, id=f"{command} {flag}={shown}"))
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
        # never delete what lorabound did not write: without --overwrite, a folder of the user's files beside
        # an unfinished marker is refused (run and demo resume only a folder of their own settings)
        for name in ("claimed", "claimed-old-marker", "claimed-subfolder"):
            words = "is not empty" if command in ("run", "demo") else "did not write, so it will not be deleted"
            if command in WITH_OUT:
                table.append(pytest.param(command, "--out", f"{{{name}}}", words, id=f"{command} --out {name}"))
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
              "link": world.root / "link", **{n: world.root / n for n in
                                                ("claimed", "claimed-old-marker", "claimed-subfolder")}}
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


# Models that would end in a traceback: (commands, flags, words the refusal holds). GPT-2 with 16 positions:
# teacher forcing up to --max-length (64 here) and generation (14-token prompts + 64 new tokens) run past its table.
GPT2 = ["--model", "{root}/gpt2-16", "--adapter", "{root}/adapter-gpt2"]
MODELS = [
    *[(MODEL_AND_DATA, ["--model", f"{{root}}/{name}"], f"{next(iter(edit))} = {json.dumps(next(iter(edit.values())))}"
       " in its config.json") for name, edit in CONFIG_EDITS.items()],
    (MODEL_AND_DATA, ["--model", "{root}/bom-config"], "starts with a byte-order mark"),
    (MODEL_AND_DATA, ["--model", "{root}/small-vocab"], "embedding table of 100 tokens but its tokenizer has 320"),
    (MODEL_AND_DATA - {"evaluate"}, GPT2, "--max-length 64 is more than the 16 positions of model"),
    ({"search", "evaluate", "run"}, GPT2 + ["--max-length", "16"], "with --max-new-tokens 64 generation would run"),
    # speed loads the model in a worker: the position table is read from the config before it starts
    ({"speed"}, GPT2 + ["--boundary", "0"], "with --new-tokens 32 generation would run past the 16 positions"),
    ({"speed"}, GPT2 + ["--boundary", "0", "--prompts", "synthetic", "--prompt-tokens", "12", "--new-tokens", "8"],
     "the longest synthetic prompt is 12 tokens, and with --new-tokens 8"),
    (MODEL_AND_DATA, ["--model", "nobody-lorabound/no-such-model"], "set HF_HUB_OFFLINE=0 to download it"),
]
MODEL_CASES = [pytest.param(command, flags, words, id=f"{command} {' '.join(flags[:2])} {words[:30]}")
               for commands, flags, words in MODELS for command in sorted(commands)]


@pytest.mark.parametrize("command,flags,expected", MODEL_CASES)
def test_a_model_that_would_crash_is_refused_in_one_line(command, flags, expected, world, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setenv("LORABOUND_CACHE", str(world.root / "cache"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)  # lorabound's default (offline) is what is tested
    monkeypatch.chdir(world.root / "work")
    out = tmp_path / "out"
    args = valid_args(world, command, out)
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag != "--adapter" or command in WITH_ADAPTER:
            args = with_flag(args, flag, value.format(root=world.root))
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
    """docs/inputs.md's count: the table runs each command, and every numeric flag of each command's parser."""
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


def test_speed_room_is_checked_against_the_position_table_and_only_it(world):
    """Prompts plus --new-tokens that fit the 16 positions pass; one token more is refused; a rotary model (no
    table) is never refused, whatever the lengths."""
    from lorabound.timing import SpeedSettings, check_speed_room

    gpt2 = ModelOptions(model=str(world.root / "gpt2-16"))
    check_speed_room(gpt2, (), SpeedSettings(prompts="synthetic", prompt_tokens=8, new_tokens=8))
    with pytest.raises(LoraboundError, match="the longest synthetic prompt is 9 tokens"):
        check_speed_room(gpt2, (), SpeedSettings(prompts="synthetic", prompt_tokens=9, new_tokens=8))
    check_speed_room(ModelOptions(model=world.base), (), SpeedSettings(prompts="synthetic", prompt_tokens=4096,
                                                                        new_tokens=4096))


def test_a_real_process_prints_one_line(world, tmp_path):
    """The same contract from a real process, where nothing catches library warnings or log records: argparse's
    own errors, late refusals, a refusal after PEFT warned (GPT-2's Conv1D), a hub id with no network (refused
    offline, without the hub client's retries), a config transformers would divide by zero with."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["LORABOUND_CACHE"] = str(tmp_path / "cache")
    analyze = valid_args(world, "analyze", tmp_path / "out")
    gpt2 = with_flag(with_flag(analyze, "--model", str(world.root / "gpt2-16")), "--adapter",
                     str(world.root / "adapter-gpt2"))
    for argv, words in (
            (["train", "--epochs", "nan"], "required: --out"), (["run", "--model"], "expected one argument"),
            (valid_args(world, "train", tmp_path / "out") + ["--target-modules", "nonexistent_proj"], "nonexistent"),
            (gpt2, "--max-length 64 is more than the 16 positions"),
            (with_flag(analyze, "--model", "nobody-lorabound/no-such-model"), "set HF_HUB_OFFLINE=0"),
            (with_flag(analyze, "--model", str(world.root / "zero-heads")), "num_attention_heads = 0"),
            (["--threads", BIG] + analyze, f"--threads {BIG} is out of range"),
            (with_flag(analyze, "--adapter", "a" * 300), "pass a shorter --adapter")):
        done = subprocess.run([sys.executable, "-m", "lorabound.cli", "--quiet", *argv], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path, env=env)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
        assert words in done.stderr, (words, done.stderr)
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
    for name in ("learning_rate", "alpha"):
        assert refused(**{name: x}) != (finite and x > 0), name
    assert refused(epochs=x) != (finite and 0 < x <= 10_000)


C_INT = 2**31 - 1  # what torch and numpy take as a C int


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(min_value=-(2**70), max_value=2**70),
                 st.sampled_from([1023, 1024, 1025, 65_535, 65_536, 65_537, 2**20, 2**20 + 1, C_INT, C_INT + 1,
                                  10**12, 10**15])))
def test_whole_number_flags_accept_exactly_their_range(n):
    assert refused(batch_size=n) != (1 <= n <= 65_536)
    assert refused(bootstrap=n) != (1 <= n <= 100_000)
    assert refused(boundary=n) != (-1 <= n <= C_INT)
    for group in ("attention", "mlp", "other"):
        assert refused(**{f"boundary_{group}": n}) != (-1 <= n <= C_INT)
    assert refused(seed=n) != (0 <= n <= 2**32 - 1)
    assert refused(validation_size=n) != (0 <= n <= C_INT)
    assert refused(max_length=n) != (8 <= n <= 2**20)
    assert refused(max_new_tokens=n) != (1 <= n <= 2**20)
    assert refused(threads=n) != (1 <= n <= 1024)
    assert refused(rank=n) != (1 <= n <= 65_536)


def test_no_whole_number_rule_lets_a_c_int_overflow():
    """Every whole-number rule has an upper bound a C int holds (seeds excepted: numpy takes 32 unsigned bits)."""
    for name, rule in RULES.items():
        if isinstance(rule, Number) and rule.integer:
            assert rule.high is not None and rule.high <= (2**32 - 1 if name == "seed" else C_INT), name
            assert refused(**{name: 10**12}) and refused(**{name: 2**63}), name


def test_every_numeric_flag_of_every_command_has_a_rule():
    """A numeric flag without a rule in validation.py would reach torch unchecked (the study's list flags follow
    the rule of one item: --seeds the seed's, --ranks the rank's)."""
    from lorabound.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    singular = {"seeds": "seed", "ranks": "rank"}
    for command, p in [("lorabound", parser), *sub.items()]:
        for action in p._actions:
            if action.option_strings and action.type in (int, float):
                assert singular.get(action.dest, action.dest) in RULES, (command, action.option_strings)


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


@pytest.mark.real
def test_the_real_model_passes_the_checks_that_refuse_crashing_models(real_model, capsys):
    """The embedded SmolLM2 (loaded through load_model, so its config, vocabulary and heads were checked) has
    rotary positions, no learned table: no --max-length or --max-new-tokens is refused for it."""
    from lorabound.model import check_sequence_room, position_limit, resolve_model_dir
    from lorabound.model.loading import check_config_file

    model, tokenizer = real_model
    assert position_limit(model) is None
    assert len(tokenizer) <= model.get_input_embeddings().num_embeddings
    check_config_file(Path(resolve_model_dir("smollm2-135m")) / "config.json", "smollm2-135m")
    check_sequence_room(model, "smollm2-135m", tokenizer, max_length=2**20, max_new_tokens=2**20,
                        prompts={"test": ["Describe the restaurant.\nData: name: The Eagle\nText:"]})
