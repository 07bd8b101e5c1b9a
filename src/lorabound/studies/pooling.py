"""The summaries of a study: per cell, read from its report.json; pooled across cells, the mean difference of
pruned vs full with a bootstrap interval over independent test sets, and Holm-corrected per-cell significance
counts; the three decision rules compared on the same cells, and the paper's claims judged by the intervals.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..generation.cache import BASE, FULL
from ..metrics.scores import METRIC_LABELS, paired_test
from ..decision.boundary import COMBINED, DEFAULT_MARGIN, pick_for_goal
from ..metrics.stats import power, t_quantile, units_needed
from ..results import CellComparison, CellRow, Pooled, StudySummary
from .grid import Grid, task_label

METRICS = ("bleu", "rougeL", "chrf")
# sacrebleu gives no public per-example chrF statistics, so the paired bootstrap (and the pooled test) covers
# BLEU and ROUGE-L; chrF is shown as a score.
TESTED = ("bleu", "rougeL")
PAPER = {"params_dropped": 0.286, "bleu": 1.4, "rougeL": 0.9}  # arXiv 2503.23360, averages over its grid
LEVEL = 0.05
MIN_TEST_SETS = 3  # a pooled interval needs at least this many independent test sets
CELL_BOOTSTRAP = 10_000  # resamples of the bootstrap over cells


def _pruned_row(variants: list[dict], b: int | None, top: int) -> dict | None:
    """The variant the chosen b stands for: the full adapter at or above the top LoRA layer, else b's own row."""
    by_name = {v.get("name"): v for v in variants}
    if b is None or b >= top:
        return by_name.get(FULL)
    if b < 0:
        return by_name.get(BASE)
    return next((v for v in variants if v.get("boundary") == b and v.get("name") not in (FULL, BASE)), None)


def compare_with_full(result: dict, folder: Path, b: int | None, top: int, bootstrap: int, seed: int) -> CellComparison | None:
    """Base / full / pruned test metrics and, per metric, pruned minus full with its paired-bootstrap test.

    `result` is a report.json or evaluation.json. A test the report lacks (e.g. chrF) is computed from the saved
    hypotheses with the same bootstrap; when b keeps every LoRA layer, pruned is the full adapter (difference 0).
    b None: the search chose a selection that is no prefix (per-module, greedy-drop), compared on test apart from
    the table (the report's selection_test); a result without that comparison has none.
    """
    variants = result.get("variants") or []
    if b is None:
        return _compare_selection_with_full(result, top) if result.get("selection_test") else None
    full, base, pruned = _pruned_row(variants, None, top), _pruned_row(variants, -1, top), _pruned_row(variants, b, top)
    if full is None or pruned is None:
        return None
    total = full.get("lora_params") or result.get("lora_params_total") or 0
    row = {"boundary": b, "pruned_name": pruned.get("name"),
           "share_dropped": 1 - (pruned.get("lora_params") or 0) / total if total else None,
           "metrics": {name: (v or {}).get("metrics", {}) for name, v in (("base", base), ("full", full),
                                                                            ("pruned", pruned))},
           "tests": {}}
    tests = {(s.get("a"), s.get("b"), s.get("metric")): s for s in result.get("significance") or []}
    for metric in TESTED:
        if pruned is full:
            value = full.get("metrics", {}).get(metric)
            row["tests"][metric] = {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0,
                                    "a_score": value, "b_score": value, "source": "nothing dropped"}
            continue
        test = tests.get((pruned["name"], FULL, metric))
        source = "report"
        if test is None:
            test = _bootstrap_from_files(folder, pruned, full, metric, bootstrap, seed)
            source = "computed from the saved hypotheses"
        if test is not None:
            row["tests"][metric] = {"diff": test["a_score"] - test["b_score"], "ci_low": test["ci_low"],
                                    "ci_high": test["ci_high"], "p_value": test["p_value"], "mdd": test.get("mdd"),
                                    "a_score": test["a_score"], "b_score": test["b_score"], "source": source}
    return row


