"""The study command: grid parsing and refusals, cells in a fixed order, resuming, failed cells, pooled statistics,
the report in a real browser, and one real-model cell."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from dataclasses import fields

import numpy as np
import pytest
from scipy import stats
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from lorabound import pipeline
from lorabound.cli import main
from lorabound.errors import LoraboundError
from lorabound.options import DataOptions, GenerationOptions
from lorabound.studies import Training, adopt_cells, bootstrap_mean, check_grid, grid_from_dict, holm, load_grid, pool, study
from lorabound.studies import pooling, render
from lorabound.rules import check_arguments

from test_report import chromium_binary, run_chromium
from tiny import save_tiny_base


def _rows(place: str, n: int = 30) -> str:
    return "".join(json.dumps({"input": f"name: {place} {i}, area: riverside",
                               "target": [f"{place} {i} is by the riverside.", f"By the river is {place} {i}."]}) + "\n"
                   for i in range(n))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model folder and two JSONL tasks."""
    root = tmp_path_factory.mktemp("study")
    save_tiny_base(root)
    (root / "places.jsonl").write_text(_rows("Place"))
    (root / "inns.jsonl").write_text(_rows("Inn"))
    return root


def tiny_grid(root, **changes) -> dict:
    grid = {"models": [str(root / "base")], "tasks": [str(root / "places.jsonl")], "seeds": [0, 1],
            "training": [{"name": "short", "epochs": 1, "rank": 4, "learning_rate": 5e-3, "batch_size": 4}],
            "data": {"train_size": 12, "validation_size": 4, "test_size": 6, "max_length": 64},
            "generation": {"max_new_tokens": 4}, "search": {"criterion": "rougeL"}, "bootstrap": 50}
    return {**grid, **changes}


@pytest.fixture(scope="module")
def finished(workspace):
    """A 2-cell study with a transfer task, run once."""
    grid = grid_from_dict(tiny_grid(workspace, transfer=str(workspace / "inns.jsonl")))
    out = workspace / "first"
    return out, grid, study(out, grid, progress=False)


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------

def test_adopted_cells_are_pooled_not_rerun(finished, tmp_path):
    """adopt_cells: the cells of a finished study, copied into a new folder, pool to the original's numbers without
    running again; copied for a grid with one more seed, they are kept while only the new seed's cell runs.
    A cell of another grid, or a folder in use, is refused before anything is copied."""
    out, grid, summary = finished
    copied = adopt_cells(tmp_path / "same", grid, out)
    assert copied == sorted(c.id for c in grid.cells())
    again = study(tmp_path / "same", grid, progress=False)
    assert again["pooled"] == summary["pooled"] and again["test_curve"] == summary["test_curve"]
    assert {r["id"]: r["seconds"] for r in again["cells"]} == {r["id"]: r["seconds"] for r in summary["cells"]}
    root = Path(grid.models[0]).parent
    more = grid_from_dict(tiny_grid(root, transfer=grid.transfer, seeds=[0, 1, 2]))
    adopt_cells(tmp_path / "more", more, out)
    grown = study(tmp_path / "more", more, progress=False)
    seconds = {r["id"]: r["seconds"] for r in grown["cells"]}
    assert [r["status"] for r in grown["cells"]] == ["ok"] * 3 and "train" in seconds["base-places-short-s2"]
    assert all(seconds[r["id"]] == r["seconds"] for r in summary["cells"])  # the adopted cells did not run again
    other = grid_from_dict(tiny_grid(root, transfer=grid.transfer, seeds=[1]))
    with pytest.raises(LoraboundError, match="not a cell of this grid"):
        adopt_cells(tmp_path / "other", other, out)
    assert not (tmp_path / "other").exists()
    with pytest.raises(LoraboundError, match="is not empty"):
        adopt_cells(tmp_path / "same", grid, out)


def test_grid_file_and_flags(tmp_path):
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text('tasks = ["e2e", "webnlg"]\nseeds = [3, 1]\n\n[[training]]\nname = "long"\nepochs = 4\n'
                         'rank = 8\n\n[data]\ntest_size = 30\n\n[data.webnlg]\nmax_length = 128\n')
    grid = load_grid(grid_file)
    assert [t.name for t in grid.training] == ["long"] and grid.training[0].settings(0, 64).alpha == 16.0
    assert grid.data_options("webnlg", 1).max_length == 128 and grid.data_options("e2e", 1).max_length == 256
    assert grid.data_options("e2e", 3).test_size == 30 and grid.data_options("e2e", 3).seed == 3
    # Fixed order: models > tasks > training > seeds, seeds in the order given.
    assert [c.id for c in grid.cells()] == ["smollm2-135m-e2e-long-s3", "smollm2-135m-e2e-long-s1",
                                           "smollm2-135m-webnlg-long-s3", "smollm2-135m-webnlg-long-s1"]
    # Flags override the file; epochs x ranks replace its [[training]] tables.
    grid = load_grid(grid_file, epochs=[1, 5], ranks=[8, 16], test_size=10, max_new_tokens=20, criterion="knee")
    assert [(t.name, t.epochs, t.rank) for t in grid.training] == [("e1-r8", 1, 8), ("e1-r16", 1, 16),
                                                                    ("e5-r8", 5, 8), ("e5-r16", 5, 16)]
    assert grid.data_options("e2e", 0).test_size == 10 and grid.generation_options().max_new_tokens == 20
    assert grid.search_settings().criterion == "knee" and len(grid.cells()) == 16


