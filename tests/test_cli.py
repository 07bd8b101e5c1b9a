"""What each command prints, checked against the files it writes; outputs never touching --model; missing
adapters named as missing; skipped examples warned about. Tiny random models saved to tmp folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorabound.runtime.files import folder_hashes
from lorabound.pipeline import check_held_out
from lorabound.errors import LoraboundError
from lorabound.lora.export import AdapterFiles

from clitools import cli, ok, refused
from tiny import tiny_lora, save_tiny_base

TEMPLATE = "Describe: {input}\nText:"


def rows(n: int, long_every: int = 0) -> list[dict]:
    out = []
    for i in range(n):
        text = f"name: Place {i}, area: riverside"
        if long_every and i % long_every == 0:
            text += ", near: " + "the old stone bridge " * 12  # longer than --max-length 64 alone
        out.append({"input": text, "target": [f"Place {i} is by the riverside.", f"By the river is Place {i}."]})
    return out


def write_jsonl(path: Path, data) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_base(root)
    tiny_lora().save_pretrained(root / "adapter")
    write_jsonl(root / "data.jsonl", rows(24))
    w = SimpleNamespace(root=root, base=root / "base", adapter=root / "adapter", data=root / "data.jsonl")
    w.common = ["--model", w.base, "--data", w.data, "--template", TEMPLATE, "--validation-size", 4,
                "--test-size", 4, "--max-length", 64]
    w.gen = ["--max-new-tokens", 4, "--bootstrap", 20]
    return w


def number(text: str) -> float | None:
    return None if text == "-" else float(text.replace(",", ""))


# ---------------------------------------------------------------------------
# Printed output of every command
# ---------------------------------------------------------------------------

def test_train_prints_what_it_saved(capsys, ws, tmp_path):
    out = ok(capsys, "train", *ws.common, "--out", tmp_path / "trained", "--rank", 2, "--epochs", 1,
             "--batch-size", 8)
    params = AdapterFiles.read(tmp_path / "trained").lora_params()
    assert f"saved adapter to {tmp_path / 'trained'} ({params:,} LoRA parameters" in out
    assert "train loss: " in out and "validation loss: " in out


def test_analyze_prints_the_curve_it_wrote(capsys, ws, tmp_path):
    out = ok(capsys, "analyze", *ws.common, "--adapter", ws.adapter, "--out", tmp_path / "an")
    curve = json.loads((tmp_path / "an" / "curves.json").read_text())["truncation"]
    printed = {int(p[0]): [float(x) for x in p[1:]] for p in (line.split() for line in out.splitlines())
               if len(p) == 4 and p[0].lstrip("-").isdigit()}
    assert sorted(printed) == curve["boundary"] == [-1, 0, 1, 2, 3]
    for i, b in enumerate(curve["boundary"]):
        assert printed[b] == pytest.approx([curve["mean_prob"][i], curve["nll"][i], curve["accuracy"][i]], abs=1e-3)
    assert f"wrote {tmp_path / 'an' / 'curves.json'} and plots" in out


def search_rows(out: str) -> dict[int, list[float | None]]:
    """The candidate rows under the header: b -> [mean p, BLEU, ROUGE-L, chrF] (None for '-')."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "mean p(truth)" in line) + 1
    return {int(p[0]): [number(x) for x in p[1:5]] for p in (line.split() for line in lines[start:]) if p}


@pytest.mark.parametrize("criterion", ["auto", "knee", "max-likelihood", "bleu", "rougeL", "chrf"])
def test_search_prints_its_choice_and_candidates(capsys, ws, tmp_path, criterion):
    out = ok(capsys, "search", *ws.common, "--adapter", ws.adapter, "--criterion", criterion, *ws.gen[:2],
             "--out", tmp_path / "s")
    found = json.loads((tmp_path / "s" / "search.json").read_text())
    assert f"boundary b = {found['boundary']} ({found['reason']})" in out
    assert f"({found['kept_fraction']:.1%})" in out
    printed = search_rows(out)
    assert found["boundary"] in printed
    by_b = {c["boundary"]: c for c in found["candidates"]}
    for b, values in printed.items():
        expected = [by_b[b].get(k) for k in ("mean_prob", "bleu", "rougeL", "chrf")]
        assert values == pytest.approx(expected, abs=6e-3), b
    if criterion not in ("knee", "max-likelihood"):  # metric criteria: every generated candidate is shown
        assert {c["boundary"] for c in found["candidates"] if c.get("rougeL") is not None} <= set(printed)