def _compare_selection_with_full(report: dict, top: int) -> dict | None:
    """compare_with_full for a chosen selection: its test scores and paired bootstraps against the full adapter,
    from the report's selection_test; "nothing dropped" only when the selection keeps every LoRA module."""
    variants = report.get("variants") or []
    full, base = _pruned_row(variants, None, top), _pruned_row(variants, -1, top)
    on_test, search = report["selection_test"], report.get("search") or {}
    if full is None:
        return None
    kept = search.get("kept_fraction")
    row = {"boundary": None, "selection": on_test.get("describe"), "pruned_name": on_test.get("describe"),
           "share_dropped": 1 - kept if kept is not None else None,
           "metrics": {"base": (base or {}).get("metrics", {}), "full": full.get("metrics", {}),
                       "pruned": on_test.get("metrics", {})},
           "tests": {}}
    against_full = (on_test.get("against") or {}).get("full adapter")
    for metric in TESTED:
        if against_full is None:  # selection_on_test leaves out the full adapter only when it is the selection
            value = full.get("metrics", {}).get(metric)
            row["tests"][metric] = {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0,
                                    "a_score": value, "b_score": value, "source": "nothing dropped"}
        elif metric in against_full:
            test = against_full[metric]
            row["tests"][metric] = {"diff": test["a_score"] - test["b_score"], "ci_low": test["ci_low"],
                                    "ci_high": test["ci_high"], "p_value": test["p_value"],
                                    "a_score": test["a_score"], "b_score": test["b_score"], "source": "report"}
    return row


def _bootstrap_from_files(folder: Path, pruned: dict, full: dict, metric: str, bootstrap: int, seed: int):
    files = [folder / (v.get("hypotheses_file") or "") for v in (pruned, full)]
    if not all(f.is_file() for f in files):
        return None
    rows = [[json.loads(line) for line in f.read_text().splitlines()] for f in files]
    references = [r["references"] for r in rows[1]]
    return paired_test([r["output"] for r in rows[0]], [r["output"] for r in rows[1]], references,
                            metric=metric, n_resamples=bootstrap, seed=seed)


def summarise_cell(record: dict, cell_dir: Path, grid: Grid) -> CellRow:
    """The study's row for one cell, read from its folder (report.json, the adapter's training record)."""
    row = {**record["cell"], "status": record["status"], "reason": record.get("reason"),
           "seconds": record.get("seconds", {})}
    if record["status"] != "ok":
        return row
    report = json.loads((cell_dir / "run" / "report.json").read_text())
    curves = report.get("curves") or {}
    layers = (curves.get("meta") or {}).get("adapter_layers") or []
    num_layers = (report.get("meta") or {}).get("num_layers") or (curves.get("meta") or {}).get("num_layers")
    top = max(layers) if layers else num_layers - 1
    b = (report.get("search") or {}).get("boundary")
    seed = record["cell"]["seed"]
    row.update({"num_layers": num_layers, "boundary": b, "criterion": (report.get("search") or {}).get("criterion"),
                "truncation": {k: (curves.get("truncation") or {}).get(k) for k in ("boundary", "mean_prob")},
                "in_domain": compare_with_full(report, cell_dir / "run", b, top, grid.bootstrap, seed)})
    test_set = test_set_of(record["cell"]["task"], seed)
    if row["in_domain"] is not None:
        row["in_domain"]["test_set"] = test_set
    row["test_curve"] = curve_on_test(report, top)
    row["rules"] = {}
    for rule, chosen in rule_decisions(report.get("search") or {}).items():
        compared = None if chosen is None else compare_with_full(report, cell_dir / "run", chosen, top, grid.bootstrap,
                                                                 seed)
        row["rules"][rule] = None if compared is None else {**compared, "test_set": test_set}
    train_file = Path(record.get("adapter") or cell_dir / "adapter") / "lorabound_train.json"
    if not train_file.is_file():  # a study folder copied elsewhere (committed cells): the cell's own adapter folder
        train_file = cell_dir / "adapter" / "lorabound_train.json"
    if train_file.is_file():
        info = json.loads(train_file.read_text())
        row["training_run"] = {k: info.get(k) for k in ("steps", "train_pairs", "train_loss_first", "train_loss_last",
                                                         "validation_loss_before", "validation_loss_after")}
    transfer_dir = cell_dir / f"transfer-{task_label(grid.transfer)}" if grid.transfer else None
    if transfer_dir is not None and (transfer_dir / "evaluation.json").is_file():
        evaluation = json.loads((transfer_dir / "evaluation.json").read_text())
        row["transfer"] = {"task": grid.transfer,
                           **(compare_with_full(evaluation, transfer_dir, b, top, grid.bootstrap, seed) or {})}
    return row