def test_a_task_can_have_its_own_seeds():
    """seeds_by_task gives one task more seeds than the grid's `seeds` (e.g. WebNLG holds more disjoint test blocks
    than E2E); the other tasks keep `seeds`, and the cells keep the order models > tasks > training > seeds."""
    grid = grid_from_dict({"tasks": ["webnlg", "e2e"], "seeds": [0, 1], "seeds_by_task": {"webnlg": [0, 1, 2]},
                           "training": [{"name": "t"}]})
    assert [(c.task, c.seed) for c in grid.cells()] == [("webnlg", 0), ("webnlg", 1), ("webnlg", 2), ("e2e", 0),
                                                        ("e2e", 1)]
    assert grid.seeds_of("e2e") == [0, 1] and grid.seeds_of("webnlg") == [0, 1, 2]
    # --seeds on the command line is every task's: `--seeds 7` runs seed 7 only, not WebNLG's own list as well.
    flags = load_grid(Path(__file__).parent.parent / "studies" / "powered.toml", seeds=[7])
    assert {c.seed for c in flags.cells()} == {7} and flags.seeds_by_task == {}
    # A table for a task the grid does not run is refused before any work (check_grid, like [data.TASK]).
    stray = grid_from_dict({"tasks": ["e2e"], "seeds_by_task": {"webnlg": [4]}})
    with pytest.raises(LoraboundError, match="seeds_by_task.webnlg names no task of the grid"):
        check_grid(stray)


@pytest.mark.parametrize("values, message", [
    ({"modles": ["x"]}, "unknown key 'modles'"),
    ({"training": [{"name": "a"}], "epochs": [1]}, "both [[training]] tables and epochs/ranks"),
    ({"training": [{"name": "a"}, {"name": "a"}]}, "training names repeat"),
    ({"training": [{"name": "a", "lr": 1}]}, "unknown key 'lr'"),
    ({"training": [{"name": "a/b"}]}, "must be letters"),
    ({"seeds": [0, 0]}, "lists a value twice"),
    ({"seeds": ["0"]}, "seeds must be a non-empty list"),
    ({"tasks": []}, "tasks must be a non-empty list"),
    ({"data": {"test_sise": 3}}, "unknown key 'test_sise' in [data]"),
    ({"data": {"e2e": {"seed": 3}}}, "unknown key 'seed' in [data.e2e]"),
    ({"generation": {"beams": 3}}, "unknown key 'beams' in [generation]"),
    ({"bootstrap": 0}, "bootstrap = 0 in the grid is out of range"),
    ({"data": {"train_size": "16"}}, "train_size = '16' in [data] must be int"),
    ({"data": {"xsum": {"max_length": 5.5}}}, "max_length = 5.5 in [data.xsum] must be int"),
    ({"training": [{"name": "a", "epochs": "4"}]}, "epochs = '4' in [[training]] 'a' must be float"),
    ({"search": {"tolerance": "1"}}, "tolerance = '1' in [search] must be float"),
    ({"seeds_by_task": [0, 1]}, "seeds_by_task must be a table of task = [seeds]"),
    ({"seeds_by_task": {"e2e": [1, 1]}}, "seeds_by_task.e2e lists a value twice"),
    ({"seeds_by_task": {"e2e": []}}, "seeds_by_task.e2e must be a non-empty list"),
])
def test_grid_refusals(values, message):
    with pytest.raises(LoraboundError) as refused:
        grid_from_dict(values)
    assert message in str(refused.value)


# A grid file's values go through the rule table of the flags (validation.py): each is refused by grid_from_dict,
# before any model, data or cell, naming the key and its table.
HOSTILE_GRIDS = [
    ({"search": {"tolerance": float("nan")}}, "tolerance = nan in [search] is out of range"),
    ({"search": {"tolerance": float("inf")}}, "tolerance = inf in [search]"),
    ({"search": {"knee_fraction": 0.0}}, "knee_fraction = 0.0 in [search]"),
    ({"bootstrap": 10**9}, "bootstrap = 1000000000 in the grid is out of range"),
    ({"bootstrap": -5}, "bootstrap = -5 in the grid"),
    ({"generation": {"engine": "onnx"}}, "engine = 'onnx' in [generation] is unknown; choose one of hf, vllm"),
    ({"generation": {"max_new_tokens": 0}}, "max_new_tokens = 0 in [generation]"),
    ({"generation": {"generation_batch_size": 10**12}}, "generation_batch_size = 1000000000000 in [generation]"),
    ({"training": [{"name": "a", "rank": 10**12}]}, "rank = 1000000000000 in [[training]] 'a'"),
    ({"training": [{"name": "a", "epochs": float("nan")}]}, "epochs = nan in [[training]] 'a'"),
    ({"training": [{"name": "a", "learning_rate": float("inf")}]}, "learning_rate = inf in [[training]] 'a'"),
    ({"training": [{"name": "a", "alpha": 0.0}]}, "alpha = 0.0 in [[training]] 'a'"),
    ({"training": [{"name": "a", "batch_size": 0}]}, "batch_size = 0 in [[training]] 'a'"),
    ({"ranks": [4, 10**12]}, "ranks = 1000000000000 in the grid"),
    ({"epochs": [1.0, float("nan")]}, "epochs = nan in the grid"),
    ({"seeds": [0, -1]}, "seeds = -1 in the grid"),
    ({"seeds": [2**40]}, "seeds = 1099511627776 in the grid"),
    ({"seeds_by_task": {"e2e": [0, -2]}}, "seeds = -2 in seeds_by_task.e2e"),
    ({"data": {"max_length": 10**12}}, "max_length = 1000000000000 in [data]"),
    ({"data": {"test_size": -1}}, "test_size = -1 in [data]"),
    ({"data": {"e2e": {"validation_size": 10**12}}}, "validation_size = 1000000000000 in [data.e2e]"),
    ({"tasks": [""]}, "tasks in the grid is empty"),
]


@pytest.mark.parametrize("values, message", HOSTILE_GRIDS, ids=[m.split(" is ")[0] for _, m in HOSTILE_GRIDS])
def test_grid_values_follow_the_rules_of_the_flags(values, message):
    with pytest.raises(LoraboundError) as refused:
        grid_from_dict(values)
    assert message in str(refused.value)


@settings(max_examples=150, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(min_value=-(2**40), max_value=2**40),
       st.sampled_from([("search", "tolerance"), ("search", "knee_fraction"), ("generation", "max_new_tokens"),
                        ("data", "max_length"), ("data", "validation_size"), ("training", "rank"),
                        ("training", "epochs"), ("training", "learning_rate")]))
