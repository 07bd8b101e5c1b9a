"""The report of a study: study.json, study.md and a self-contained study.html with the plots embedded, each
written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..metrics.scores import METRIC_LABELS, format_p
from ..metrics.stats import UNITS_LIMIT
from ..runtime.files import write_bytes_atomic, write_json_atomic, write_text_atomic
from .grid import task_label
from .pooling import CELL_BOOTSTRAP, LEVEL, METRICS, PAPER, TESTED


def plot_overlay(rows: list[dict]) -> bytes | None:
    """Every cell's truncation curve, normalised to the full adapter's gain over the base (0 = base, 1 = full)."""
    from ..formatting import figure, png

    curves = [r for r in rows if r.get("truncation", {}).get("mean_prob")]
    if not curves:
        return None
    same_depth = len({r["num_layers"] for r in curves}) == 1
    fig, (ax,) = figure()
    for r in curves:
        bs, ps = r["truncation"]["boundary"], r["truncation"]["mean_prob"]
        gain = ps[-1] - ps[0]
        ys = [(p - ps[0]) / gain if gain else 0.0 for p in ps]
        xs = bs if same_depth else [(b + 1) / r["num_layers"] for b in bs]
        line, = ax.plot(xs, ys, linewidth=1, alpha=0.7, label=r["id"])
        if r.get("boundary") in bs:
            i = bs.index(r["boundary"])
            ax.plot([xs[i]], [ys[i]], "o", color=line.get_color(), markersize=5)
    ax.axhline(1.0, color="#888", linewidth=0.8, linestyle=":")
    ax.set_xlabel("b (LoRA kept on layers 0..b)" if same_depth else "share of layers keeping LoRA")
    ax.set_ylabel("share of the full adapter's gain")
    ax.set_title("Truncation curves of every cell, normalised (dot: the chosen b)", fontsize=10)
    if len(curves) <= 12:
        ax.legend(fontsize=6, ncol=2)
    return png(fig)


def plot_differences(rows: list[dict], pooled: dict) -> bytes | None:
    """Per cell, pruned minus full with its 95% interval, for BLEU and ROUGE-L; the pooled mean as a line."""
    from ..formatting import figure, png

    ok = [r for r in rows if r.get("in_domain")]
    if not ok:
        return None
    fig, axes = figure(rows=2)
    for ax, metric in zip(axes, ("bleu", "rougeL")):
        tests = [(r["id"], r["in_domain"]["tests"].get(metric)) for r in ok]
        tests = [(name, t) for name, t in tests if t]
        ys = list(range(len(tests)))
        ax.errorbar([t["diff"] for _, t in tests], ys, fmt="o", color="#1f77b4", markersize=4,
                    xerr=[[t["diff"] - t["ci_low"] for _, t in tests], [t["ci_high"] - t["diff"] for _, t in tests]])
        ax.axvline(0, color="#888", linewidth=0.8)
        if metric in pooled:
            ax.axvline(pooled[metric]["mean_diff"], color="#2ca02c", linestyle="--", linewidth=1.2)
        ax.set_yticks(ys, [name for name, _ in tests], fontsize=6)
        ax.set_ylabel(METRIC_LABELS[metric])
    axes[-1].set_xlabel("pruned minus full adapter on test (points; bars: 95% paired-bootstrap interval)")
    return png(fig)


PLOT_FILES = {"overlay": "truncation_overlay.png", "differences": "differences.png"}
PLOT_CAPTIONS = {
    "overlay": "Each cell's truncation curve on validation (mean ground-truth probability with LoRA kept on layers "
               "0..b), rescaled so the base model is 0 and the full adapter 1. Dots: the b each cell chose.",
    "differences": "Test score of the pruned variant (the chosen b) minus the full adapter, per cell, with the "
                   "paired-bootstrap 95% interval; dashed: the pooled mean; a cell that kept every layer sits at 0.",
}


def _num(value, digits: int = 2, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _cell_rows(summary: dict) -> list[list[str]]:
    rows = []
    for r in summary["cells"]:
        label = [r["id"], task_label(r["task"]), r["training"]["name"], str(r["seed"])]
        d = r.get("in_domain")
        if r["status"] != "ok" or not d:
            reason = r.get("reason") or "the report has no row for the chosen b"
            rows.append(label + [f"failed: {reason}"] + [""] * (len(CELL_COLUMNS) - 5))
            continue
        share = f"{d['share_dropped']:.1%}" if d["share_dropped"] is not None else "n/a"
        scores = ["/".join(_num(d["metrics"][v].get(m), 1) for v in ("base", "full", "pruned")) for m in METRICS]
        chosen = str(r["boundary"]) if r["boundary"] is not None else d.get("selection") or "selection"
        rows.append(label + [chosen, share] + scores + [_test_text(d["tests"].get(m)) for m in METRICS]
                    + [_transfer_text(r)])
    return rows


CELL_COLUMNS = ["Cell", "Task", "Training", "Seed", "b", "LoRA dropped", "BLEU base/full/pruned",
                "ROUGE-L base/full/pruned", "chrF base/full/pruned", "Δ BLEU [95% CI] p", "Δ ROUGE-L [95% CI] p",
                "Δ chrF [95% CI] p", "Transfer Δ ROUGE-L"]


def _test_text(test: dict | None) -> str:
    if not test:
        return "n/a"
    if test["source"] == "nothing dropped":
        return "0 (nothing dropped)"
    detect = f", detects {_num(test['mdd'], 1)}" if test.get("mdd") is not None else ""
    return f"{_num(test['diff'], sign=True)} [{_num(test['ci_low'], sign=True)}, {_num(test['ci_high'], sign=True)}] " \
           f"{format_p(test['p_value'])}{detect}"


def _transfer_text(row: dict) -> str:
    t = (row.get("transfer") or {}).get("tests", {}).get("rougeL")
    return f"{task_label(row['transfer']['task'])}: {_test_text(t)}" if t else "—"


def _with_interval(p: dict) -> str:
    """The pooled mean difference and its interval; the mean alone where there is none (too few test sets, or
    nothing dropped)."""
    mean = _num(p["mean_diff"], sign=True)
    return mean if p["ci_low"] is None else f"{mean} ({_num(p['ci_low'], sign=True)} to {_num(p['ci_high'], sign=True)})"


def _detectable(p: dict, metric: str) -> str:
    """What a pooled comparison detects (80% power) and the test sets that would detect the paper's gain."""
    if p.get("mdd") is None:
        return "—"
    needed = p.get("test_sets_for_effect")
    effect = PAPER.get(metric)
    if effect is None:
        return _num(p["mdd"])
    return _num(p["mdd"]) + (f"; {effect:g} needs {needed:,} test sets" if needed else
                             f"; {effect:g}: no spread to size from" if not p.get("se") else
                             f"; {effect:g}: beyond {UNITS_LIMIT:,} test sets")