def test_set_of(task: str, seed: int) -> str:
    """The test set a cell is evaluated on: cells of one task and seed share their test examples."""
    return f"{task}|seed {seed}"


def curve_on_test(report: dict, top: int) -> list[dict]:
    """The cell's test-side curve: every pruned boundary the report evaluated on test (each validation
    candidate, the chosen b and its comparisons), with the share of LoRA parameters it keeps and, per metric,
    its test difference from the full adapter and that difference's 95% interval."""
    variants = report.get("variants") or []
    full = _pruned_row(variants, None, top)
    total = (full or {}).get("lora_params") or report.get("lora_params_total")
    tests = {(s.get("a"), s.get("metric")): s for s in report.get("significance") or [] if s.get("b") == FULL}
    points = []
    for v in variants:
        b = v.get("boundary")
        if b is None or b < 0 or b >= top or v.get("name") in (FULL, BASE) or not total:
            continue
        found = {m: tests[(v["name"], m)] for m in TESTED if (v["name"], m) in tests}
        if found:
            points.append({"boundary": b, "share_kept": (v.get("lora_params") or 0) / total,
                           # reports before the power fields carry no "diff": the corpus scores' difference
                           "diff": {m: t["diff"] if "diff" in t else t["a_score"] - t["b_score"] for m, t in found.items()},
                           "ci": {m: [t["ci_low"], t["ci_high"]] for m, t in found.items()}})
    return sorted(points, key=lambda point: point["boundary"])


CURVE_BINS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))  # share of the adapter's LoRA parameters kept


def pool_curve_on_test(rows: list[dict]) -> list[dict]:
    """The test-side curves of all cells, pooled by share of LoRA kept: in each bin, each cell's mean
    difference over its boundaries there, then the mean over cells with its interval over independent test sets.

    It answers "does any depth of dropping beat the full adapter on held-out data?" without any selection
    rule: every boundary a cell evaluated counts, chosen or not."""
    pooled = []
    for low, high in CURVE_BINS:
        cells = [(r, [p for p in r.get("test_curve") or [] if low <= p["share_kept"] < high]) for r in rows]
        cells = [(r, points) for r, points in cells if points]
        entry = {"share_kept": [low, high], "cells": len(cells),
                 "boundaries": sorted({p["boundary"] for _, points in cells for p in points})}
        for metric in TESTED:
            measured = [(r, [p["diff"][metric] for p in points if metric in p["diff"]]) for r, points in cells]
            measured = [(r, diffs) for r, diffs in measured if diffs]
            values = [float(np.mean(diffs)) for _, diffs in measured]
            groups = [test_set_of(r["task"], r["seed"]) for r, _ in measured]
            entry[metric] = pooled_interval(values, groups, None, size_for=PAPER.get(metric)) if values else None
        pooled.append(entry)
    return pooled


RULES = {
    "plain": "the paper's plain search: the highest validation BLEU among the candidates (ties to the smaller b)",
    "quality": "auto --goal quality: a validation gain beyond noise (sign-flip test, Bonferroni), else every layer",
    "size": f"auto --goal size: the smallest b shown non-inferior within {DEFAULT_MARGIN:g} point (fixed sequence)",
}