def test_a_grid_value_is_refused_exactly_when_its_flag_is(value, place):
    """The grid and the flags share one rule table: the same value, the same verdict (types aside)."""
    table, key = place
    values = {"training": [{"name": "a", key: value}]} if table == "training" else {table: {key: value}}
    kind = {f.name: str(f.type) for f in fields(Training if table == "training" else DataOptions)}.get(key, "float")
    assume(not (kind.startswith("int") and isinstance(value, float)))  # a type error, refused as such
    try:
        grid_from_dict(values)
        grid_refused = False
    except LoraboundError:
        grid_refused = True
    try:
        check_arguments(**{key: value})
        flag_refused = False
    except LoraboundError:
        flag_refused = True
    assert grid_refused == flag_refused, (values, grid_refused)


def test_a_grid_asking_for_vllm_where_it_is_missing_is_refused_before_any_cell(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(LoraboundError, match=re.escape("engine = 'vllm' in [generation] needs vLLM")):
        grid_from_dict({"generation": {"engine": "vllm"}})


def test_study_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as done:
        main(["study", "--help"])
    assert done.value.code == 0
    assert "lorabound study --grid studies/paper.toml" in capsys.readouterr().out.split("example:")[1]


def test_unparsable_grid_file(tmp_path):
    (tmp_path / "bad.toml").write_text("tasks = [e2e\n")
    with pytest.raises(LoraboundError, match="cannot parse grid file"):
        load_grid(tmp_path / "bad.toml")
    with pytest.raises(LoraboundError, match="does not exist"):
        load_grid(tmp_path / "none.toml")


@pytest.mark.parametrize("change, message", [
    ({"models": ["no-such-model"]}, "unknown model spec 'no-such-model'"),
    ({"tasks": ["no-such-task"]}, "unknown task 'no-such-task'"),
    ({"transfer": "no-such-task"}, "unknown task 'no-such-task'"),
    ({"data": {"train_size": 40, "validation_size": 4, "test_size": 6}}, "were asked for"),
    ({"training": [{"name": "a", "rank": 0}]}, "rank = 0 in [[training]] 'a' is out of range"),
    ({"search": {"criterion": "best"}}, "unknown criterion 'best'"),
    ({"training": [{"name": "given", "adapter": "nowhere/{task}-{seed}"}]}, "adapter folder nowhere/places-0"),
    ({"models": ["{root}/base", "{root}/again/base"]}, "two cells would share the folder base-places-short-s0"),
])
def test_study_refuses_bad_grids_before_any_work(workspace, tmp_path, monkeypatch, change, message):
    def must_not_run(*a, **k):
        raise AssertionError("work started before the grid was checked")
    monkeypatch.setattr(pipeline, "train", must_not_run)
    monkeypatch.setattr(pipeline, "run", must_not_run)
    change = json.loads(json.dumps(change).replace("{root}", str(workspace)))
    (workspace / "again" / "base").mkdir(parents=True, exist_ok=True)
    (workspace / "again" / "base" / "config.json").write_text((workspace / "base" / "config.json").read_text())
    grid = tiny_grid(workspace, **change)
    with pytest.raises(LoraboundError, match=re.escape(message)):
        study(tmp_path / "out", grid_from_dict(grid), progress=False)
    assert not (tmp_path / "out").exists()


def test_study_folder_inside_an_input_is_refused(workspace):
    with pytest.raises(LoraboundError, match="never writes into its inputs"):
        study(workspace / "base" / "study", grid_from_dict(tiny_grid(workspace)), progress=False)
    assert not (workspace / "base" / "study").exists()


def test_cli_refusal_is_one_line_and_exit_2(workspace, tmp_path, capsys):
    code = main(["--quiet", "study", "--out", str(tmp_path / "s"), "--models", str(workspace / "base"),
                 "--tasks", str(workspace / "places.jsonl"), "nowhere.jsonl", "--train-size", "12",
                 "--validation-size", "4", "--test-size", "6"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: unknown task 'nowhere.jsonl'") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------------------
# Cells: order, identical reruns, resuming, failures, another grid
# ---------------------------------------------------------------------------------------------

def test_a_copied_study_folder_pools_with_its_cells_training_records(finished, tmp_path):
    """Cells committed or copied elsewhere record an adapter path that no longer exists: the pooled report
    reads the training record from the cell's own adapter folder, and nothing is run again."""
    import shutil

    out, grid, summary = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for record_file in copy.glob("cells/*/cell.json"):
        record = json.loads(record_file.read_text())
        record_file.write_text(json.dumps({**record, "adapter": str(tmp_path / "gone" / "adapter")}))
    again = study(copy, grid, progress=False)
    assert [c["training_run"]["steps"] for c in again["cells"]] == [6, 6]
    assert again["pooled"] == summary["pooled"] and again["test_curve"] == summary["test_curve"]


def test_study_writes_every_cell_and_the_report(finished):
    out, grid, summary = finished
    assert [c["id"] for c in summary["cells"]] == [c.id for c in grid.cells()] == ["base-places-short-s0",
                                                                                    "base-places-short-s1"]
    for cell in summary["cells"]:
        assert cell["status"] == "ok"
        report = json.loads((out / "cells" / cell["id"] / "run" / "report.json").read_text())
        assert cell["boundary"] == report["search"]["boundary"]
        full = next(v for v in report["variants"] if v["name"] == "full adapter")
        assert cell["in_domain"]["metrics"]["full"]["bleu"] == full["metrics"]["bleu"]
        assert set(cell["in_domain"]["tests"]) == {"bleu", "rougeL"}  # chrF: a score, no public statistics to test
        assert cell["training_run"]["steps"] == 6  # 12 inputs x 2 references / batch 4
        # Transfer: the cell's adapter at its b on the other task's test split.
        transfer = json.loads((out / "cells" / cell["id"] / "transfer-inns" / "evaluation.json").read_text())
        assert cell["transfer"]["metrics"]["full"] == next(v["metrics"] for v in transfer["variants"]
                                                           if v["name"] == "full adapter")
        assert "Inn" in transfer["examples"][0]["input"]
    stored = json.loads((out / "study.json").read_text())
    assert stored["pooled"] == summary["pooled"] and stored["pooled"]["n_cells"] == 2
    assert summary["transfer"]["pooled"]["n_cells"] == 2
    assert set(summary["timing"]["stages_seconds"]) >= {"train", "analysis", "search", "evaluate", "transfer"}
    assert abs(sum(summary["timing"]["stage_shares"].values()) - 1) < 1e-9
    md = (out / "study.md").read_text()
    assert summary["paper"]["comparison"] in md and "28.6%" in md and "Holm" in md
    assert "base-places-short-s1" in md


def _numbers(summary: dict) -> list:
    return [[c.get("boundary"), c.get("in_domain"), c.get("transfer"), c.get("truncation")] for c in summary["cells"]] \
        + [summary["pooled"]]


def test_same_seeds_give_identical_numbers(finished, workspace):
    out, grid, summary = finished
    again = study(workspace / "second", grid, progress=False)
    assert _numbers(again) == _numbers(summary)


def test_rerun_reuses_finished_cells(finished, monkeypatch):
    out, grid, summary = finished

    def must_not_run(*a, **k):
        raise AssertionError("a finished cell ran again")
    for name in ("train", "run", "evaluate"):
        monkeypatch.setattr(pipeline, name, must_not_run)
    assert _numbers(study(out, grid, progress=False)) == _numbers(summary)


def test_resume_after_an_interrupted_cell(finished, workspace, monkeypatch):
    _, grid, summary = finished
    out = workspace / "interrupted"
    real_run, trained = pipeline.run, []

    def stop_in_second_cell(model, adapter, *a, **k):
        if "-s1" in str(adapter):
            raise KeyboardInterrupt
        return real_run(model, adapter, *a, **k)
    real_train = pipeline.train
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: trained.append(str(a[2])) or real_train(*a, **k))
    monkeypatch.setattr(pipeline, "run", stop_in_second_cell)
    with pytest.raises(KeyboardInterrupt):
        study(out, grid, progress=False)
    assert json.loads((out / "cells" / "base-places-short-s0" / "cell.json").read_text())["status"] == "ok"
    assert not (out / "cells" / "base-places-short-s1" / "cell.json").exists()
    monkeypatch.setattr(pipeline, "run", real_run)
    trained.clear()
    again = study(out, grid, progress=False)
    assert trained == []  # the first cell is finished and the second cell's adapter was already trained
    assert [c["status"] for c in again["cells"]] == ["ok", "ok"]
    assert _numbers(again) == _numbers(summary)  # the same numbers as the uninterrupted study


def test_a_failed_cell_is_reported_and_the_study_goes_on(workspace, monkeypatch):
    """A LoraboundError in one cell (as training raises on a NaN loss) fails that cell only."""
    grid = grid_from_dict(tiny_grid(workspace))
    real_train = pipeline.train

    def diverge_on_seed_0(model, data, out, **k):
        if k["settings"].seed == 0:
            raise LoraboundError("training diverged: the loss was nan at step 3")
        return real_train(model, data, out, **k)
    monkeypatch.setattr(pipeline, "train", diverge_on_seed_0)
    out = workspace / "one-fails"
    summary = study(out, grid, progress=False)
    assert [c["status"] for c in summary["cells"]] == ["failed", "ok"]
    assert summary["failed"] == [{"id": "base-places-short-s0", "reason": "training diverged: the loss was nan at step 3"}]
    assert summary["pooled"]["n_cells"] == 1
    page = (out / "study.html").read_text()
    assert "1 of 2 cells finished, 1 failed" in page and "training diverged: the loss was nan at step 3" in page
    # A rerun keeps the failure without training again; --retry-failed tries it again.
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: pytest.fail("a failed cell was retrained"))
    assert study(out, grid, progress=False)["failed"] == summary["failed"]
    monkeypatch.setattr(pipeline, "train", real_train)
    assert study(out, grid, retry_failed=True, progress=False)["failed"] == []


def test_a_diverging_training_fails_the_cell(workspace):
    """A learning rate far too high makes the loss non-finite; the cell fails with the reason, whichever
    stage notices it (training itself, or the study's check of the recorded losses)."""
    grid = grid_from_dict(tiny_grid(workspace, seeds=[0], training=[
        {"name": "wild", "epochs": 2, "rank": 4, "learning_rate": 1e30, "batch_size": 4}]))
    summary = study(workspace / "nan", grid, progress=False)
    assert summary["cells"][0]["status"] == "failed"
    assert re.search(r"nan|inf|diverg", summary["failed"][0]["reason"], re.I)


def test_another_grid_is_refused_unless_overwrite(finished, workspace, tmp_path, monkeypatch):
    out, grid, _ = finished
    other = grid_from_dict(tiny_grid(workspace, seeds=[0]))
    before = sorted(p.name for p in (out / "cells").iterdir())
    with pytest.raises(LoraboundError, match="other settings"):
        study(out, other, progress=False)
    assert sorted(p.name for p in (out / "cells").iterdir()) == before

    def fail_fast(*a, **k):
        raise LoraboundError("stopped by the test")
    monkeypatch.setattr(pipeline, "train", fail_fast)  # the folder handling is what is tested here
    copy = tmp_path / "copy"
    study(copy, other, progress=False)
    assert (copy / "cells" / "base-places-short-s0").is_dir()
    summary = study(copy, grid_from_dict(tiny_grid(workspace, seeds=[1])), overwrite=True, progress=False)
    assert [c["id"] for c in summary["cells"]] == ["base-places-short-s1"]
    assert not (copy / "cells" / "base-places-short-s0").exists()


def test_study_takes_a_grid_file(finished, tmp_path, monkeypatch):
    """study(out, "grid.toml") reads the file and runs the same study (here: resumed, nothing recomputed)."""
    out, grid, summary = finished
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: pytest.fail("a finished cell was retrained"))
    grid_file = tmp_path / "grid.toml"
    values = tiny_grid(out.parent, transfer=grid.transfer)
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()
             if k != "training" and not isinstance(v, dict) and v is not None]  # JSON lists and strings are TOML
    lines += ["", "[[training]]"] + [f"{k} = {json.dumps(v)}" for k, v in values["training"][0].items()]
    for table in ("data", "generation", "search"):
        lines += ["", f"[{table}]"] + [f"{k} = {json.dumps(v)}" for k, v in values[table].items()]
    grid_file.write_text("\n".join(lines) + "\n")
    assert _numbers(study(out, str(grid_file), progress=False)) == _numbers(summary)


