"""A study beyond one process: --shard I/N (round-robin, shards side by side on one folder, pooled by the unsharded
command), --executor ray (cells as tasks on a local Ray instance), and the same numbers whichever way cells ran."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorabound.runtime import executors
from lorabound import pipeline
from lorabound.cli import main
from lorabound.errors import LoraboundError
from lorabound.runtime.executors import ExecutorOptions, Shard, TaskFailure
from lorabound.runtime.files import holds_folder_locks, lock_folder, waiting_lock
from lorabound.runtime.folders import claim_shared_folder
from lorabound.studies import grid_from_dict, study

from test_study import tiny_grid, workspace  # noqa: F401  (the tiny model and the two JSONL tasks)

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install 'lorabound[ray]')")
SRC = Path(__file__).resolve().parents[1] / "src"


# ---------------------------------------------------------------------------------------------
# --shard I/N
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [1, 2, 3, 5, 7])
def test_shards_are_round_robin_and_together_every_cell_once(count):
    cells = [f"cell{i}" for i in range(11)]
    shards = [Shard.parse(f"{i}/{count}").pick(cells) for i in range(count)]
    assert sorted(sum(shards, [])) == sorted(cells)  # every cell in exactly one shard
    for index, picked in enumerate(shards):
        assert picked == cells[index::count]  # positions index, index + count, ... in the grid's order


@pytest.mark.parametrize("text, says", [
    ("2/2", "out of range"), ("3/2", "out of range"), ("0/0", "out of range"), ("1", "is not I/N"),
    ("-1/2", "is not I/N"), ("1/2/3", "is not I/N"), ("a/b", "is not I/N"), ("", "is not I/N"),
])
def test_bad_shards_are_refused(text, says):
    with pytest.raises(LoraboundError, match=says):
        Shard.parse(text)


def test_more_shards_than_cells_is_refused():
    with pytest.raises(LoraboundError, match=r"grid of 2 cells into 3 shards.*--array=0-1"):
        Shard.parse("0/3").check_fits(2)
    Shard.parse("1/2").check_fits(2)


def two_tasks(root) -> dict:
    """The tiny grid on both tasks, one seed: two cells."""
    return tiny_grid(root, tasks=[str(root / "places.jsonl"), str(root / "inns.jsonl")], seeds=[0])


def write_grid_file(path: Path, values: dict) -> Path:
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()
             if k != "training" and not isinstance(v, dict)]  # JSON lists, numbers and strings are TOML
    for table in values["training"]:
        lines += ["", "[[training]]"] + [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    for name in ("data", "generation", "search"):
        lines += ["", f"[{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in values[name].items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _study_args(root, out, *extra) -> list[str]:
    grid_file = write_grid_file(root / "two-tasks.toml", two_tasks(root))
    return ["--quiet", "--threads", "1", "study", "--out", str(out), "--grid", str(grid_file), *extra]


@pytest.mark.parametrize("extra, says", [
    (["--shard", "0/2", "--overwrite"], "--overwrite with --shard 0/2 would let each shard empty"),
    (["--shard", "2/2"], "--shard 2/2 is out of range"),
    (["--shard", "0/3"], "grid of 2 cells into 3 shards"),
    (["--ray-address", "auto"], "--ray-address applies to --executor ray only"),
    (["--cpus-per-cell", "2"], "--cpus-per-cell applies to --executor ray only"),
    (["--executor", "ray", "--gpus-per-cell", "1"], "reserves GPUs that cells on --device cpu never use"),
    (["--executor", "ray", "--cpus-per-cell", "0"], "--cpus-per-cell 0.0 is out of range"),
    (["--executor", "ray", "--cpus-per-cell", "nan"], "--cpus-per-cell nan is out of range"),
    (["--executor", "ray", "--device", "cuda", "--gpus-per-cell", "-1"], "--gpus-per-cell -1.0 is out of range"),
])
def test_study_refusals_are_one_line_before_any_work(workspace, tmp_path, capsys, monkeypatch, extra, says):
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(executors.importlib.util, "find_spec", lambda name: object())  # as if ray were installed
    out = tmp_path / "study"
    assert main(_study_args(workspace, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and says in err, err
    assert not out.exists()


def test_executor_ray_without_ray_names_the_install_command(workspace, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(executors.importlib.util, "find_spec", lambda name: None if name == "ray" else real(name))
    assert main(_study_args(workspace, tmp_path / "study", "--executor", "ray")) == 2
    err = capsys.readouterr().err
    assert err == "error: --executor ray needs Ray, which is not installed; pip install 'lorabound[ray]'\n"


@holds_folder_locks
def _claim(out: Path, grid: dict, overwrite: bool = False) -> None:
    claim_shared_folder(out, "study-grid.json", grid, overwrite)


def test_shards_share_the_folder_and_exclude_an_overwrite_or_other_settings(tmp_path):
    """Two claims of the same settings at once are fine (the shards); while one holds the folder, a claim of other
    settings and an --overwrite are refused; a plain run folder's exclusive lock keeps the shards out."""
    out = tmp_path / "study"

    @holds_folder_locks
    def holding_then(action):
        claim_shared_folder(out, "study-grid.json", {"grid": 1}, False)
        return action()

    holding_then(lambda: _claim(out, {"grid": 1}))  # a second shard of the same grid joins
    with pytest.raises(LoraboundError, match="in use by a lorabound process of other settings"):
        holding_then(lambda: _claim(out, {"grid": 2}))
    (out / "cells").mkdir()
    with pytest.raises(LoraboundError, match="is in use by"):
        holding_then(lambda: _claim(out, {"grid": 2}, overwrite=True))
    _claim(out, {"grid": 2}, overwrite=True)  # alone, --overwrite replaces it
    assert json.loads((out / "study-grid.json").read_text()) == {"grid": 2} and not (out / "cells").exists()

    @holds_folder_locks
    def exclusive_then(action):
        lock_folder(out)
        return action()
    with pytest.raises(LoraboundError, match="in use by another lorabound process"):
        exclusive_then(lambda: _claim(out, {"grid": 2}))