def rule_decisions(search: dict) -> dict[str, int | None]:
    """The b each of the three rules picks from one search's validation candidates (None: not computable, e.g.
    a report written before the candidates carried their tests' spread, or a search without candidates).

    All three read the same generated validation outputs, so a cell compares rules, not luck of generation."""
    rows = {c["boundary"]: c for c in search.get("candidates") or [] if c.get("boundary") is not None
            and c.get(COMBINED) is not None}
    full = [b for b, c in rows.items() if c.get("vs_full") is None]
    usable = len(full) == 1 and len(rows) > 1 and all(
        "se" in c["vs_full"][COMBINED] for c in rows.values() if c.get("vs_full"))
    if not usable:
        return {rule: None for rule in RULES}
    best = max(c["bleu"] for c in rows.values())
    scored = {b: dict(c) for b, c in rows.items()}
    return {"plain": min(b for b, c in rows.items() if c["bleu"] == best),
            "quality": pick_for_goal(scored, "quality", 0.0, full[0])[0],
            "size": pick_for_goal(scored, "size", DEFAULT_MARGIN, full[0])[0]}


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (family-wise error control)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def bootstrap_mean(values: list[float], groups: list[str] | None = None, *, resamples: int = CELL_BOOTSTRAP,
                   seed: int = 0) -> tuple[float, float, float, float]:
    """Mean of `values`, its 95% interval and standard error, from a bootstrap over independent units.

    With `groups`, whole groups are resampled (a cluster bootstrap): cells that share a test set are not
    independent evidence, so the interval counts test sets, not cells. With k units the bootstrap's SD is
    scaled by sqrt(k / (k - 1)) and the interval is mean +- t(k - 1) x that: a percentile interval over a few
    test sets is too narrow (at 4 it covers the true mean about 80% of the time, not 95%)."""
    data = np.asarray(values, dtype=float)
    labels = list(range(len(data))) if groups is None else groups
    clusters = [np.flatnonzero([g == label for g in labels]) for label in dict.fromkeys(labels)]
    k = len(clusters)
    if k < 2:
        return float(data.mean()), float(data.mean()), float(data.mean()), 0.0
    sums = np.array([data[c].sum() for c in clusters])
    sizes = np.array([len(c) for c in clusters], dtype=float)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, k, size=(resamples, k))
    means = sums[draw].sum(axis=1) / sizes[draw].sum(axis=1)
    se = float(means.std()) * math.sqrt(k / (k - 1))
    half = t_quantile(k) * se
    return float(data.mean()), float(data.mean() - half), float(data.mean() + half), se


def pooled_interval(values: list[float], groups: list[str], effect: float | None,
                    size_for: float | None = None) -> dict:
    """The pooled mean of per-cell differences with its interval over independent test sets, what it could
    detect (80% power, t with k - 1 degrees of freedom), the test sets that would detect `size_for` (default:
    `effect`, the claimed gain judged by the interval) at this spread, and the claim judged. Below MIN_TEST_SETS
    test sets no interval is given: a bootstrap over one or two units has no width to speak of."""
    mean, low, high, se = bootstrap_mean(values, groups)
    independent = len(set(groups))
    size_for = effect if size_for is None else size_for
    if independent < MIN_TEST_SETS:
        return {"n": len(values), "test_sets": independent, "mean_diff": mean, "ci_low": None, "ci_high": None,
                "se": None, "mdd": None, "test_sets_for_effect": None,
                "claim": None if effect is None else (f"not judged: {independent} independent test set(s), fewer "
                                                      f"than {MIN_TEST_SETS}; see each cell's own interval")}
    detect = power(se * math.sqrt((independent - 1) / independent), independent, effect or 1.0)
    return {"n": len(values), "test_sets": independent, "mean_diff": mean, "ci_low": low, "ci_high": high,
            "se": se, "mdd": detect["mdd"],
            "test_sets_for_effect": None if size_for is None else units_needed(se, independent, size_for),
            "claim": None if effect is None else claim_verdict(low, high, effect)}


def claim_verdict(low: float, high: float, effect: float) -> str:
    """The paper's claimed gain against a pooled 95% interval."""
    if low > 0 and high >= effect:
        return "reproduced" if low <= effect else "reproduced (a larger gain than claimed)"
    if high < effect:
        return "not reproduced (the interval excludes the claimed gain)"
    return "inconclusive (the interval holds both no change and the claimed gain)"