def test_given_adapters_are_used_not_trained(finished, workspace, monkeypatch):
    out, _, summary = finished
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: pytest.fail("a given adapter was retrained"))
    pattern = str(out / "cells" / "base-places-short-s{seed}" / "adapter")
    grid = grid_from_dict(tiny_grid(workspace, seeds=[1], training=[{"name": "short", "adapter": pattern}]))
    given = study(workspace / "given", grid, progress=False)
    assert given["cells"][0]["in_domain"] == summary["cells"][1]["in_domain"]


# ---------------------------------------------------------------------------------------------
# Pooled statistics, by hand
# ---------------------------------------------------------------------------------------------

def test_holm_matches_a_hand_computation():
    # sorted: 0.005 x4 = 0.02; 0.01 x3 = 0.03; 0.03 x2 = 0.06; 0.04 x1 = 0.04 -> raised to 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5] and holm([0.4, 0.9]) == pytest.approx([0.8, 0.9])


def _test(diff, p, source="report"):
    return {"diff": diff, "ci_low": diff - 1, "ci_high": diff + 1, "p_value": p, "source": source}


def test_pool_on_made_up_cells():
    cells = [
        {"share_dropped": 0.2, "tests": {"bleu": _test(2.0, 0.001), "rougeL": _test(1.0, 0.03)}},
        {"share_dropped": 0.4, "tests": {"bleu": _test(-3.0, 0.004), "rougeL": _test(-1.0, 0.02)}},
        {"share_dropped": 0.0, "tests": {"bleu": _test(0.0, 1.0, "nothing dropped"),
                                         "rougeL": _test(0.0, 1.0, "nothing dropped")}},
        {"share_dropped": 0.3, "tests": {"bleu": _test(0.5, 0.3), "rougeL": _test(3.0, 0.001)}},
    ]
    pooled = pool(cells)
    assert pooled["n_cells"] == 4 and pooled["share_dropped"] == pytest.approx(0.225)
    bleu, rouge = pooled["bleu"], pooled["rougeL"]
    assert bleu["mean_diff"] == pytest.approx(-0.125) and rouge["mean_diff"] == pytest.approx(0.75)
    # BLEU family (3 cells that dropped something): 0.001 x3 = 0.003, 0.004 x2 = 0.008, 0.3 x1 = 0.3
    assert bleu["holm_family"] == 3 and bleu["holm_adjusted_p"] == pytest.approx([0.003, 0.008, 0.3])
    assert (bleu["better"], bleu["not_different"], bleu["worse"]) == (1, 2, 1)
    # ROUGE-L: 0.001 x3 = 0.003, 0.02 x2 = 0.04, 0.03 x1 = 0.03 -> 0.04: all three significant
    assert rouge["holm_adjusted_p"] == pytest.approx([0.04, 0.04, 0.003])
    assert (rouge["better"], rouge["not_different"], rouge["worse"]) == (2, 1, 1)
    assert bleu["ci_low"] < bleu["mean_diff"] < bleu["ci_high"]
    # by hand: the 4 cells' sample SD over sqrt(4), times t(3) = 3.182 (the bootstrap's SD, rescaled, within 3%)
    half = 3.182 * np.std([2.0, -3.0, 0.0, 0.5], ddof=1) / 2
    assert bleu["ci_high"] - bleu["mean_diff"] == pytest.approx(half, rel=0.03)
    # The pool cannot detect the paper's 1.4 BLEU, so more test sets than its 4 would be needed, and at that many
    # (the spread between test sets held) the detectable difference falls to 1.4: (t(.975) + t(.8)) x SD / sqrt(k).
    needed = bleu["test_sets_for_effect"]
    assert bleu["mdd"] > 1.4 and needed > 4
    spread = np.std([2.0, -3.0, 0.0, 0.5], ddof=1)
    detects = lambda k: (stats.t.ppf(0.975, k - 1) + stats.t.ppf(0.8, k - 1)) * spread / math.sqrt(k)
    assert detects(needed) <= 1.4 * 1.03 and detects(needed - 1) > 1.4 * 0.97  # 3%: the bootstrap's SD