POOLED_COLUMNS = ["Metric", "Cells (test sets)", "Mean Δ pruned − full", "95% CI (bootstrap over test sets)",
                  "Detectable (80% power)", "The paper's claim", "Better / not different / worse (Holm)"]


def _pooled_rows(pooled: dict) -> list[list[str]]:
    rows = []
    for metric in METRICS:
        p = pooled.get(metric)
        if p:
            rows.append([METRIC_LABELS[metric], f"{p['n']} ({p['test_sets']})", _num(p["mean_diff"], sign=True),
                         f"{_num(p['ci_low'], sign=True)} to {_num(p['ci_high'], sign=True)}", _detectable(p, metric),
                         p.get("claim") or "—", f"{p['better']} / {p['not_different']} / {p['worse']}"])
    return rows


RULE_COLUMNS = ["Rule", "Cells (test sets)", "LoRA dropped", "BLEU Δ (95% CI)", "BLEU detectable", "BLEU: the claim",
                "ROUGE-L Δ (95% CI)", "ROUGE-L detectable", "ROUGE-L: the claim"]


def _rule_rows(summary: dict) -> list[list[str]]:
    """Per rule, pooled over independent test sets: share dropped and the test differences against the full adapter."""
    rows = []
    for rule, found in (summary.get("rules") or {}).items():
        pooled = found["pooled"]
        if not pooled.get("n_cells"):
            rows.append([rule, "0", "—", "no cell", "", "", "", "", ""])
            continue
        cells = [rule, f"{pooled['n_cells']} ({(pooled.get('bleu') or {}).get('test_sets', '—')})",
                 "—" if pooled.get("share_dropped") is None else f"{pooled['share_dropped']:.1%}"]
        for metric in TESTED:
            p = pooled.get(metric)
            cells += (["—", "—", "—"] if p is None else
                      [_with_interval(p), _detectable(p, metric), p.get("claim") or "—"])
        rows.append(cells)
    return rows


CURVE_COLUMNS = ["LoRA kept (share of parameters)", "Cells (test sets)", "Boundaries", "BLEU Δ (95% CI)",
                 "BLEU detectable", "ROUGE-L Δ (95% CI)", "ROUGE-L detectable"]


