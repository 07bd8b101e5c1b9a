"""The run report: files, contents, self-containedness, plots, and a headless-browser render."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from lorabound.report.document import format_table, plot_curves, write_report

L = 6
BOUNDARY = 3
RED = (0xC0, 0x39, 0x2B)  # the boundary line's colour


def synthetic_report() -> dict:
    probs = [0.10, 0.20, 0.35, 0.50, 0.58, 0.60, 0.61]
    return {
        "meta": {"model": "smollm2-135m", "adapter": "runs/e2e-lora", "task": "e2e",
                 "sizes": {"train": 200, "validation": 50, "test": 60}, "seed": 0, "lorabound_version": "0.1.0",
                 "created": "2025-01-01T00:00:00+00:00", "max_new_tokens": 64},
        "curves": {
            "meta": {"num_layers": L, "n_examples": 50, "n_target_tokens": 1234, "n_truncated": 2, "n_skipped": 1,
                     "split": "validation"},
            "truncation": {"boundary": list(range(-1, L)), "mean_prob": probs,
                           "nll": [3.1, 2.6, 2.0, 1.5, 1.3, 1.25, 1.2],
                           "accuracy": [0.2, 0.3, 0.4, 0.5, 0.55, 0.56, 0.57]},
            "logit_lens": {"layer": list(range(L)), "base_prob": [0.01, 0.02, 0.03, 0.05, 0.08, 0.10],
                           "full_prob": [0.01, 0.03, 0.08, 0.20, 0.40, 0.61]},
            "ablation": {"layer": list(range(L)), "nll": [1.5, 1.4, 1.3, 1.25, 1.21, 1.19],
                         "delta_nll": [0.3, 0.2, 0.1, 0.05, 0.01, -0.01]},
        },
        "search": {"criterion": "rougeL", "boundary": BOUNDARY, "num_layers": L, "kept_fraction": 4 / 6,
                   "lora_params_kept": 40_000, "lora_params_total": 60_000, "reason": "best ROUGE-L on validation",
                   "candidates": [{"boundary": 2, "mean_prob": 0.50, "bleu": 30.5, "rougeL": 50.1, "chrf": 55.0},
                                  {"boundary": 3, "mean_prob": 0.58, "bleu": 33.25, "rougeL": 53.75, "chrf": 57.5},
                                  {"boundary": 5, "mean_prob": 0.61, "bleu": 32.0, "rougeL": 52.0, "chrf": None}]},
        "variants": [
            {"name": "base model", "boundary": None, "lora_params": 0, "adapter_mb": 0.0,
             "metrics": {"bleu": 5.125, "rouge1": 20.0, "rouge2": 8.0, "rougeL": 18.5, "chrf": 25.75},
             "hypotheses_file": "hyps/base.txt"},
            {"name": "full adapter", "boundary": L - 1, "lora_params": 60_000, "adapter_mb": 0.24,
             "metrics": {"bleu": 34.5, "rouge1": 60.0, "rouge2": 38.0, "rougeL": 54.25, "chrf": 58.0},
             "hypotheses_file": "hyps/full.txt"},
            {"name": f"pruned (b={BOUNDARY})", "boundary": BOUNDARY, "lora_params": 40_000, "adapter_mb": 0.16,
             "metrics": {"bleu": 33.75, "rouge1": 59.0, "rouge2": 37.5, "rougeL": 53.5, "chrf": 57.25},
             "hypotheses_file": "hyps/pruned.txt"},
        ],
        "bleu_signature": "nrefs:var|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0",
        "significance": [{"metric": "bleu", "a_score": 33.75, "b_score": 34.5, "mean_diff": -0.7, "ci_low": -2.1,
                          "ci_high": 0.6, "p_value": 0.31, "n_resamples": 1000, "seed": 0, "n": 60,
                          "a": f"pruned (b={BOUNDARY})", "b": "full adapter",
                          "sentence": "pruned scores 0.8 BLEU lower than full adapter: not significant (p = 0.31)."}],
        "examples": [{"input": f"name: Place {i} <b>&</b>", "references": [f"Place {i} is nice.", "Another ref."],
                      "outputs": {"base model": f"base out {i}", "full adapter": f"full out {i}",
                                  f"pruned (b={BOUNDARY})": f"pruned out {i}"}} for i in range(7)],
        "verdict": "Pruning LoRA above layer 3 made no significant difference to BLEU, ROUGE-L or chrF.",
        "notes": ["2 validation targets were truncated to fit max_length.", "Odd <script>alert(1)</script> note"],
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    report = synthetic_report()
    return run_dir, report, write_report(run_dir, report)


def test_write_report_writes_every_file(written):
    run_dir, report, paths = written
    for name in ("report.json", "report.md", "report.html", "truncation_curve.png", "logit_lens.png",
                 "layer_ablation.png"):
        assert (run_dir / name).is_file(), name
        assert (run_dir / name) in paths.values()
    assert json.loads((run_dir / "report.json").read_text()) == report
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_markdown_has_a_row_per_variant(written):
    run_dir, report, _ = written
    md = (run_dir / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("|")]
    for variant in report["variants"]:
        row = [r for r in rows if variant["name"] in r and f"{variant['metrics']['bleu']:.2f}" in r]
        assert row, variant["name"]
        assert f"{variant['metrics']['rougeL']:.2f}" in row[0] and f"{variant['lora_params']:,}" in row[0]
    assert report["verdict"] in md
    assert "truncation_curve.png" in md


def test_html_is_self_contained_and_complete(written):
    run_dir, report, _ = written
    page = (run_dir / "report.html").read_text()
    assert '<table id="metrics">' in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            assert img.width > 100 and img.height > 100
    assert report["verdict"] in page
    assert "not significant (p = 0.31)" in page  # the significance sentence
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "@import" not in page
    for ref in re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', page):
        assert ref.startswith(("data:", "#")), ref
    # text from the data is escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Place 0 &lt;b&gt;&amp;&lt;/b&gt;" in page
    # at most five examples, in base / full / pruned columns
    assert "Place 4" in page and "Place 5" not in page
    header = page[page.index('<table id="examples"'):]
    assert header.index("base model") < header.index("full adapter") < header.index(f"pruned (b={BOUNDARY})")
    # savings: params and MB before and after
    assert "60,000" in page and "40,000" in page and "0.24 MB" in page and "0.16 MB" in page


def _red_pixels(path) -> int:
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=int)
    return int((np.abs(pixels - np.array(RED)).max(axis=-1) <= 12).sum())


def test_plot_curves_writes_valid_pngs_with_the_boundary(tmp_path):
    curves = synthetic_report()["curves"]
    marked = plot_curves(curves, BOUNDARY, tmp_path / "marked")
    plain = plot_curves(curves, None, tmp_path / "plain")
    assert set(marked) == set(plain) and len(marked) == 3
    for name, path in marked.items():
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 0 and img.height > 0
        assert _red_pixels(path) > 50, name        # the dashed boundary line and its label
        assert _red_pixels(plain[name]) < 5, name  # absent without a boundary


def test_missing_optional_parts_render_what_exists(tmp_path):
    report = synthetic_report()
    for key in ("curves", "search", "significance", "examples", "notes", "bleu_signature"):
        del report[key]
    report["variants"][0]["metrics"] = {}
    paths = write_report(tmp_path, report)
    assert set(paths) == {"json", "markdown", "html"}
    page = paths["html"].read_text()
    assert '<table id="metrics">' in page and "<img" not in page
    assert "n/a" in page
    table = format_table(report)
    assert len(table.splitlines()) == 2 + len(report["variants"])
    assert "n/a" in table.splitlines()[2]  # base model: no metrics


def test_format_table_lists_each_variant_once():
    report = synthetic_report()
    lines = format_table(report).splitlines()
    assert lines[0].split("|")[1].strip() == "Variant"
    assert [line.split("|")[1].strip() for line in lines[2:]] == [v["name"] for v in report["variants"]]


# --------------------------------------------------------------------------------------------
# a real browser
# --------------------------------------------------------------------------------------------

def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run_chromium(binary: str, page, profile, *extra: str) -> subprocess.CompletedProcess:
    """Headless chromium with networking extras off; `extra` adds --dump-dom or --screenshot=..."""
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
               f"--user-data-dir={profile}", *extra, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_report_renders_in_headless_chromium(written, tmp_path):
    binary = chromium_binary()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; CI must install it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    run_dir, report, _ = written
    page = run_dir / "report.html"

    dom = run_chromium(binary, page, tmp_path / "profile-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<table id="metrics">' in dom.stdout
    assert len(re.findall(r'<img src="data:image/png;base64,', dom.stdout)) == 3
    assert report["verdict"] in dom.stdout

    shot = tmp_path / "shot.png"
    result = run_chromium(binary, page, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1200,2000")
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.is_file()
    with Image.open(shot) as img:
        assert img.size == (1200, 2000)
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 100  # not blank: text, tables and plots
    assert _red_pixels(shot) > 20  # a plot's boundary line rendered (the colour appears nowhere in the CSS)


def test_every_row_says_where_its_b_comes_from_and_estimates_say_so(tmp_path):
    report = synthetic_report()
    origins = ["reference: no adapter", "reference: every LoRA layer", "for comparison: knee of the curve"]
    for variant, origin in zip(report["variants"], origins):
        variant["origin"] = origin
    report["variants"][2]["adapter_mb_source"] = "estimate"
    report["variants"][1]["adapter_mb_source"] = "file"
    write_report(tmp_path, report)
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    for text in (format_table(report), md):
        rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
        assert "Where b comes from" in rows["Variant"]
        for variant in report["variants"]:
            assert variant["origin"] in rows[variant["name"]]
        assert "~0.16 (estimate)" in rows[f"pruned (b={BOUNDARY})"] and "estimate" not in rows["full adapter"]
    metrics = page.split('id="metrics"')[1].split("</table>")[0]
    assert "<th>Where b comes from</th>" in metrics and "~0.16 (estimate)" in metrics
    for origin in origins:
        assert f"<td>{origin}</td>" in metrics
    assert "an estimate is marked ~ (estimate)" in md


# ---------------------------------------------------------------------------
# The joint curve's heat map and the selection over the layer stack (per-module / greedy-drop searches)
# ---------------------------------------------------------------------------

BLUE = (0x1F, 0x77, 0xB4)  # a kept (layer, group) cell


def _pixels(path, colour) -> np.ndarray:
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=int)
    return np.abs(pixels - np.array(colour)).max(axis=-1) <= 12


def selection_report() -> dict:
    report = synthetic_report()
    bounds = list(range(-1, L))
    report["curves"]["meta"]["adapter_layers"] = list(range(L))
    report["curves"]["joint"] = {"attention_boundary": bounds, "mlp_boundary": bounds,
                                 "mean_prob": [[0.1 + 0.05 * i + 0.02 * j for j in range(L + 1)] for i in range(L + 1)]}
    chosen = {"attention": [0, 1, 2, 3], "mlp": [0]}
    report["search"] = {
        "criterion": "per-module", "boundary": None, "num_layers": L, "selection": chosen,
        "selection_text": "attention 0..3, mlp 0", "lora_params_kept": 25_000, "lora_params_total": 60_000,
        "kept_fraction": 25 / 60, "reason": "goal size: the smallest selection ...",
        "candidates": [{"selection": chosen, "describe": "attention 0..3, mlp 0", "attention_boundary": 3,
                        "mlp_boundary": 0, "mean_prob": 0.27, "bleu": 30.0, "rougeL": 50.0, "chrf": 51.0,
                        "why": ["fewest parameters reaching 90% of the gain"]},
                       {"selection": None, "describe": "every LoRA layer", "attention_boundary": 5,
                        "mlp_boundary": 5, "mean_prob": 0.45, "bleu": 31.0, "rougeL": 51.0, "chrf": 52.0,
                        "why": ["full adapter"]}],
        "compared_prefix": {"boundary": 1, "selection": {"*": [0, 1]}, "describe": "LoRA on layers 0..1",
                            "lora_params_kept": 20_000,
                            "tests": {"bleu+rougeL": {"chosen": 40.0, "prefix": 37.5, "diff": 2.5, "ci_low": -0.5,
                                                      "ci_high": 5.25, "p_value": 0.125}}}}
    return report


def test_selection_search_report_draws_the_heat_map_and_the_kept_pairs(tmp_path):
    paths = write_report(tmp_path, selection_report())
    assert paths["joint"].name == "joint_curve.png" and paths["selection"].name == "selection_layers.png"
    assert _pixels(paths["joint"], RED).sum() > 50  # the chosen pair's star
    kept = _pixels(paths["selection"], BLUE)
    top, bottom = kept[: kept.shape[0] // 2].sum(), kept[kept.shape[0] // 2:].sum()
    # The chosen selection keeps 5 (layer, group) pairs, the prefix 0..1 keeps 4; filled cells dominate the blue.
    assert top > bottom * 1.1, (top, bottom)
    markdown = paths["markdown"].read_text()
    assert re.search(r"\| selection +\| mean prob \|", markdown) and "| attention 0..3, mlp 0 |" in markdown
    assert "against the prefix of the same size (LoRA on layers 0..1, 20,000): mean of BLEU and ROUGE-L 40.00 vs " \
           "37.50, +2.50 [95% CI -0.50, +5.25], p = 0.125" in markdown
    assert "![Joint curve" in markdown and "joint_curve.png" in markdown
    html_text = paths["html"].read_text()
    assert "Which (layer, module group) pairs keep LoRA" in html_text and 'class="prefix"' in html_text


def test_the_heat_map_has_no_star_without_a_per_module_search(tmp_path):
    report = selection_report()
    report["search"] = synthetic_report()["search"]
    paths = write_report(tmp_path, report)
    assert "joint" in paths and "selection" not in paths
    assert _pixels(paths["joint"], RED).sum() < 5