def test_a_pool_where_nothing_was_dropped_judges_no_claim():
    """Cells that kept every layer have a difference of 0 by construction: an interval of +0 to +0 there is a
    property of the rule, not evidence against the paper's gain, and "detects 0.00" would be false."""
    nothing = {"diff": 0.0, "p_value": 1.0, "source": "nothing dropped"}
    pooled = pool([{"share_dropped": 0.0, "test_set": str(i), "tests": {"bleu": nothing}} for i in range(5)])
    assert pooled["bleu"]["mean_diff"] == 0.0
    assert pooled["bleu"]["ci_low"] is pooled["bleu"]["ci_high"] is pooled["bleu"]["mdd"] is None
    assert pooled["bleu"]["claim"].startswith("not judged: no cell dropped anything")
    line = pooling.paper_line(pooled)
    assert "detects" not in line and "CI" not in line and "not judged: no cell dropped anything" in line


def test_bootstrap_over_cells_is_seeded_and_sane():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert bootstrap_mean(values) == bootstrap_mean(values)
    mean, low, high, se = bootstrap_mean(values)
    assert mean == 4.0 and low < mean < high and se > 0
    assert high - mean == pytest.approx(mean - low)
    assert bootstrap_mean([2.5]) == (2.5, 2.5, 2.5, 0.0)
    assert bootstrap_mean(values, seed=1) != bootstrap_mean(values, seed=2)


