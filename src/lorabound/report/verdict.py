"""The report's plain sentences: what the chosen boundary (or selection) does on test, and its notes."""

from __future__ import annotations

from ..generation.cache import BASE, FULL, variant_name
from ..metrics.scores import describe_significance


def verdict(search: dict, evaluation: dict, top: int) -> str:
    """Plain sentences on what the chosen boundary does on the test split, how it was chosen, and which other
    rows are there only for comparison (and why)."""
    if search.get("boundary") is None and "selection_test" in evaluation:
        return selection_verdict(search, evaluation["selection_test"])
    b = search["boundary"]
    tests = {(s["a"], s["metric"]): s for s in evaluation["significance"]}
    name = variant_name(b, top)
    why = f"b = {b}: {search['reason']}"

    def on_test(variant: str) -> str:
        return " ".join(tests[(variant, m)]["sentence"] for m in ("bleu", "rougeL") if (variant, m) in tests)

    others = [v for v in evaluation["variants"] if v["name"] not in (BASE, FULL, name)]
    curve = [v for v in others if comparison_reason(v) == CURVE_ORIGIN]
    others = [v for v in others if v not in curve]
    compared = ""
    if others:
        listed = "; ".join(f"{v['name']}: {comparison_reason(v)}" for v in others)
        compared = (f" Not chosen, shown for comparison only: {listed}. On test: "
                    + " ".join(on_test(v["name"]) for v in others))
    compared += test_side_curve(curve, tests)
    if name == FULL:
        return f"LoRA was kept on every layer, so nothing was dropped ({why}).{compared}"
    if name == BASE:
        return f"Every LoRA layer was dropped: the base model ({why}). On test: {on_test(BASE)}{compared}"
    share = 1 - search.get("kept_fraction", 0.0)
    return (f"Dropping LoRA above layer {b} removes {share:.0%} of the LoRA parameters ({why}). "
            f"On test: {on_test(name)}{compared}")


CURVE_ORIGIN = "a validation candidate (the test-side curve)"


def test_side_curve(rows: list[dict], tests: dict) -> str:
    """One sentence on the other validation candidates' test scores against the full adapter."""
    if not rows:
        return ""
    parts = []
    for v in rows:
        said = []
        for m, label in (("bleu", "BLEU"), ("rougeL", "ROUGE-L")):
            t = tests.get((v["name"], m))
            if t is not None:
                said.append(f"{label} {t['a_score'] - t['b_score']:+.1f} [{t['ci_low']:+.1f}, {t['ci_high']:+.1f}]")
        parts.append(f"{v['name']}: {', '.join(said)}")
    better = [v["name"] for v in rows if any(tests.get((v["name"], m), {}).get("p_value", 1) < 0.05
                                             and tests[(v["name"], m)]["a_score"] > tests[(v["name"], m)]["b_score"]
                                             for m in ("bleu", "rougeL"))]
    found = (f"significantly better than the full adapter on test (p < 0.05, uncorrected): {', '.join(better)}"
             if better else "none is significantly better than the full adapter on test")
    return (f" The other validation candidates on test (difference from the full adapter, 95% CI): "
            f"{'; '.join(parts)}; {found}.")


def selection_verdict(search: dict, on_test: dict) -> str:
    """verdict() for a chosen selection that is no prefix (per-module, greedy-drop)."""
    chosen = on_test["describe"]
    sentences = [describe_significance(test, chosen, other) for other, tests in on_test["against"].items()
                 for test in tests.values()]
    return (f"The search ({search['criterion']}) chose {chosen}, keeping {search.get('kept_fraction', 0.0):.0%} of "
            f"the LoRA parameters ({search['reason']}). On test: {' '.join(sentences)}")


def comparison_reason(row: dict) -> str:
    return str(row.get("origin") or "for comparison").removeprefix("for comparison: ")


def report_notes(curves: dict, export: dict | None) -> list[str]:
    meta = curves["meta"]
    notes = []
    if meta.get("n_truncated"):
        notes.append(f"{meta['n_truncated']} validation targets were cut to --max-length for the curves.")
    if meta.get("n_skipped"):
        notes.append(f"{meta['n_skipped']} validation examples were skipped: their prompt alone exceeds --max-length.")
    if export is not None:
        notes.append("; ".join(export["summary"]))
    return notes
