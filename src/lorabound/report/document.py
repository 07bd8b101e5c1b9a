"""The run report: report.json (every figure), report.md, a self-contained report.html, and the plots.

Read top to bottom:

1. :func:`plot_curves` draws the truncation curve, the logit lens and the single-layer ablation as PNGs, each
   with the chosen boundary marked, the joint curve as a heat map (Ba x Bm) when it was computed, and, for a
   per-module or greedy-drop search, the chosen selection and the prefix of the same size over the layer stack;
2. :func:`format_table` is the variant table shown in the terminal and in report.md;
3. :func:`write_report` writes everything into the run folder. The HTML has inline CSS and the plots as
   base64 data URIs, so it opens anywhere with no network.

Every part of the report dict except ``meta`` is optional: what is missing is left out.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

from ..formatting import CSS, esc, figure, html_table, markdown_table, png
from ..metrics.scores import describe_significance
from ..runtime.files import write_bytes_atomic, write_json_atomic, write_text_atomic

PLOT_FILES = {"truncation": "truncation_curve.png", "logit_lens": "logit_lens.png", "ablation": "layer_ablation.png",
              "joint": "joint_curve.png", "selection": "selection_layers.png"}
PLOT_TITLES = {"truncation": "Truncation curve: LoRA kept on layers 0..b",
               "logit_lens": "Logit lens: base model vs full adapter",
               "ablation": "Single-layer ablation: NLL change when one layer's LoRA is removed",
               "joint": "Joint curve: attention LoRA on layers 0..Ba, MLP LoRA on 0..Bm",
               "selection": "Which (layer, module group) pairs keep LoRA"}
PLOT_CAPTIONS = {
    "truncation": "Mean probability of the ground-truth token (top) and NLL (bottom) with LoRA kept on layers 0..b "
                  "and dropped above; b = -1 is the base model, the last point the full adapter. "
                  "The dashed line marks the chosen boundary.",
    "logit_lens": "Ground-truth probability read out after each layer through the final norm and LM head, for the "
                  "base model and the full adapter. Shaded: layers whose LoRA the pruned adapter drops.",
    "ablation": "Rise in NLL when only that layer's LoRA is removed (higher: the layer's LoRA matters more). "
                "Shaded: layers whose LoRA the pruned adapter drops.",
    "joint": "Mean probability of the ground-truth token (measured on every validation example, exact) for every "
             "pair: rows Ba, columns Bm, -1 = that group's LoRA off on every layer; the diagonal is the truncation "
             "curve. Circles: pairs the per-module search generated for; star: the chosen pair.",
    "selection": "Filled: the layer's LoRA of that module group is kept; empty: dropped; hatched: the adapter has "
                 "no LoRA there. Top: the chosen selection; below it, for comparison: the prefix keeping no more LoRA "
                 "parameters.",
}
MAX_EXAMPLES = 5


# --------------------------------------------------------------------------------------------
# 1. Plots
# --------------------------------------------------------------------------------------------

def _shown_references(example: dict, most: int = 3) -> list[str]:
    """The first few references of an example; the rest are counted, not printed."""
    refs = list(example.get("references") or [])
    return refs[:most] + ([f"(+{len(refs) - most} more)"] if len(refs) > most else [])


def _mark_boundary(ax, x: float, boundary: int, shade_from: float | None = None) -> None:
    """A dashed vertical line labelled 'b = N'; optionally shade the layers whose LoRA is dropped."""
    ax.axvline(x, color="#c0392b", linestyle="--", linewidth=1.3)
    if shade_from is not None:
        lo, hi = ax.get_xlim()
        ax.axvspan(shade_from, hi, color="#c0392b", alpha=0.07, linewidth=0)
        ax.set_xlim(lo, hi)
    ax.text(x, 0.97, f" b = {boundary}", transform=ax.get_xaxis_transform(), color="#c0392b",
            ha="left", va="top", fontsize=9, fontweight="bold")


def _plot_truncation(curve: dict, boundary: int | None) -> bytes:
    x = curve["boundary"]
    fig, (top, bottom) = figure(rows=2)
    top.plot(x, curve["mean_prob"], marker="o", markersize=3, color="#1f77b4", label="mean ground-truth prob")
    if curve.get("accuracy"):
        top.plot(x, curve["accuracy"], marker=".", markersize=3, color="#2ca02c", alpha=0.7,
                 label="top-1 accuracy")
    top.set_ylabel("probability")
    top.set_title(PLOT_TITLES["truncation"], fontsize=10)
    if curve.get("nll"):
        bottom.plot(x, curve["nll"], marker="o", markersize=3, color="#ff7f0e")
    only = curve.get("layers_only_baseline")
    if only:  # the adapter has parts no boundary drops: every layer's LoRA off is not the base model (b = -1)
        label = "LoRA off on every layer, " + ", ".join(only["parts_on"]) + " on"
        top.axhline(only["mean_prob"], color="#9467bd", linestyle="--", linewidth=1, label=label)
        bottom.axhline(only["nll"], color="#9467bd", linestyle="--", linewidth=1)
    top.legend(loc="lower right", fontsize=8)
    bottom.set_ylabel("NLL (nats/token)")
    bottom.set_xlabel("boundary b  (-1 = base model, last = full adapter)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if boundary is not None:
            _mark_boundary(ax, boundary, boundary)
    return png(fig)


def _plot_logit_lens(curve: dict, boundary: int | None) -> bytes:
    fig, (ax,) = figure()
    ax.plot(curve["layer"], curve["base_prob"], marker="o", markersize=3, color="#7f7f7f", label="base model")
    ax.plot(curve["layer"], curve["full_prob"], marker="o", markersize=3, color="#1f77b4", label="full adapter")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean ground-truth prob")
    ax.set_title(PLOT_TITLES["logit_lens"] + _approximated(curve), fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    if boundary is not None:
        _mark_boundary(ax, boundary + 0.5, boundary, shade_from=boundary + 0.5)
    return png(fig)


def _approximated(curve: dict) -> str:
    """A title suffix for a curve computed on part of the examples (analysis without --exact-curves)."""
    approx = curve.get("approximated")
    return f"\n(approximated: first {approx['examples']} of {approx['of']} examples)" if approx else ""


def _ablation_deltas(curve: dict) -> list[float] | None:
    if curve.get("delta_nll") is not None:
        return curve["delta_nll"]
    if curve.get("nll") is not None and curve.get("full_nll") is not None:
        return [nll - curve["full_nll"] for nll in curve["nll"]]
    return None


def _plot_ablation(curve: dict, boundary: int | None) -> bytes:
    deltas = _ablation_deltas(curve)
    fig, (ax,) = figure()
    colors = ["#1f77b4" if d > 0 else "#9467bd" for d in deltas]
    ax.bar(curve["layer"], deltas, color=colors, width=0.8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("layer whose LoRA is removed")
    ax.set_ylabel("delta NLL vs full adapter")
    ax.set_title(PLOT_TITLES["ablation"] + _approximated(curve), fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    if boundary is not None:
        _mark_boundary(ax, boundary + 0.5, boundary, shade_from=boundary + 0.5)
    return png(fig)


def _plot_joint(joint: dict, search: dict | None) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bounds = joint["attention_boundary"]
    fig = Figure(figsize=(6.4, 5.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(joint["mean_prob"], origin="lower", cmap="viridis", aspect="auto")  # cell (i, j) at x=j, y=i
    fig.colorbar(image, ax=ax, label="mean ground-truth probability")
    step = max(1, len(bounds) // 12)  # at most about a dozen tick labels per axis
    ticks = list(range(0, len(bounds), step))
    ax.set_xticks(ticks, [str(bounds[i]) for i in ticks])
    ax.set_yticks(ticks, [str(bounds[i]) for i in ticks])
    for row in (search or {}).get("candidates") or []:
        if "attention_boundary" in row:
            x, y = bounds.index(row["mlp_boundary"]), bounds.index(row["attention_boundary"])
            if row.get("selection") == search.get("selection"):
                ax.plot(x, y, marker="*", markersize=15, markerfacecolor="#c0392b", markeredgecolor="black")
            else:
                ax.plot(x, y, marker="o", markersize=8, markerfacecolor="none", markeredgecolor="white")
    ax.set_xlabel("Bm: MLP LoRA kept on layers 0..Bm")
    ax.set_ylabel("Ba: attention LoRA kept on layers 0..Ba")
    ax.set_title(PLOT_TITLES["joint"], fontsize=10)
    return png(fig)


def _plot_selection(search: dict, adapter_layers: list[int] | None) -> bytes:
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    from ..lora.selection import Selection

    chosen = Selection.from_json(search.get("selection"))
    prefix = search.get("compared_prefix") or {}
    panels = [(f"chosen: {search.get('selection_text')}", chosen)]
    if prefix and Selection.from_json(prefix.get("selection")) != chosen:
        panels.append((f"prefix of the same size: {prefix.get('describe')}", Selection.from_json(prefix["selection"])))
    named = {group for s in (p[1] for p in panels) if s.kept for group, _ in s.kept}
    groups = ["attention", "mlp"] + (["other"] if "other" in named else [])
    num_layers = search.get("num_layers") or (max(adapter_layers or [0]) + 1)
    has_lora = set(adapter_layers) if adapter_layers else set(range(num_layers))
    fig, axes = figure(rows=len(panels))
    for ax, (title, selection) in zip(axes, panels):
        for y, group in enumerate(groups):
            for layer in range(num_layers):
                if layer not in has_lora:
                    ax.add_patch(Rectangle((layer - 0.45, y - 0.4), 0.9, 0.8, fill=False, hatch="///",
                                           edgecolor="#bbbbbb"))
                    continue
                kept = selection.keeps(layer, group)
                ax.add_patch(Rectangle((layer - 0.45, y - 0.4), 0.9, 0.8, facecolor="#1f77b4" if kept else "white",
                                       edgecolor="#1f77b4"))
        ax.set_xlim(-0.7, num_layers - 0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.7, len(groups) - 0.3)
        ax.set_yticks(range(len(groups)), groups)
        ax.set_title(title, fontsize=9)
    axes[-1].set_xlabel("layer")
    axes[0].figure.suptitle(PLOT_TITLES["selection"], fontsize=10)
    return png(fig)


def _plot_bytes(curves: dict, boundary: int | None, search: dict | None = None) -> dict[str, bytes]:
    """PNG bytes of each plot whose curve (or selection search) is present, keyed by curve name."""
    curves = curves or {}
    out = {}
    if (curves.get("truncation") or {}).get("mean_prob"):
        out["truncation"] = _plot_truncation(curves["truncation"], boundary)
    if (curves.get("logit_lens") or {}).get("layer"):
        out["logit_lens"] = _plot_logit_lens(curves["logit_lens"], boundary)
    if (curves.get("ablation") or {}).get("layer") and _ablation_deltas(curves["ablation"]) is not None:
        out["ablation"] = _plot_ablation(curves["ablation"], boundary)
    if (curves.get("joint") or {}).get("mean_prob"):
        out["joint"] = _plot_joint(curves["joint"], search)
    if (search or {}).get("selection_text") is not None:
        out["selection"] = _plot_selection(search, (curves.get("meta") or {}).get("adapter_layers"))
    return out


def plot_curves(curves: dict, boundary: int | None, out_dir) -> dict[str, Path]:
    """Write truncation_curve.png, logit_lens.png and layer_ablation.png (those whose data exist) into out_dir.

    The boundary, if given, is a dashed vertical line labelled 'b = N' on each. Returns {curve name: path}.
    """
    paths = {}
    for name, data in _plot_bytes(curves, boundary).items():
        paths[name] = Path(out_dir) / PLOT_FILES[name]
        write_bytes_atomic(paths[name], data)
    return paths


# --------------------------------------------------------------------------------------------
# 2. The variant table
# --------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("Variant", "BLEU", "ROUGE-L", "chrF", "LoRA params", "Adapter (MB)", "Where b comes from")
NUMERIC_COLUMNS = range(1, 6)  # the rest are text


def _number(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _size(variant: dict) -> str:
    """The adapter's size on disk; an estimate says so (see evaluation_table.SizeOf for how each is found)."""
    text = _number(_as_float(variant.get("adapter_mb")))
    return f"~{text} (estimate)" if variant.get("adapter_mb_source") == "estimate" and text != "n/a" else text