def pool(comparisons: list[dict], level: float = LEVEL) -> Pooled:
    """Across cells, per metric: mean pruned - full, its interval resampling independent test sets, what that
    could detect, the paper's claim judged by the interval, and Holm-corrected counts.

    The Holm family of a metric is the cells where something was dropped (a cell that kept every layer tests
    nothing and counts as not different). Each metric is its own family.
    """
    pooled: dict = {"n_cells": len(comparisons)}
    shares = [c["share_dropped"] for c in comparisons if c.get("share_dropped") is not None]
    pooled["share_dropped"] = float(np.mean(shares)) if shares else None
    for metric in METRICS:
        cells = [c for c in comparisons if metric in c.get("tests", {})]
        tests = [c["tests"][metric] for c in cells]
        if not tests:
            continue
        groups = [c.get("test_set") or str(i) for i, c in enumerate(cells)]
        tested = [t for t in tests if t["source"] != "nothing dropped"]
        adjusted = holm([t["p_value"] for t in tested])
        better = sum(1 for t, p in zip(tested, adjusted) if p < level and t["diff"] > 0)
        worse = sum(1 for t, p in zip(tested, adjusted) if p < level and t["diff"] < 0)
        found = pooled_interval([t["diff"] for t in tests], groups, PAPER.get(metric))
        if not tested:  # every difference is 0 by construction, not by measurement: no interval, nothing detected
            found.update(ci_low=None, ci_high=None, se=None, mdd=None, test_sets_for_effect=None)
            found["claim"] = None if PAPER.get(metric) is None else (
                "not judged: no cell dropped anything, so every pruned variant is the full adapter; see the "
                "test-side curve")
        pooled[metric] = {**found, "better": better, "worse": worse, "not_different": len(tests) - better - worse,
                          "holm_family": len(tested), "holm_adjusted_p": adjusted}
    return pooled


def paper_line(pooled: dict) -> str:
    """One line: the pooled result beside the paper's averages."""
    if not pooled.get("n_cells"):
        return "No finished cell: nothing to compare with the paper's claims."
    parts = []
    if pooled.get("share_dropped") is not None:
        parts.append(f"{pooled['share_dropped']:.1%} of LoRA parameters dropped on average "
                     f"(paper: {PAPER['params_dropped']:.1%} fewer)")
    for metric in ("bleu", "rougeL"):
        p = pooled.get(metric)
        if p is None:
            continue
        if p.get("ci_low") is None:
            parts.append(f"{METRIC_LABELS[metric]} {p['mean_diff']:+.2f} (paper: {PAPER[metric]:+.1f}: {p['claim']})")
            continue
        needed = p.get("test_sets_for_effect")
        sizing = f"; {PAPER[metric]:g} would need {needed:,} independent test sets" if needed else ""
        parts.append(f"{METRIC_LABELS[metric]} {p['mean_diff']:+.2f} (95% CI {p['ci_low']:+.2f} to {p['ci_high']:+.2f} "
                     f"over {p['test_sets']} independent test sets; detects {p['mdd']:.2f} with 80% power{sizing}; "
                     f"paper: {PAPER[metric]:+.1f}: {p['claim']})")
    return (f"Against the paper's claims (arXiv 2503.23360), pooled over {pooled['n_cells']} cells, pruned vs full "
            "adapter: " + "; ".join(parts) + ".")


def build_summary(grid: Grid, rows: list[dict], seconds: float | None) -> StudySummary:
    ok = [r for r in rows if r["status"] == "ok" and r.get("in_domain")]
    pooled = pool([r["in_domain"] for r in ok])
    by_rule = {rule: pool([r["rules"][rule] for r in ok if (r.get("rules") or {}).get(rule)]) for rule in RULES}
    transfers = [r["transfer"] for r in ok if r.get("transfer", {}).get("tests")]
    stage_totals: dict[str, float] = {}
    for r in rows:
        for stage, value in (r.get("seconds") or {}).items():
            stage_totals[stage] = stage_totals.get(stage, 0.0) + value
    measured = sum(stage_totals.values())
    return {
        "grid": asdict(grid),
        "cells": rows,
        "failed": [{"id": r["id"], "reason": r["reason"]} for r in rows if r["status"] != "ok"],
        "pooled": pooled,
        "test_curve": pool_curve_on_test(ok),
        "rules": {rule: {"rule": RULES[rule], "pooled": by_rule[rule], "comparison": paper_line(by_rule[rule])}
                  for rule in RULES},
        "paper": {**PAPER, "comparison": paper_line(pooled)},
        "transfer": {"task": grid.transfer, "pooled": pool(transfers)} if grid.transfer else None,
        "timing": {"seconds": seconds, "stages_seconds": stage_totals,
                   "stage_shares": {k: v / measured for k, v in stage_totals.items()} if measured else {},
                   "note": "measured in the call that finished each cell; stages done in an earlier, interrupted "
                           "call count 0; a run stage's time is read from when its file appeared"},
    }