def _curve_rows(summary: dict) -> list[list[str]]:
    """The pooled test-side curve: per share of LoRA kept, the test difference from the full adapter."""
    rows = []
    for entry in summary.get("test_curve") or []:
        if not entry["cells"]:
            continue
        low, high = entry["share_kept"]
        cells = [f"{low:.0%} to {high:.0%}", f"{entry['cells']} ({(entry.get('bleu') or {}).get('test_sets', '—')})",
                 ", ".join(map(str, entry["boundaries"]))]
        for metric in TESTED:
            p = entry.get(metric)
            cells += (["—", "—"] if p is None else
                      [_with_interval(p), _detectable(p, metric)])
        rows.append(cells)
    return rows


CURVE_NOTE = ("Every boundary each cell evaluated on test (its validation candidates, chosen or not), against the "
              "full adapter: in each band of LoRA kept, a cell counts once (the mean over its boundaries there); "
              "the interval is over independent test sets, as above.")


def _rule_notes(summary: dict) -> list[str]:
    return [f"{rule}: {found['rule']}." for rule, found in (summary.get("rules") or {}).items()]


def _timing_rows(summary: dict) -> list[list[str]]:
    timing = summary["timing"]
    rows = [[stage, f"{seconds:.0f} s", f"{timing['stage_shares'].get(stage, 0):.0%}"]
            for stage, seconds in sorted(timing["stages_seconds"].items(), key=lambda kv: -kv[1])]
    if timing["stages_seconds"]:
        rows.append(["all stages, summed over cells", f"{sum(timing['stages_seconds'].values()):.0f} s", "100%"])
    if timing.get("seconds") is not None:
        rows.append(["this call, wall (cells finished by earlier calls are not in it)", f"{timing['seconds']:.0f} s",
                     ""])
    return rows


def _method_notes(summary: dict) -> list[str]:
    grid = summary["grid"]
    notes = [
        "Δ = test score of the pruned variant (LoRA kept on layers 0..b, b chosen on validation) minus the full "
        f"adapter's; per cell a paired bootstrap over test examples ({grid['bootstrap']} resamples).",
        "Pooled: the mean Δ over finished cells (one adapter each, equal weight). Its standard error comes from "
        f"{CELL_BOOTSTRAP:,} seeded bootstrap resamples of the k independent test sets (cells of one task and seed "
        "share theirs, so they are resampled together; unless [data] disjoint_tests = true, seeds reshuffle one "
        "pool of examples, so the test sets of two seeds of a task can share examples, and the interval is then "
        "somewhat too narrow), scaled by sqrt(k / (k - 1)); the 95% interval is the mean +- t(k - 1) standard "
        "errors, and detectable is the difference found with 80% power, (t(0.975) + t(0.8)) standard errors; "
        "'needs N test sets' is how many independent test sets, at the spread between these, would detect the "
        "paper's gain (t with N - 1 degrees of freedom). "
        "With fewer than 3 test sets nothing is judged. The paper's claim is reproduced when the interval lies "
        "above 0 and holds the claimed gain, not reproduced when it lies below the claimed gain, inconclusive "
        "when it holds both.",
        f"Better / worse: the cell's p-value stays below {LEVEL} after Holm correction across the cells where "
        "something was dropped (each metric its own family); cells that kept every layer count as not different.",
        "Per-cell tests cover BLEU and ROUGE-L (sacrebleu gives no per-sentence chrF statistics); a BLEU or "
        "ROUGE-L test a cell's report lacks is computed from the cell's saved hypotheses with the same seed.",
        "Times: " + summary["timing"]["note"] + ".",
    ]
    if summary["failed"]:
        notes.insert(0, f"{len(summary['failed'])} cell(s) failed and are left out of the pooled figures: "
                     + "; ".join(f"{f['id']}: {f['reason']}" for f in summary["failed"]))
    return notes


def _headline(summary: dict) -> str:
    n, failed = len(summary["cells"]), len(summary["failed"])
    return f"{n - failed} of {n} cells finished" + (f", {failed} failed (see below)" if failed else "") + "."


