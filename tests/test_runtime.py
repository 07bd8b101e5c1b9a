"""--threads: the default is the cores free at start; a bad value is refused before any work."""

import os
import torch

from lorabound.cli import main
from lorabound.runtime import free_cores, set_threads


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
