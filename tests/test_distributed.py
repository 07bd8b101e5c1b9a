"""Data parallelism: `torchrun --nproc-per-node 2` (gloo on CPU) gives the single process's results."""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import lorabound
from lorabound.runtime import distributed
from lorabound.cli import main

from tiny import tiny_llama, tiny_lora, save_tiny_base

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model folder, a JSONL task and a random LoRA adapter on all its layers."""
    root = tmp_path_factory.mktemp("dist")
    save_tiny_base(root)
    tiny_lora(tiny_llama()).save_pretrained(root / "adapter")
    rows = [{"input": f"name: Place {i}, area: riverside", "target": f"Place {i} is by the riverside."}
            for i in range(40)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", str(root / "base"), "--adapter", str(root / "adapter"), "--data", str(root / "data.jsonl"),
              "--validation-size", "7", "--test-size", "10", "--max-length", "64"]
    return root, common


def _torchrun(args: list[str], nproc: int = 2, script: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(lorabound.__file__).parents[1]), str(TESTS),
                                                        os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    target = [str(script)] if script else ["-m", "lorabound.cli"]
    # torchrun's own scratch (per-rank log folders, else /tmp/torchelastic_*, never removed) goes into a folder
    # removed afterwards
    with tempfile.TemporaryDirectory(prefix="lorabound-torchrun-") as logs:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--log-dir", logs,
                               "--nproc-per-node", str(nproc), *target, *args], env=env, capture_output=True,
                              text=True, timeout=900)


def _assert_close(a, b, path="") -> None:
    """Equal structure; floats equal to 1e-9 relative (the float64 sums are added in another order)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


def test_helpers_in_one_process():
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.shard(list("abcde")) == list("abcde")
    assert distributed.sum_floats([1.5, 2.0]) == [1.5, 2.0]
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]