def render_study_markdown(summary: dict, plot_files: dict[str, str]) -> str:
    from ..formatting import markdown_table

    pooled = summary["pooled"]
    out = ["# lorabound study: does dropping upper-layer LoRA help?", "", _headline(summary), "",
           f"**{summary['paper']['comparison']}**", "", "## Three rules, pooled over independent test sets", "",
           markdown_table(RULE_COLUMNS, _rule_rows(summary)), ""] + [f"- {n}" for n in _rule_notes(summary)] + [
           "", "## The test-side curve, pooled: does any depth of dropping beat the full adapter?", "",
           markdown_table(CURVE_COLUMNS, _curve_rows(summary)), "", CURVE_NOTE, "",
           "## Pooled across cells (each cell's own search)", "",
           markdown_table(POOLED_COLUMNS, _pooled_rows(pooled)), ""]
    if pooled.get("share_dropped") is not None:
        out += [f"Mean share of LoRA parameters dropped: {pooled['share_dropped']:.1%}.", ""]
    transfer = summary.get("transfer")
    if transfer and transfer["pooled"].get("n_cells"):
        out += [f"## Transfer: each cell's b applied on {task_label(transfer['task'])} test", "",
                markdown_table(POOLED_COLUMNS, _pooled_rows(transfer["pooled"])), ""]
    out += ["## Cells", "", markdown_table(CELL_COLUMNS, _cell_rows(summary), right=range(4, len(CELL_COLUMNS))), ""]
    for name, file in plot_files.items():
        out += [f"![{name}]({file})", "", PLOT_CAPTIONS[name], ""]
    out += ["## Time", "", markdown_table(["Stage", "Time", "Share"], _timing_rows(summary)), ""]
    out += ["## Notes", ""] + [f"- {n}" for n in _method_notes(summary)]
    return "\n".join(out) + "\n"


def render_study_html(summary: dict, plots: dict[str, bytes]) -> str:
    import base64

    from ..formatting import CSS, esc, html_table

    pooled = summary["pooled"]
    parts = ["<h1>lorabound study: does dropping upper-layer LoRA help?</h1>",
             f'<p class="meta">{esc(_headline(summary))}</p>',
             f'<p class="verdict" id="paper">{esc(summary["paper"]["comparison"])}</p>',
             "<h2>Three rules, pooled over independent test sets</h2>",
             html_table(RULE_COLUMNS, _rule_rows(summary), table_id="rules"),
             "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in _rule_notes(summary)) + "</ul>",
             "<h2>The test-side curve, pooled: does any depth of dropping beat the full adapter?</h2>",
             html_table(CURVE_COLUMNS, _curve_rows(summary), table_id="test-curve"),
             f"<p>{esc(CURVE_NOTE)}</p>",
             "<h2>Pooled across cells (each cell's own search)</h2>",
             html_table(POOLED_COLUMNS, _pooled_rows(pooled), table_id="pooled")]
    if pooled.get("share_dropped") is not None:
        parts.append(f"<p>Mean share of LoRA parameters dropped: {pooled['share_dropped']:.1%}.</p>")
    transfer = summary.get("transfer")
    if transfer and transfer["pooled"].get("n_cells"):
        parts += [f"<h2>Transfer: each cell's b applied on {esc(task_label(transfer['task']))} test</h2>",
                  html_table(POOLED_COLUMNS, _pooled_rows(transfer["pooled"]), table_id="transfer")]
    parts += ["<h2>Cells</h2>", html_table(CELL_COLUMNS, _cell_rows(summary), table_id="cells", numeric=range(4, len(CELL_COLUMNS)))]
    for name, data in plots.items():
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        parts.append(f'<figure><img src="{uri}" alt="{esc(name)}"><figcaption>{esc(PLOT_CAPTIONS[name])}'
                     "</figcaption></figure>")
    parts += ["<h2>Time</h2>", html_table(["Stage", "Time", "Share"], _timing_rows(summary), table_id="time"),
              "<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in _method_notes(summary)) + "</ul>"]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>lorabound study</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def write_study_report(out: Path, summary: dict) -> dict[str, Path]:
    """study.json, study.md, study.html and the PNGs, each written atomically."""
    plots = {name: data for name, data in (("overlay", plot_overlay(summary["cells"])),
                                           ("differences", plot_differences(summary["cells"], summary["pooled"])))
             if data is not None}
    paths = {}
    for name, data in plots.items():
        paths[name] = out / PLOT_FILES[name]
        write_bytes_atomic(paths[name], data)
    paths["json"], paths["markdown"], paths["html"] = out / "study.json", out / "study.md", out / "study.html"
    write_json_atomic(paths["json"], summary)
    write_text_atomic(paths["markdown"], render_study_markdown(summary, {n: PLOT_FILES[n] for n in plots}))
    write_text_atomic(paths["html"], render_study_html(summary, plots))
    return paths
