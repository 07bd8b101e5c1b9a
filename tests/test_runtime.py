"""--threads (the default is the cores free at start; a bad value is refused before any work), the hub offline
unless asked, and library warnings held back around a refusal."""

import os
import subprocess
import sys

import pytest
import torch

from lorabound.cli import main
from lorabound.runtime import OFFLINE_VARIABLES, free_cores, offline_unless_asked, set_threads


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
    from lorabound.runtime import busy_cores

    busy = busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1)


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
from lorabound.runtime import held_library_warnings

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