@pytest.mark.parametrize("k", [3, 4, 8])
def test_pooled_interval_over_few_test_sets_covers_the_true_mean(k):
    """Per-cell differences drawn around a true mean of 0.7: the interval over k test sets holds it in about
    95% of 1,000 draws (a percentile bootstrap over 4 test sets holds it in about 80%)."""
    rng = np.random.default_rng(k)
    covered = []
    for _ in range(1000):
        values = list(rng.normal(0.7, 2.0, size=k))
        _, low, high, _ = bootstrap_mean(values, resamples=2000, seed=int(rng.integers(1 << 30)))
        covered.append(low <= 0.7 <= high)
    assert 0.93 <= np.mean(covered) <= 0.985, np.mean(covered)


def test_cells_sharing_a_test_set_are_resampled_together():
    # Three cells share test set a and agree closely; two others. As independent cells the interval is narrower
    # than the evidence allows: resampling test sets widens it.
    values = [1.0, 1.1, 0.9, -2.0, 3.0]
    groups = ["a", "a", "a", "b", "c"]
    _, low_cells, high_cells, _ = bootstrap_mean(values)
    mean, low_sets, high_sets, _ = bootstrap_mean(values, groups)
    assert mean == pytest.approx(0.8)
    assert high_sets - low_sets > high_cells - low_cells
    pooled = pool([{"share_dropped": 0.2, "test_set": g, "tests": {"bleu": {"diff": v, "p_value": 0.5, "source": "r"}}}
                   for v, g in zip(values, groups)])
    assert pooled["bleu"]["test_sets"] == 3 and pooled["bleu"]["n"] == 5 and pooled["bleu"]["mdd"] > 0
    two = pool([{"share_dropped": 0.2, "test_set": g, "tests": {"bleu": {"diff": v, "p_value": 0.5, "source": "r"}}}
                for v, g in zip(values, ["a", "a", "a", "b", "b"])])
    assert two["bleu"]["ci_low"] is None and two["bleu"]["claim"].startswith("not judged: 2 independent test set(s)")
    assert "not judged" in pooling.paper_line(two)


def _report_with_curve(diffs: dict[int, float]) -> dict:
    """A report.json of a 10-layer adapter (10 LoRA parameters a layer) whose pruned rows at b differ from the
    full adapter by diffs[b] BLEU and 2 x that ROUGE-L."""
    variants = [{"name": "base model", "boundary": -1, "lora_params": 0},
                {"name": "full adapter", "boundary": None, "lora_params": 100},
                *({"name": f"pruned (b={b})", "boundary": b, "lora_params": 10 * (b + 1)} for b in diffs)]
    significance = [{"a": f"pruned (b={b})", "b": "full adapter", "metric": metric, "diff": d * scale,
                     "ci_low": d * scale - 1, "ci_high": d * scale + 1}
                    for b, d in diffs.items() for metric, scale in (("bleu", 1), ("rougeL", 2))]
    significance.append({"a": "base model", "b": "full adapter", "metric": "bleu", "diff": -9.0, "ci_low": -10.0,
                         "ci_high": -8.0})
    return {"variants": variants, "significance": significance}


def test_a_cells_test_curve_holds_every_pruned_boundary_and_only_those():
    curve = pooling.curve_on_test(_report_with_curve({7: -0.5, 2: -4.0, 9: 0.0}), top=9)
    assert [p["boundary"] for p in curve] == [2, 7]  # b = 9 keeps every layer: it is the full adapter
    assert [p["share_kept"] for p in curve] == pytest.approx([0.3, 0.8])
    assert curve[0]["diff"] == {"bleu": -4.0, "rougeL": -8.0} and curve[1]["ci"]["rougeL"] == [-2.0, 0.0]


def test_the_pooled_test_curve_counts_each_cell_once_per_band():
    rows = [{"task": "webnlg", "seed": seed,
             "test_curve": pooling.curve_on_test(_report_with_curve({1: -6.0 - seed, 2: -4.0 - seed,
                                                                       7: 0.5 * seed}), top=9)}
            for seed in range(4)]
    bands = {tuple(entry["share_kept"]): entry for entry in pooling.pool_curve_on_test(rows)}
    low = bands[(0.0, 0.25)]  # b = 1 and b = 2 (20% and 30% kept)... only b = 1 is below 25%
    assert low["cells"] == 4 and low["boundaries"] == [1]
    assert low["bleu"]["mean_diff"] == pytest.approx(-7.5) and low["bleu"]["test_sets"] == 4
    assert bands[(0.25, 0.5)]["bleu"]["mean_diff"] == pytest.approx(-5.5)
    top = bands[(0.75, 1.0)]
    assert top["boundaries"] == [7] and top["rougeL"]["mean_diff"] == pytest.approx(1.5)
    assert top["bleu"]["ci_low"] < 0.75 < top["bleu"]["ci_high"] and top["bleu"]["mdd"] > 0
    assert bands[(0.5, 0.75)]["cells"] == 0 and bands[(0.5, 0.75)]["bleu"] is None


@pytest.mark.parametrize("low, high, verdict", [(0.5, 2.0, "reproduced"), (1.6, 3.0, "reproduced (a larger"),
                                                (-1.0, 0.8, "not reproduced"), (-0.5, 2.0, "inconclusive")])
def test_the_paper_claim_is_judged_by_the_interval(low, high, verdict):
    assert pooling.claim_verdict(low, high, 1.4).startswith(verdict)