def _table_rows(report: dict) -> list[list[str]]:
    rows = []
    for variant in report.get("variants") or []:
        metrics = variant.get("metrics") or {}
        rows.append([str(variant.get("name", "?")), _number(metrics.get("bleu")), _number(metrics.get("rougeL")),
                     _number(metrics.get("chrf")), _number(variant.get("lora_params")), _size(variant),
                     str(variant.get("origin") or "not recorded")])
    return rows


def _as_float(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def format_table(report: dict) -> str:
    """Variant x BLEU, ROUGE-L, chrF, LoRA parameters, adapter size (MB) and why the row is there, as a
    markdown table."""
    return markdown_table(list(TABLE_COLUMNS), _table_rows(report), right=NUMERIC_COLUMNS)


# --------------------------------------------------------------------------------------------
# 3. Writing the report
# --------------------------------------------------------------------------------------------

def _significance_sentences(report: dict) -> list[str]:
    sentences = []
    for entry in report.get("significance") or []:
        sentence = entry.get("sentence")
        if not sentence and {"metric", "a_score", "b_score", "ci_low", "ci_high", "p_value"} <= set(entry):
            sentence = describe_significance(entry, entry.get("a", "A"), entry.get("b", "B"))
        if sentence:
            sentences.append(sentence)
    return sentences


def _find_variant(report: dict, prefix: str, boundary: int | None = None) -> dict | None:
    """The variant whose name starts with `prefix` (and, when given, evaluated at `boundary`)."""
    return next((v for v in report.get("variants") or [] if str(v.get("name", "")).startswith(prefix)
                 and (boundary is None or v.get("boundary") == boundary)), None)


def _savings(report: dict) -> list[tuple[str, str]]:
    """(label, value) rows: kept fraction, LoRA parameters and adapter size before and after pruning."""
    search = report.get("search") or {}
    rows = []
    if search.get("boundary") is not None:
        rows.append(("Boundary b", f"{search['boundary']} (LoRA kept on layers 0..{search['boundary']}"
                     + (f" of {search['num_layers']})" if search.get("num_layers") else ")")))
    if search.get("kept_fraction") is not None:
        rows.append(("Kept fraction of LoRA parameters", f"{100 * search['kept_fraction']:.1f}%"))
    if search.get("lora_params_total") is not None and search.get("lora_params_kept") is not None:
        total, kept = search["lora_params_total"], search["lora_params_kept"]
        rows.append(("LoRA parameters, full -> pruned", f"{total:,} -> {kept:,} (saves {total - kept:,})"))
    full = _find_variant(report, "full")
    pruned = _find_variant(report, "pruned", search.get("boundary"))  # the chosen b, not a comparison
    if full and pruned and full is not pruned and full.get("adapter_mb") is not None \
            and pruned.get("adapter_mb") is not None:
        before, after = float(full["adapter_mb"]), float(pruned["adapter_mb"])
        rows.append(("Adapter size, full -> pruned",
                     f"{before:.2f} MB -> {after:.2f} MB (saves {before - after:.2f} MB)"))
    return rows


def _example_columns(report: dict) -> list[str]:
    """Output columns in the variants' order (base / full / pruned), then any others the examples name."""
    names = [str(v.get("name")) for v in report.get("variants") or [] if v.get("name") is not None]
    for example in report.get("examples") or []:
        names += [n for n in (example.get("outputs") or {}) if n not in names]
    return names


def _notes(report: dict) -> list[str]:
    notes = [str(n) for n in report.get("notes") or []]
    meta = (report.get("curves") or {}).get("meta") or {}
    if meta:
        parts = [f"{key.replace('_', ' ')}: {meta[key]}" for key in
                 ("split", "n_examples", "n_target_tokens", "n_truncated", "n_skipped") if key in meta]
        notes.append("Curves computed on " + ", ".join(parts) + ".")
    if any(v.get("adapter_mb_source") for v in report.get("variants") or []):
        notes.append("Adapter (MB): measured on disk for the full adapter and exported adapters; for a pruned row "
                     "evaluated in memory, the exact size of the safetensors file a peft export at that b writes "
                     "(tensors in their stored dtype); an estimate is marked ~ (estimate).")
    if report.get("bleu_signature"):
        notes.append(f"BLEU signature: {report['bleu_signature']}")
    if report.get("rouge_signature"):
        notes.append(f"ROUGE signature: {report['rouge_signature']}")
    return notes


def _title(meta: dict) -> str:
    return "lorabound report: " + " / ".join(str(meta[k]) for k in ("model", "adapter", "task") if meta.get(k))


def _meta_line(meta: dict) -> str:
    parts = []
    sizes = meta.get("sizes") or {}
    if sizes:
        parts.append("split sizes " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    for key, label in (("seed", "seed"), ("max_new_tokens", "max new tokens"),
                       ("lorabound_version", "lorabound"), ("created", "created")):
        if meta.get(key) is not None:
            parts.append(f"{label} {meta[key]}")
    return "; ".join(parts)


def _versus_full(c: dict) -> str:
    """The candidate's mean of BLEU and ROUGE-L against the full adapter on validation: diff [95% CI], p,
    what it could detect, and the non-inferiority outcome under --goal size."""
    test = (c.get("vs_full") or {}).get("bleu+rougeL")
    if test is None:
        return "reference" if c.get("bleu") is not None else ""
    detect = f", detects {test['mdd']:.1f}" if test.get("mdd") is not None else ""
    ni = {True: ", non-inferior", False: ", not shown non-inferior", None: ", not tested (sequence stopped)"}
    return (f"{test['diff']:+.2f} [{test['ci_low']:+.2f}, {test['ci_high']:+.2f}], "
            f"p = {test['p_value']:.3f}{detect}{ni[c['non_inferior']] if 'non_inferior' in c else ''}")


def _candidate_rows(report: dict) -> list[list[str]]:
    rows = []
    for c in (report.get("search") or {}).get("candidates") or []:
        name = c["describe"] if "describe" in c else str(c.get("boundary"))  # a selection (per-module, greedy-drop)
        rows.append([name, _number(c.get("mean_prob"), 4), _number(c.get("bleu")),
                     _number(c.get("rougeL")), _number(c.get("chrf")), _versus_full(c),
                     ", ".join(c.get("why") or [])])
    return rows


CANDIDATE_COLUMNS = ["b", "mean prob", "BLEU", "ROUGE-L", "chrF",
                     "mean of BLEU, ROUGE-L vs full [95% CI], p, detectable (80% power)", "candidate because"]


def _candidate_columns(report: dict) -> list[str]:
    selections = (report.get("search") or {}).get("selection_text") is not None
    return ["selection"] + CANDIDATE_COLUMNS[1:] if selections else CANDIDATE_COLUMNS


def _prefix_comparison(report: dict) -> list[str]:
    """Sentences: the chosen selection against the prefix of the same size, on validation (and on test)."""
    search = report.get("search") or {}
    prefix = search.get("compared_prefix")
    if not prefix:
        return []
    if not isinstance(prefix.get("tests"), dict):
        return [f"The chosen selection is the prefix of the same size ({prefix['describe']})."]
    t = prefix["tests"]["bleu+rougeL"]
    said = [f"On validation, for comparison: the chosen selection ({search['selection_text']}, "
            f"{search['lora_params_kept']:,} LoRA parameters) against the prefix of the same size "
            f"({prefix['describe']}, {prefix['lora_params_kept']:,}): mean of BLEU and ROUGE-L {t['chosen']:.2f} vs {t['prefix']:.2f}, "
            f"{t['diff']:+.2f} [95% CI {t['ci_low']:+.2f}, {t['ci_high']:+.2f}], p = {t['p_value']:.3f} "
            "(optimistic: the validation data chose the selection)."]
    on_test = report.get("selection_test")
    if on_test:
        said.append(f"On test, {on_test['describe']} (measured): BLEU {on_test['metrics']['bleu']:.2f}, ROUGE-L "
                    f"{on_test['metrics']['rougeL']:.2f}, chrF {on_test['metrics']['chrf']:.2f}.")
    return said


def render_markdown(report: dict, plot_files: dict[str, str]) -> str:
    """report.md: the same sections as the HTML, with the plots linked as files beside it."""
    meta = report.get("meta") or {}
    out = [f"# {_title(meta)}", ""]
    if _meta_line(meta):
        out += [f"_{_meta_line(meta)}_", ""]
    if report.get("verdict"):
        out += [f"**Verdict:** {report['verdict']}", ""]
    out += [f"- {s}" for s in _significance_sentences(report)]
    out += ["", "## Metrics", "", format_table(report), ""]
    savings = _savings(report)
    if savings:
        out += ["## Savings", "", markdown_table(["Quantity", "Value"], [list(r) for r in savings], right=range(0)), ""]
    search = report.get("search") or {}
    if search:
        out += ["## Boundary search", ""]
        if search.get("criterion"):
            out += [f"Criterion: {search['criterion']}. {search.get('reason', '')}".strip(), ""]
        if _candidate_rows(report):
            out += [markdown_table(_candidate_columns(report), _candidate_rows(report)), ""]
        out += [f"{sentence}\n" for sentence in _prefix_comparison(report)]
    if plot_files:
        out += ["## Curves", ""]
        out += [f"![{PLOT_TITLES[name]}]({file})\n\n{PLOT_CAPTIONS[name]}\n" for name, file in plot_files.items()]
    speed = report.get("speed")
    if speed:
        header, rows = _speed_rows(speed)
        out += ["## Inference speed (measured)", "", _speed_intro(speed), "", markdown_table(header, rows), ""]
    examples = (report.get("examples") or [])[:MAX_EXAMPLES]
    if examples:
        columns = _example_columns(report)
        rows = [[e.get("input", ""), " / ".join(_shown_references(e))]
                + [(e.get("outputs") or {}).get(c, "") for c in columns] for e in examples]
        out += ["## Example generations", "", markdown_table(["Input", "References"] + columns, rows, right=range(0)),
                ""]
    notes = _notes(report)
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out).rstrip() + "\n"


def render_html(report: dict, plots: dict[str, bytes]) -> str:
    """report.html: one file, inline CSS, plots as data URIs, every text from the data escaped."""
    meta = report.get("meta") or {}
    title = _title(meta)
    parts = [f"<h1>{esc(title)}</h1>"]
    if _meta_line(meta):
        parts.append(f'<p class="meta">{esc(_meta_line(meta))}</p>')
    if report.get("verdict"):
        parts.append(f'<p class="verdict" id="verdict"><strong>Verdict:</strong> {esc(report["verdict"])}</p>')
    sentences = _significance_sentences(report)
    if sentences:
        parts.append('<ul class="significance">' + "".join(f"<li>{esc(s)}</li>" for s in sentences) + "</ul>")

    parts.append("<h2>Metrics</h2>")
    parts.append(html_table(list(TABLE_COLUMNS), _table_rows(report), table_id="metrics",
                             numeric=NUMERIC_COLUMNS))
    savings = _savings(report)
    if savings:
        parts.append("<h2>Savings</h2>")
        parts.append(html_table(["Quantity", "Value"], [list(r) for r in savings], table_id="savings",
                                 numeric=range(0)))

    search = report.get("search") or {}
    if search:
        parts.append("<h2>Boundary search</h2>")
        if search.get("criterion"):
            parts.append(f"<p>Criterion: <strong>{esc(search['criterion'])}</strong>. "
                         f"{esc(search.get('reason', ''))}</p>")
        if _candidate_rows(report):
            parts.append(html_table(_candidate_columns(report), _candidate_rows(report), table_id="candidates"))
        parts += [f'<p class="prefix">{esc(sentence)}</p>' for sentence in _prefix_comparison(report)]

    if plots:
        parts.append("<h2>Curves</h2>")
        for name, data in plots.items():
            uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            parts.append(f'<figure><img src="{uri}" alt="{esc(PLOT_TITLES[name])}">'
                         f"<figcaption>{esc(PLOT_CAPTIONS[name])}</figcaption></figure>")

    speed = report.get("speed")
    if speed:
        parts.append("<h2>Inference speed (measured)</h2>")
        parts.append(f"<p>{esc(_speed_intro(speed))}</p>")
        parts.append(html_table(*_speed_rows(speed), table_id="speed"))

    examples = (report.get("examples") or [])[:MAX_EXAMPLES]
    if examples:
        columns = _example_columns(report)
        rows = [[e.get("input", ""), "\n".join(_shown_references(e))]
                + [(e.get("outputs") or {}).get(c, "") for c in columns] for e in examples]
        parts.append("<h2>Example generations</h2>")
        parts.append(html_table(["Input", "References"] + columns, rows, table_id="examples",
                                 css_class="examples", numeric=range(0)))

    notes = _notes(report)
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")

    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _speed_rows(speed: dict) -> tuple[list[str], list[list[str]]]:
    from ..timing import speed_table

    return speed_table(speed)


def _speed_intro(speed: dict) -> str:
    from ..timing import describe

    return f"Written by 'lorabound speed' into speed.json ({speed.get('created', 'time not recorded')}). " \
        + describe(speed)


def _speed_of(run_dir: Path) -> dict | None:
    """The run folder's speed.json (written by `lorabound speed --run`), or None when absent or unreadable."""
    try:
        return json.loads((run_dir / "speed.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_report(run_dir, report: dict) -> dict[str, Path]:
    """Write report.json, report.md, report.html and the plot PNGs into run_dir, each file atomically.

    A speed.json in run_dir (see speed.py) is shown as the speed section; report.json does not copy it.
    Returns {"json", "markdown", "html", and one key per plot written}: paths.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    speed = _speed_of(run_dir)
    shown = {**report, "speed": speed} if speed and not report.get("speed") else report
    boundary = (report.get("search") or {}).get("boundary")
    plots = _plot_bytes(report.get("curves") or {}, boundary, report.get("search"))
    paths: dict[str, Path] = {}
    for name, data in plots.items():
        paths[name] = run_dir / PLOT_FILES[name]
        write_bytes_atomic(paths[name], data)
    paths["json"] = run_dir / "report.json"
    write_json_atomic(paths["json"], report)
    paths["markdown"] = run_dir / "report.md"
    write_text_atomic(paths["markdown"], render_markdown(shown, {n: PLOT_FILES[n] for n in plots}))
    paths["html"] = run_dir / "report.html"
    write_text_atomic(paths["html"], render_html(shown, plots))
    return paths