HOLDER = """import sys
from pathlib import Path
from lorabound.runtime.files import waiting_lock
with waiting_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.readline()  # until the test says go
    Path(sys.argv[2]).write_text("done")
"""


def test_a_cell_lock_makes_a_second_process_wait_for_the_first(tmp_path):
    """What an unsharded command meets at a cell a shard is running: it is told who holds the cell, waits, and
    goes on only once the holder has finished and let go."""
    lock, done = tmp_path / "cells" / "c" / ".lorabound.lock", tmp_path / "done"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(done)], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "held"
    told = []

    def on_wait(pid: str) -> None:
        told.append(pid)
        holder.stdin.write("go\n")
        holder.stdin.flush()
    try:
        with waiting_lock(lock, on_wait):
            assert done.read_text() == "done"  # the holder finished before this process got the lock
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert told == [str(holder.pid)]


# ---------------------------------------------------------------------------------------------
# The same study: one process, two shards at once then pooled, Ray
# ---------------------------------------------------------------------------------------------

def _cells(summary: dict) -> list[dict]:
    """Each cell's row without the times measured while it ran (the only thing that may differ)."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in summary["cells"]]


@pytest.fixture(scope="module")
def one_process(workspace):  # noqa: F811
    """The tiny two-task study (2 cells) in this process, one torch thread (as each shard and Ray task runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grid = grid_from_dict(two_tasks(workspace))
        summary = study(workspace / "one-process", grid, progress=False)
    finally:
        torch.set_num_threads(before)
    assert [c["status"] for c in summary["cells"]] == ["ok", "ok"]
    return grid, summary


def test_two_shards_at_once_then_the_unsharded_command_pools_them(one_process, workspace, monkeypatch):  # noqa: F811
    grid, expected = one_process
    out = workspace / "sharded"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    shards = [subprocess.Popen([sys.executable, "-m", "lorabound.cli", *_study_args(workspace, out, "--shard",
                                                                                    f"{i}/2")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for i in range(2)]  # started together, on one folder
    outputs = [shard.communicate(timeout=600) for shard in shards]
    for shard, (stdout, stderr) in zip(shards, outputs):
        assert shard.returncode == 0, stderr
        assert "1 of 1 cells finished" in stdout and "without --shard to pool" in stdout
    assert not (out / "study.json").exists()  # a shard writes its cells, not the report
    ids = sorted(p.name for p in (out / "cells").iterdir())
    assert ids == sorted(c["id"] for c in expected["cells"])

    def must_not_run(*a, **k):
        raise AssertionError("pooling ran a cell again")
    for name in ("train", "run", "evaluate"):
        monkeypatch.setattr(pipeline, name, must_not_run)
    pooled = study(out, grid, progress=False)
    assert _cells(pooled) == _cells(expected)
    assert pooled["pooled"] == expected["pooled"]
    assert json.loads((out / "study.json").read_text())["pooled"] == expected["pooled"]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with 2 CPUs for this module's Ray tests (the study uses a running instance as it is)."""
    if not HAS_RAY:
        pytest.skip("ray is not installed (pip install 'lorabound[ray]')")
    import ray

    # The workers import lorabound, and this module for the tasks defined here.
    env = {"PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@needs_ray
def test_ray_executor_gives_the_one_process_numbers(one_process, local_ray, workspace):  # noqa: F811
    grid, expected = one_process
    summary = study(workspace / "ray", grid, progress=False, executor=ExecutorOptions(executor="ray"))
    assert _cells(summary) == _cells(expected)
    assert summary["pooled"] == expected["pooled"]
    records = [json.loads((workspace / "ray" / "cells" / c["id"] / "cell.json").read_text()) for c in expected["cells"]]
    assert [r["status"] for r in records] == ["ok", "ok"]


@needs_ray
def test_ray_cell_that_fails_is_a_failed_cell_and_the_rest_runs(local_ray, workspace, monkeypatch):  # noqa: F811
    """A training that diverges inside a Ray task fails its cell with the reason; the other cell finishes, and a
    rerun keeps the failure without running anything."""
    grid = grid_from_dict(tiny_grid(workspace, seeds=[0], training=[
        {"name": "wild", "epochs": 2, "rank": 4, "learning_rate": 1e30, "batch_size": 4},
        {"name": "short", "epochs": 1, "rank": 4, "learning_rate": 5e-3, "batch_size": 4}]))
    out = workspace / "ray-fails"
    summary = study(out, grid, progress=False, executor=ExecutorOptions(executor="ray"))
    assert [c["status"] for c in summary["cells"]] == ["failed", "ok"]
    assert summary["pooled"]["n_cells"] == 1
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: pytest.fail("a finished or failed cell ran again"))
    assert _cells(study(out, grid, progress=False)) == _cells(summary)  # the local executor resumes it


def _fails_on_two(item: int) -> dict:
    if item == 2:
        raise RuntimeError("no such thing")
    if item == 3:
        os._exit(1)  # the worker process dies
    return {"item": item}


@needs_ray
def test_ray_task_that_raises_or_dies_comes_back_as_a_task_failure(local_ray):
    results = executors.run_ray([1, 2, 3, 4], _fails_on_two, ExecutorOptions(executor="ray"), "cpu",
                                lambda position, item: None)
    assert results[0] == {"item": 1} and results[3] == {"item": 4}
    assert isinstance(results[1], TaskFailure) and "RuntimeError: no such thing" in results[1].reason
    assert isinstance(results[2], TaskFailure) and "Ray task failed" in results[2].reason


@needs_ray
def test_ray_refuses_a_cell_larger_than_the_cluster(local_ray):
    with pytest.raises(LoraboundError, match=r"asks for 3 CPU\(s\) \(--cpus-per-cell\) but the Ray cluster has 2"):
        executors.run_ray([1], _fails_on_two, ExecutorOptions(executor="ray", cpus_per_cell=3), "cpu",
                          lambda position, item: None)