def test_search_with_a_given_boundary_and_no_out_prints_without_a_curve(capsys, ws):
    """Used to be a TypeError traceback: a given b has no mean probability to print."""
    out = ok(capsys, "search", *ws.common, "--adapter", ws.adapter, "--boundary", 2)
    assert "boundary b = 2 (b = 2 was given with --boundary)" in out
    assert search_rows(out) == {2: [None, None, None, None]}


@pytest.mark.parametrize("fmt", ["peft", "zero-fill", "merged"])
def test_prune_prints_sizes_measured_on_disk(capsys, ws, tmp_path, fmt):
    out = ok(capsys, "prune", "--adapter", ws.adapter, "--boundary", 1, "--format", fmt, "--model", ws.base,
             "--out", tmp_path / fmt)
    source = AdapterFiles.read(ws.adapter)
    assert f"LoRA parameters: {source.lora_params():,} -> {source.lora_params(up_to=1):,}" in out
    written = sum(p.stat().st_size for p in (tmp_path / fmt).glob("*.safetensors")) / 1e6
    if fmt == "merged":
        base = sum(p.stat().st_size for p in ws.base.glob("*.safetensors")) / 1e6
        assert f"wrote merged model (float32) with LoRA on layers 0..1 to {tmp_path / fmt}" in out
        assert f"model weights on disk: base model {base:.2f} MB -> merged model {written:.2f} MB" in out
    else:
        before = (ws.adapter / "adapter_model.safetensors").stat().st_size / 1e6
        assert f"wrote {fmt} adapter with LoRA on layers 0..1 to {tmp_path / fmt}" in out
        assert f"adapter weights on disk: {before:.2f} MB -> {written:.2f} MB" in out


def table_rows(out: str) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip().strip("|").split("|")]
                                              for line in out.splitlines() if line.startswith("| "))}


def test_evaluate_prints_its_table_tests_and_signature(capsys, ws, tmp_path):
    out = ok(capsys, "evaluate", *ws.common, "--adapter", ws.adapter, "--boundaries", 1, *ws.gen,
             "--out", tmp_path / "ev")
    result = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    table = table_rows(out)
    assert table["Variant"][-1] == "Where b comes from"
    for row in result["variants"]:
        cells = table[row["name"]]
        assert cells[0] == f"{row['metrics']['bleu']:,.2f}" and cells[1] == f"{row['metrics']['rougeL']:,.2f}"
        assert cells[-1] == row["origin"]
    assert table["pruned (b=1)"][-1] == "asked with --boundaries"
    assert table["base model"][-1] == "reference: no adapter"
    for test in result["significance"]:
        assert test["sentence"] in out
    assert f"BLEU signature: {result['bleu_signature']}" in out


def test_run_prints_table_verdict_and_report_path(capsys, ws, tmp_path):
    out = ok(capsys, "run", *ws.common, "--adapter", ws.adapter, "--boundary", 3, *ws.gen, "--out", tmp_path / "r")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["verdict"] in out
    assert f"report: {tmp_path / 'r' / 'report.html'}" in out
    table = table_rows(out)
    for row in report["variants"]:
        assert table[row["name"]][-1] == row["origin"]
    assert table["full adapter"][-1].startswith("given with --boundary")


# ---------------------------------------------------------------------------
# --out never is, holds or lies inside --model, --overwrite or not
# ---------------------------------------------------------------------------

def model_commands(ws, model: Path, out: Path) -> dict[str, list]:
    common = ["--model", model, *ws.common[2:]]
    adapter = ["--adapter", ws.adapter]
    return {
        "train": ["train", *common, "--epochs", 1, "--rank", 2, "--out", out],
        "analyze": ["analyze", *common, *adapter, "--out", out],
        "search": ["search", *common, *adapter, "--criterion", "knee", "--out", out],
        "evaluate": ["evaluate", *common, *adapter, *ws.gen, "--out", out],
        "run": ["run", *common, *adapter, "--boundary", 1, *ws.gen, "--out", out],
        "prune": ["prune", *adapter, "--boundary", 1, "--format", "merged", "--model", model, "--out", out],
    }


