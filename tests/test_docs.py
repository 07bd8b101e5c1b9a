"""The documentation a newcomer reads: links that resolve, commands the CLI accepts, a README of a few screens."""

import re
import shlex
from pathlib import Path

import pytest

from lorabound.cli import build_parser

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(page.read_text())
            if not re.match(r"[a-z]+:", target) and not target.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in relative_links(page):
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name} links to {target}, which does not exist"


def test_the_readme_is_a_few_screens_and_links_at_least_five_docs_pages():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 300
    linked = {(ROOT / t.split("#")[0]).resolve() for t in relative_links(readme) if t.startswith("docs/")}
    assert len(linked) >= 5 and all(p.suffix == ".md" for p in linked)


def readme_commands() -> list[str]:
    """Every `lorabound ...` line of the README's code blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith((".venv/bin/lorabound ", "lorabound ")):
                    commands.append(part.split("lorabound ", 1)[1])
    return commands


def test_the_readme_shows_commands():
    assert len(readme_commands()) >= 5


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_is_one_the_cli_accepts(command):
    # Optional parts the README writes in brackets ([--goal quality|size]) are dropped; the rest must parse.
    text = re.sub(r"\[[^\]]*\]", "", command)
    text = re.sub(r"\(.*?\)", "", text)
    try:
        build_parser().parse_args(shlex.split(text))
    except SystemExit as exit:
        pytest.fail(f"the CLI refuses the README's `lorabound {command}` (exit {exit.code})")


def test_import_lorabound_is_light_and_its_api_resolves():
    import subprocess
    import sys

    code = ("import sys, lorabound; assert 'torch' not in sys.modules, 'torch imported'; "
            "names = [n for n in lorabound.__all__ if n != '__version__']; "
            "[getattr(lorabound, n) for n in names]; print(len(names), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["20", "True"]  # the API resolves, importing torch only then
    import lorabound

    assert lorabound.train.__module__ == "lorabound.pipeline" and lorabound.Selection.__name__ == "Selection"
    with pytest.raises(AttributeError):
        lorabound.no_such_name


def test_the_readme_quotes_the_committed_powered_study():
    """The README's answer in general is the committed pool's, figure for figure (the plain rule and the curve's
    top band, as the README words them): rerunning the pool and forgetting the README fails here."""
    import json

    summary = json.loads((ROOT / "studies" / "powered-2026-12-02" / "study.json").read_text())
    readme = " ".join((ROOT / "README.md").read_text().split())

    def quoted(p: dict) -> str:
        return f"{p['mean_diff']:+.2f} ({p['ci_low']:+.2f} to {p['ci_high']:+.2f}; detects {p['mdd']:.2f})"

    plain = summary["rules"]["plain"]["pooled"]
    top = next(band for band in summary["test_curve"] if band["share_kept"] == [0.75, 1.0])
    assert f"dropped {plain['share_dropped']:.1%} of LoRA" in readme
    for figure in (quoted(plain["bleu"]), quoted(plain["rougeL"]), quoted(top["bleu"])):
        assert figure in readme, figure
    assert len(summary["cells"]) == 13 and "13 independent" in readme
