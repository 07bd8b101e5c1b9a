"""Running the CLI in-process from tests: its exit status and what it printed."""

from __future__ import annotations

from lorabound.cli import main


def cli(capsys, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `lorabound --quiet ARGS...`; arguments may be paths or numbers."""
    code = main(["--quiet", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ok(capsys, *args) -> str:
    """Run the CLI, expect success and no traceback; return stdout."""
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    assert "Traceback" not in err
    return out


def refused(capsys, *args, alone: bool = False) -> str:
    """Run the CLI, expect exit status 2 and exactly one `error:` line (with `alone`, nothing else on stderr);
    return that line."""
    code, out, err = cli(capsys, *args)
    assert code == 2, (code, out, err)
    if alone:
        assert err.count("\n") == 1 and err.startswith("error: "), err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def refused_alone(capsys, *args) -> str:
    """refused(), with nothing on stderr but the one `error:` line."""
    return refused(capsys, *args, alone=True)