def test_paper_line_says_where_the_claim_falls():
    pooled = {"n_cells": 2, "share_dropped": 0.1,
              "bleu": {"mean_diff": -0.5, "ci_low": -1.0, "ci_high": 0.2, "test_sets": 2, "mdd": 1.7,
                       "claim": pooling.claim_verdict(-1.0, 0.2, 1.4)},
              "rougeL": {"mean_diff": 0.5, "ci_low": -0.5, "ci_high": 1.5, "test_sets": 2, "mdd": 2.8,
                         "claim": pooling.claim_verdict(-0.5, 1.5, 0.9)}}
    line = pooling.paper_line(pooled)
    assert "10.0% of LoRA parameters dropped" in line and "paper: 28.6% fewer" in line
    assert "BLEU -0.50" in line and "paper: +1.4: not reproduced" in line and "detects 1.70" in line
    assert "ROUGE-L +0.50" in line and "paper: +0.9: inconclusive" in line


# ---------------------------------------------------------------------------------------------
# The HTML report in a real browser
# ---------------------------------------------------------------------------------------------

def test_study_html_is_self_contained(finished):
    out, _, summary = finished
    page = (out / "study.html").read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 2
    for ref in re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', page):
        assert ref.startswith(("data:", "#")), ref
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert '<table id="pooled">' in page and '<table id="cells">' in page and '<table id="transfer">' in page