@pytest.mark.parametrize("command", ["train", "analyze", "search", "evaluate", "run", "prune"])
def test_out_that_is_holds_or_lies_inside_the_model_is_refused(capsys, ws, tmp_path, command):
    model = tmp_path / "models" / "base"
    shutil.copytree(ws.base, model)
    before = folder_hashes(tmp_path / "models")
    for out in (model, model.parent, model / "inside"):
        line = refused(capsys, *model_commands(ws, model, out)[command], "--overwrite")
        assert f"--out {out} is, holds or lies inside the input {model}" in line, line
        assert folder_hashes(tmp_path / "models") == before
        assert not (model / "inside").exists()


def test_out_holding_the_converted_embedded_model_is_refused(capsys, ws, tmp_path, monkeypatch):
    """`--model smollm2-135m` reads its converted folder in the cache: an --out holding it is refused too."""
    monkeypatch.setenv("LORABOUND_CACHE", str(tmp_path / "cache"))
    converted = tmp_path / "cache" / "models" / "smollm2-135m"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    line = refused(capsys, "prune", "--adapter", ws.adapter, "--boundary", 1, "--format", "merged",
                   "--model", "smollm2-135m", "--out", tmp_path / "cache" / "models", "--overwrite")
    assert "is, holds or lies inside the input" in line
    assert (converted / "config.json").read_text() == "{}"


# ---------------------------------------------------------------------------
# A missing adapter is named as missing; skipped examples are warned about
# ---------------------------------------------------------------------------

def test_missing_adapter_folder_is_said_not_to_exist(capsys, ws, tmp_path):
    missing = tmp_path / "no-such-adapter"
    commands = [
        ["analyze", *ws.common, "--adapter", missing, "--out", tmp_path / "a"],
        ["search", *ws.common, "--adapter", missing, "--criterion", "knee"],
        ["evaluate", *ws.common, "--adapter", missing, "--out", tmp_path / "e"],
        ["evaluate", *ws.common, "--adapter", ws.adapter, "--adapters", missing, "--out", tmp_path / "e2"],
        ["run", *ws.common, "--adapter", missing, "--out", tmp_path / "r"],
        ["prune", "--adapter", missing, "--boundary", 1, "--out", tmp_path / "p"],
        ["prune", "--adapter", missing, "--boundary", 1, "--format", "merged", "--model", ws.base,
         "--out", tmp_path / "m"],
    ]
    for args in commands:
        line = refused(capsys, *args)
        assert f"adapter folder {missing} does not exist" in line, (args[0], line)
        assert "adapter_config.json" not in line
    with pytest.raises(LoraboundError, match="does not exist"):
        check_held_out(missing, None)


@pytest.fixture(scope="module")
def long_data(ws):
    return write_jsonl(ws.root / "long.jsonl", rows(24, long_every=3))


@pytest.mark.parametrize("command", ["analyze", "search"])
def test_skipped_validation_examples_are_warned_about(capsys, ws, tmp_path, long_data, command):
    common = [a if a != ws.data else long_data for a in ws.common]
    extra = ["--criterion", "knee"] if command == "search" else []
    code, _, err = cli(capsys, command, *common, "--adapter", ws.adapter, *extra, "--out", tmp_path / "o")
    assert code == 0, err
    curves = json.loads((tmp_path / "o" / "curves.json").read_text())["meta"]
    assert curves["n_skipped"] > 0
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, err
    total = curves["n_skipped"] + curves["n_examples"]
    assert f"{curves['n_skipped']} of {total} validation examples were skipped" in warnings[0]
    assert "--max-length 64" in warnings[0]


def test_no_warning_when_nothing_was_skipped(capsys, ws, tmp_path):
    code, _, err = cli(capsys, "analyze", *ws.common, "--adapter", ws.adapter, "--out", tmp_path / "o")
    assert code == 0 and "warning:" not in err


def test_help_imports_no_torch():
    """`lorabound --help` and every `lorabound COMMAND --help` build the parser from the option dataclasses alone:
    torch, transformers and PEFT stay unimported (checked in a fresh process)."""
    import subprocess
    import sys

    code = ("import contextlib, io, sys\n"
            "from lorabound.cli import main\n"
            "for argv in [['--help']] + [[c, '--help'] for c in ('train', 'analyze', 'search', 'prune', 'evaluate', "
            "'run', 'demo', 'study', 'speed')]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            main(argv)\n"
            "        except SystemExit as exit:\n"
            "            assert exit.code == 0, (argv, exit.code)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]"]
