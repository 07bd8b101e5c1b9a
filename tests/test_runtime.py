"""--threads (the default is the cores free at start; a bad value is refused before any work), the hub offline
unless asked, and library warnings held back around a refusal."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lorabound.cli import main
from lorabound.runtime.threads import OFFLINE_VARIABLES, free_cores, offline_unless_asked, set_threads


def test_free_cores_leaves_busy_cores_alone():
    assert free_cores(2, 0.1) == 2
    assert free_cores(2, 1.2) == 1          # one core busy elsewhere
    assert free_cores(2, 13.0) == 1         # never below one
    assert free_cores(16, 3.6) == 12


def test_set_threads_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_zero_threads_is_refused(capsys, tmp_path):
    assert main(["prune", "--threads", "0", "--adapter", str(tmp_path), "--boundary", "1",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --threads 0 is out of range") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_busy_cores_is_a_share_of_the_machine():
    from lorabound.runtime.threads import busy_cores

    busy = busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1)


# ---------------------------------------------------------------------------
# Ctrl-C: exit status 130, one line, and a folder the same command takes again
# ---------------------------------------------------------------------------

STALL = """
import importlib, os, sys, time

module = importlib.import_module(os.environ["STALL_MODULE"])
real = getattr(module, os.environ["STALL_FUNCTION"])

def stalled(*args, **kwargs):
    open(os.environ["STALL_MARKER"], "w").close()  # the test sends SIGINT once this exists
    time.sleep(120)
    return real(*args, **kwargs)

setattr(module, os.environ["STALL_FUNCTION"], stalled)
from lorabound.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def interrupt_world(tmp_path_factory):
    import json

    from tiny import save_tiny_base, tiny_llama, tiny_lora

    root = tmp_path_factory.mktemp("interrupt")
    save_tiny_base(root)
    tiny_lora(tiny_llama()).save_pretrained(root / "adapter")
    rows = [{"input": f"name: Place {i}, area: riverside", "target": f"Place {i} is by the riverside."}
            for i in range(30)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def interrupted_command(root, name: str, out) -> list[str]:
    data = ["--model", root / "base", "--data", root / "data.jsonl", "--validation-size", 4, "--test-size", 4,
            "--max-length", 64]
    adapter = ["--adapter", root / "adapter"]
    return [str(a) for a in {
        "evaluate": ["evaluate", *data, *adapter, "--max-new-tokens", 4, "--bootstrap", 20, "--out", out],
        "analyze": ["analyze", *data, *adapter, "--curves", "truncation", "--out", out],
        "run": ["run", *data, *adapter, "--boundary", 1, "--max-new-tokens", 4, "--bootstrap", 20, "--out", out],
        "train": ["train", *data, "--epochs", 1, "--rank", 2, "--out", out],
    }[name]]


# command, where it is stopped, whether SIGINT was ignored when it started (a shell script's `lorabound ... &`)
INTERRUPTIONS = [
    ("evaluate", "lorabound.evaluation", "generate_cached", False),
    ("evaluate", "lorabound.evaluation", "generate_cached", True),
    ("analyze", "lorabound.analysis.curves", "score_batch", False),
    ("run", "lorabound.analysis.curves", "score_batch", True),
    ("train", "lorabound.training", "target_loss", False),
]


@pytest.mark.parametrize("name,module,function,ignored", INTERRUPTIONS)
def test_ctrl_c_exits_130_with_one_line_and_the_same_command_runs_again(interrupt_world, tmp_path, name, module,
                                                                         function, ignored):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import lorabound

    out, marker = tmp_path / "out", tmp_path / "stalled"
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    env = {**os.environ, "STALL_MODULE": module, "STALL_FUNCTION": function, "STALL_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join([str(Path(lorabound.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored else None
    process = subprocess.Popen([sys.executable, str(script), "--quiet", *interrupted_command(interrupt_world, name, out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=ignore)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the command never reached the stall"
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    # 130 is what a shell shows for a process that ends on SIGINT too (-2 here), should one slip past the handler
    assert process.returncode in (130, -signal.SIGINT), (process.returncode, err)
    again = "continue where it stopped" if name in ("run", "train") else "start it again"
    assert err.splitlines() == [f"interrupted; rerun the same command to {again}"], err
    if name == "train":
        assert not out.exists()  # no half-written adapter
        return
    assert json.loads((out / ".lorabound").read_text())["finished"] is False or name == "run"
    assert main(["--quiet", *interrupted_command(interrupt_world, name, out)]) == 0  # taken again, no --overwrite


# ---------------------------------------------------------------------------
# The hub offline unless asked, and library warnings held back around refusals
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("given, expected", [
    ({}, {"HF_HUB_OFFLINE": "1"}),                                   # nothing asked: offline
    ({"HF_HUB_OFFLINE": "0"}, {"HF_HUB_OFFLINE": "0"}),              # the user's choice stays
    ({"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "1"}),
    ({"TRANSFORMERS_OFFLINE": "0"}, {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": "0"}),
])
def test_the_hub_is_offline_unless_asked(monkeypatch, given, expected):
    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    offline_unless_asked()
    assert {name: os.environ.get(name) for name in expected} == expected


NOISE = {  # a library's warning on stderr, as each source makes it, and the words it prints
    "python warning": ('import warnings; warnings.warn("a library python warning", UserWarning)',
                       "a library python warning"),
    "transformers logger": ("from transformers.utils import logging as t; "
                            't.get_logger("transformers.modeling_utils").warning("a transformers warning")',
                            "a transformers warning"),
    "huggingface_hub logger": ('import logging; logging.getLogger("huggingface_hub.utils._http")'
                               '.warning("Retrying in 4s [Retry 1/5].")', "Retrying in 4s"),
    "peft logger": ('import logging; logging.getLogger("peft.tuners.lora").warning("a peft warning")',
                    "a peft warning"),
}
SCRIPT = """
import sys
import lorabound.cli  # the command's process: the libraries imported, their handlers set up
from lorabound.errors import LoraboundError
from lorabound.runtime.threads import held_library_warnings

def noise():
    {noise}

try:
    with held_library_warnings((LoraboundError, OSError)):
        noise()
        raise LoraboundError("refused")
except LoraboundError:
    pass
print("-- completed:", file=sys.stderr, flush=True)
with held_library_warnings((LoraboundError, OSError)):
    noise()
print("-- crashed:", file=sys.stderr, flush=True)
try:
    with held_library_warnings((LoraboundError, OSError)):
        noise()
        raise RuntimeError("a bug")
except RuntimeError:
    pass
"""


@pytest.mark.parametrize("source", NOISE)
def test_library_warnings_are_dropped_around_a_refusal_and_shown_otherwise(source, tmp_path):
    """In a real process (pytest would catch warnings and log records itself): nothing around a refusal, the
    warning once the work completes, and before a crash's traceback."""
    noise, words = NOISE[source]
    done = subprocess.run([sys.executable, "-c", SCRIPT.replace("{noise}", noise)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    refused, rest = done.stderr.split("-- completed:\n")
    completed, crashed = rest.split("-- crashed:\n")
    assert refused == "" and words in completed and words in crashed, done.stderr