def test_study_html_renders_in_headless_chromium(finished, tmp_path):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    out, _, summary = finished
    dom = run_chromium(binary, out / "study.html", tmp_path / "profile-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<table id="cells">' in dom.stdout and "base-places-short-s1" in dom.stdout
    assert len(re.findall(r'<img src="data:image/png;base64,', dom.stdout)) == 2
    shot = tmp_path / "shot.png"
    result = run_chromium(binary, out / "study.html", tmp_path / "profile-shot", f"--screenshot={shot}",
                          "--window-size=1200,2400")
    assert result.returncode == 0 and shot.is_file()
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 100  # text, tables and plots rendered, not a blank page


# ---------------------------------------------------------------------------------------------
# The real embedded model
# ---------------------------------------------------------------------------------------------

@pytest.mark.real
def test_one_cell_study_on_the_real_model(real_model, tmp_path):
    grid = grid_from_dict({"tasks": ["e2e"], "seeds": [0], "training": [{"name": "tiny", "epochs": 1, "rank": 8}],
                           "data": {"train_size": 4, "validation_size": 3, "test_size": 4},
                           "generation": {"max_new_tokens": 8}, "search": {"criterion": "knee"}, "bootstrap": 100})
    summary = study(tmp_path / "study", grid, progress=False)
    cell = summary["cells"][0]
    assert cell["status"] == "ok" and cell["num_layers"] == 30
    assert len(cell["truncation"]["boundary"]) == 31 and -1 <= cell["boundary"] <= 29
    assert summary["pooled"]["n_cells"] == 1 and (tmp_path / "study" / "study.html").is_file()


@pytest.mark.real
def test_paper_grid_parses_and_its_splits_fit_the_data():
    """studies/paper.toml: 27 cells (3 tasks x short/long/long-r8 x 3 seeds); every split has the size the file asks
    for, so the built-in data is large enough for every cell."""
    import tomllib
    from pathlib import Path

    path = Path(__file__).parent.parent / "studies" / "paper.toml"
    raw = tomllib.loads(path.read_text())
    grid = load_grid(path)
    cells = grid.cells()
    assert len(cells) == 27 and {c.training.name for c in cells} == {"short", "long", "long-r8"}
    assert {c.training.rank for c in cells} == {8, 16}
    assert [c.id for c in cells[:3]] == ["smollm2-135m-e2e-short-s0", "smollm2-135m-e2e-short-s1",
                                         "smollm2-135m-e2e-short-s2"]
    for cell in cells:
        asked = {**raw["data"], **raw["data"].get(cell.task, {})}
        options = grid.data_options(cell.task, cell.seed)
        _, splits = options.load()
        assert len(splits.test) == asked["test_size"] and len(splits.validation) == asked["validation_size"]
        assert len(splits.train) == options.train_size == asked["train_size"]
    assert grid.data_options("xsum", 0).max_length == 320 and grid.data_options("e2e", 0).max_length == 256


def test_powered_grid_has_independent_test_sets_of_the_sizes_it_asks():
    """studies/powered.toml: 8 WebNLG and 5 E2E seeds, each seed's test block disjoint from the others', every cell
    trained with early stopping; the test examples per task match the file's sizing comment."""
    import tomllib
    from pathlib import Path

    path = Path(__file__).parent.parent / "studies" / "powered.toml"
    raw = tomllib.loads(path.read_text())
    grid = load_grid(path)
    assert len(grid.cells()) == 13 and all(c.training.early_stopping == 1 for c in grid.cells())
    assert [c.task for c in grid.cells()][:8] == ["webnlg"] * 8  # the better-powered task lands first
    for task in grid.tasks:
        tests = []
        for seed in grid.seeds_of(task):
            _, splits = grid.data_options(task, seed).load()
            assert len(splits.test) == raw["data"][task]["test_size"]
            tests.append({e.input for e in splits.test})
            assert not tests[-1] & {e.input for e in splits.train + splits.validation}
        assert sum(len(t) for t in tests) == len(set().union(*tests))  # no test example in two seeds


def test_gemma_grid_is_the_paper_grids_long_training_on_one_seed():
    """studies/gemma.toml (the second model): the long r = 16 training and every data setting of studies/paper.toml,
    so its cells are comparable with the paper grid's long cells."""
    import tomllib
    from pathlib import Path

    studies = Path(__file__).parent.parent / "studies"
    paper, gemma = (tomllib.loads((studies / name).read_text()) for name in ("paper.toml", "gemma.toml"))
    assert gemma["data"] == paper["data"] and gemma["generation"] == paper["generation"]
    assert gemma["search"] == paper["search"] and gemma["tasks"] == paper["tasks"]
    long = next(t for t in paper["training"] if t["name"] == "long")
    assert gemma["training"] == [long] and gemma["seeds"] == [0]
    cells = load_grid(studies / "gemma.toml").cells()
    assert [c.id for c in cells] == [f"gemma-3-270m-q4-k-m-{task}-long-s0" for task in ("e2e", "webnlg", "xsum")]


def _candidate(b: int, bleu: float, diff: float | None, low: float = -1.0, p: float = 0.5) -> dict:
    test = None if diff is None else {"diff": diff, "ci_low": low, "ci_high": diff + 1, "p_value": p,
                                      "smallest_p": 0.001, "se": 0.3, "n": 40, "differing": 20, "effect": 1.15}
    return {"boundary": b, "bleu": bleu, "rougeL": 50.0, "bleu+rougeL": (bleu + 50) / 2,
            "vs_full": None if test is None else {m: dict(test) for m in ("bleu", "rougeL", "bleu+rougeL")}}


def test_three_rules_read_one_search_and_can_disagree():
    # b = 16 has the best validation BLEU by a hair (plain takes it), no gain beyond noise (quality keeps 29),
    # and b = 24 is the smallest shown within 1 point (size takes it; b = 16 fails).
    search = {"candidates": [_candidate(11, 30.0, -8.0, low=-12.0, p=0.001), _candidate(16, 41.0, 0.5, low=-2.0),
                             _candidate(24, 40.5, -0.1, low=-0.8), _candidate(29, 40.6, None)]}
    assert pooling.rule_decisions(search) == {"plain": 16, "quality": 29, "size": 24}
    # A report written before the candidates carried their spread: said, not guessed.
    old = {"candidates": [{**c, "vs_full": c["vs_full"] and {m: {k: v for k, v in t.items() if k != "se"}
                                                              for m, t in c["vs_full"].items()}}
                          for c in search["candidates"]]}
    assert pooling.rule_decisions(old) == {"plain": None, "quality": None, "size": None}


# ---------------------------------------------------------------------------------------------
# A cell whose search chose a selection (per-module, greedy-drop)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def selection_cell(workspace):
    """A cell folder whose run chose, by greedy-drop with half the LoRA parameters as budget, a selection that is
    no prefix: the case the summary once called "nothing dropped"."""
    from tiny import tiny_llama, tiny_lora

    import torch

    cell_dir = workspace / "selection-cell"
    adapter = cell_dir / "adapter"
    model = tiny_lora(tiny_llama())
    with torch.no_grad():  # LoRA on layers 0 and 1 that does nothing: greedy-drop drops them first, keeping 2-3
        for name, p in model.named_parameters():
            if "lora_B" in name and (".layers.0." in name or ".layers.1." in name):
                p.zero_()
    model.save_pretrained(adapter)
    pipeline.run(str(workspace / "base"), adapter, out=cell_dir / "run", criterion="greedy-drop", keep_fraction=0.5,
                 data_options=DataOptions(data=str(workspace / "places.jsonl"), validation_size=4, test_size=6,
                                          max_length=64),
                 generation=GenerationOptions(max_new_tokens=4), bootstrap=50, progress=False)
    record = {"cell": {"id": "selection", "model": "base", "task": "places", "training": {"name": "given"},
                       "seed": 0}, "status": "ok", "adapter": str(adapter)}
    return cell_dir, record, json.loads((cell_dir / "run" / "report.json").read_text())


def _with(report: dict, change) -> dict:
    changed = json.loads(json.dumps(report))
    change(changed)
    return changed


@pytest.mark.parametrize("member", ["as run", "only the prefix compared", "keeps every module", "transfer"])
def test_a_cell_that_chose_a_selection_says_what_it_dropped(selection_cell, workspace, member, tmp_path):
    cell_dir, record, report = selection_cell
    search, on_test = report["search"], report["selection_test"]
    assert search["boundary"] is None and search["kept_fraction"] <= 0.5  # the search dropped modules
    grid = grid_from_dict(tiny_grid(workspace, search={"criterion": "greedy-drop"}))
    if member == "as run":
        row = pooling.summarise_cell(record, cell_dir, grid)
        d = row["in_domain"]
        assert d["share_dropped"] == pytest.approx(1 - search["kept_fraction"]) and d["share_dropped"] >= 0.5
        assert d["selection"] == on_test["describe"] and d["metrics"]["pruned"] == on_test["metrics"]
        for metric in ("bleu", "rougeL"):
            test = on_test["against"]["full adapter"][metric]
            assert d["tests"][metric]["source"] == "report"
            assert d["tests"][metric]["diff"] == pytest.approx(test["a_score"] - test["b_score"])
            assert d["tests"][metric]["p_value"] == test["p_value"]
        cells = render._cell_rows({"cells": [row]})[0]
        assert cells[4] == on_test["describe"] and "nothing dropped" not in " ".join(cells)
        return
    top = max(report["curves"]["meta"]["adapter_layers"])
    if member == "only the prefix compared":  # the full adapter's comparison missing from an older report
        changed = _with(report, lambda r: r["selection_test"]["against"].pop("full adapter"))
        changed["search"]["kept_fraction"] = 1.0  # selection_on_test skips the full adapter only when it is chosen
        d = pooling.compare_with_full(changed, cell_dir / "run", None, top, 50, 0)
        assert d["share_dropped"] == 0.0 and d["tests"]["bleu"]["source"] == "nothing dropped"
    elif member == "keeps every module":
        changed = _with(report, lambda r: r["selection_test"].update(against={}))
        changed["search"]["kept_fraction"] = 1.0
        d = pooling.compare_with_full(changed, cell_dir / "run", None, top, 50, 0)
        assert d["share_dropped"] == 0.0 and {t["source"] for t in d["tests"].values()} == {"nothing dropped"}
    else:  # an evaluation.json (the transfer task) holds no comparison of the selection: none is made up
        changed = _with(report, lambda r: r.pop("selection_test"))
        assert pooling.compare_with_full(changed, cell_dir / "run", None, top, 50, 0) is None