def test_shard_rule_deals_items_round_robin(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    assert distributed.shard(list(range(8))) == [1, 4, 7]
    assert not distributed.is_main()


def test_two_ranks_run_gives_single_process_results(workspace):
    root, common = workspace
    flags = ["--batch-size", "2", "--max-new-tokens", "8", "--generation-batch-size", "3", "--bootstrap", "100",
             "--boundaries", "1"]
    assert main(["--quiet", "run", *common, *flags, "--out", str(root / "single")]) == 0
    done = _torchrun(["--quiet", "run", *common, *flags, "--out", str(root / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    single, two = root / "single", root / "two"
    # 7 validation examples in batches of 2: 4 batches, the last round has one batch for two ranks.
    _assert_close(json.loads((single / "curves.json").read_text()), json.loads((two / "curves.json").read_text()))
    _assert_close(json.loads((single / "search.json").read_text()), json.loads((two / "search.json").read_text()))
    files = sorted(p.name for p in (single / "generations").iterdir())
    assert files == sorted(p.name for p in (two / "generations").iterdir()) and len(files) >= 3
    for name in files:
        assert (single / "generations" / name).read_bytes() == (two / "generations" / name).read_bytes(), name
    first, second = (json.loads((d / "report.json").read_text()) for d in (single, two))
    for key in ("variants", "significance", "verdict"):
        _assert_close(first[key], second[key])
    assert "error" not in done.stderr


REPORTING_RANK = """
import atexit, os, sys
from lorabound.cli import main

atexit.register(lambda: print(f"process of rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}", file=sys.stderr))
sys.exit(main(sys.argv[1:]))
"""


def test_accelerate_launch_gives_single_process_curves(workspace, tmp_path):
    """`accelerate launch --multi_gpu` starts the ranks through torch.distributed.run; on CPU the ranks use gloo."""
    root, common = workspace
    flags = ["--batch-size", "2", "--curves", "truncation"]
    assert main(["--quiet", "analyze", *common, *flags, "--out", str(tmp_path / "single")]) == 0
    script = tmp_path / "reporting.py"
    script.write_text(REPORTING_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(lorabound.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    launcher = Path(sys.executable).with_name("accelerate")
    done = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), "--quiet", "analyze",
                           *common, *flags, "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process of rank 0 of 2" in done.stderr and "process of rank 1 of 2" in done.stderr, done.stderr[-3000:]
    _assert_close(json.loads((tmp_path / "single" / "curves.json").read_text()),
                  json.loads((tmp_path / "two" / "curves.json").read_text()))


def test_more_ranks_than_batches_is_handled(workspace):
    root, common = workspace
    flags = ["--curves", "truncation", "--batch-size", "8"]  # 7 validation examples: one batch for three ranks
    assert main(["--quiet", "analyze", *common, *flags, "--out", str(root / "a1")]) == 0
    done = _torchrun(["--quiet", "analyze", *common, *flags, "--out", str(root / "a3")], nproc=3)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_close(json.loads((root / "a1" / "curves.json").read_text()),
                  json.loads((root / "a3" / "curves.json").read_text()))


DYING_RANK = """
import atexit, os, sys, time
from lorabound.analysis import curves as analysis
from lorabound.cli import main

real = analysis.score_batch
calls = [0]
die_at = int(os.environ.get("DIE_AT", "0"))

def score_batch(*args, **kwargs):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == die_at:
        os._exit(7)  # rank 1 dies in the middle of the analysis
    if os.environ["RANK"] == "0" and calls[0] == die_at and os.environ.get("BUSY"):
        time.sleep(60)  # rank 0 is busy (no collective) when the launcher stops it
    return real(*args, **kwargs)

analysis.score_batch = score_batch
atexit.register(lambda: print(f"rank {os.environ['RANK']} scored {calls[0]} batches", file=sys.stderr))
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_stopped_by_the_launcher_while_busy_names_the_rank_that_died(workspace, tmp_path, monkeypatch):
    """torchrun sends SIGTERM to the survivors as soon as one rank fails; a survivor busy outside any collective
    still says in one line which rank stopped, instead of dying silently."""
    root, common = workspace
    flags = ["--batch-size", "1", "--criterion", "knee", "--max-new-tokens", "4", "--bootstrap", "50"]
    script = tmp_path / "dying.py"
    script.write_text(DYING_RANK)
    monkeypatch.setenv("DIE_AT", "4")
    monkeypatch.setenv("BUSY", "1")
    died = _torchrun(["--quiet", "run", *common, *flags, "--out", str(tmp_path / "two")], script=script)
    assert died.returncode != 0
    assert re.search(r"error: rank 0 of 2: the command failed because rank 1 stopped \(SIGTERM from the launcher\); "
                     r"see why in its output above, then rerun the same command to resume", died.stderr), \
        died.stderr[-3000:]
    assert "rank 0 scored 4 batches" in died.stderr  # it was stopped inside its sleep, not after it


def test_a_dying_rank_stops_the_others_and_a_rerun_resumes(workspace, tmp_path, monkeypatch):
    root, common = workspace
    flags = ["--batch-size", "1", "--criterion", "knee", "--max-new-tokens", "4", "--bootstrap", "50"]
    assert main(["--quiet", "run", *common, *flags, "--out", str(tmp_path / "single")]) == 0
    script = tmp_path / "dying.py"
    script.write_text(DYING_RANK)
    out = tmp_path / "two"
    # 7 batches of one; every rank's first call is the analysis self-check on batch 0: rank 1 dies in round three
    monkeypatch.setenv("DIE_AT", "4")
    died = _torchrun(["--quiet", "run", *common, *flags, "--out", str(out)], script=script)
    assert died.returncode != 0
    # torchrun's summary names the rank that died and its exit code
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: 7", died.stderr), died.stderr[-3000:]
    # and so does the survivor, in one line
    assert re.search(r"error: rank 0 of 2: .* failed because rank 1 stopped .*rerun the same command to resume",
                     died.stderr), died.stderr[-3000:]
    assert not (out / "curves.json").exists()
    assert json.loads((out / "analysis.partial.json").read_text())["batches_done"] == 4  # two whole rounds

    monkeypatch.setenv("DIE_AT", "0")
    resumed = _torchrun(["--quiet", "run", *common, *flags, "--out", str(out)], script=script)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Only the three batches left were scored: two on rank 0, one on rank 1 (each after its self-check call).
    assert "rank 0 scored 3 batches" in resumed.stderr and "rank 1 scored 2 batches" in resumed.stderr
    _assert_close(json.loads((tmp_path / "single" / "curves.json").read_text()),
                  json.loads((out / "curves.json").read_text()))
    names = sorted(p.name for p in (tmp_path / "single" / "generations").glob("test-*.jsonl"))
    assert len(names) >= 2  # base model and full adapter at least
    for name in names:
        assert (tmp_path / "single" / "generations" / name).read_bytes() == (out / "generations" / name).read_bytes()


HOLDER = """
import sys
from pathlib import Path
from lorabound.runtime.files import holds_folder_locks, lock_output

@holds_folder_locks
def hold(out):
    lock_output(out)
    print("held", flush=True)
    sys.stdin.read()

hold(Path(sys.argv[1]))
"""


@pytest.mark.parametrize("member,args", [
    ("an argument, before any work", ["analyze", "--curves", "truncation", "--batch-size", "0"]),
    ("a misspelt flag (argparse)", ["analyze", "--curves", "truncation", "--batch-sise", "2"]),
    ("a boundary the model lacks, after the ranks joined", ["run", "--boundary", "9", "--max-new-tokens", "2"]),
    ("--out in use by another process (only rank 0 sees it)", ["analyze", "--curves", "truncation"]),
])
def test_a_refusal_under_torchrun_is_said_once_and_every_rank_exits_2(workspace, tmp_path, capsys, member, args):
    """The same one line as one process gives, printed once (by rank 0), every rank's exit status 2 in torchrun's
    summary, no traceback from lorabound's code and no --out left; torchrun's own summary is torchrun's."""
    root, common = workspace
    out = tmp_path / "out"
    command = ["--quiet", args[0], *common, *args[1:], "--out", str(out)]
    holder, single = None, tmp_path / "single"  # the one process's --out, unless both meet the same held folder
    if member.startswith("--out in use"):
        single = out
        env = {**os.environ, "PYTHONPATH": str(Path(lorabound.__file__).parents[1])}
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, env=env, text=True)
        assert holder.stdout.readline() == "held\n"
    try:
        try:
            code = main(command[:-1] + [str(single)])
        except SystemExit as stop:  # argparse's refusals exit
            code = stop.code
        assert code == 2
        alone = capsys.readouterr().err.splitlines()
        assert len(alone) == 1 and alone[0].startswith("error: "), alone  # the one process's refusal
        done = _torchrun(command)
    finally:
        if holder is not None:
            holder.stdin.close()
            holder.wait(timeout=60)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == alone, done.stderr[-3000:]
    assert sorted(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s+exitcode\s*: (-?\d+)", done.stderr)) == \
        [("0", "2"), ("1", "2")], done.stderr[-3000:]
    frames = [line for line in done.stderr.splitlines() if line.lstrip().startswith("File ")]
    assert not [f for f in frames if "lorabound" in f], frames
    def left(folder: Path) -> list[str] | None:
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else None

    assert left(out) == left(single)  # what one process leaves: nothing, run's run.json, or the holder's lock
