"""Searches whose answer is a Selection rather than one boundary: per-module pairs and greedy-drop layer sets.

- per-module: reads the joint curve (analysis/curves.py: the mean ground-truth probability for every pair (Ba, Bm) of
  attention / MLP boundaries), preselects a few pairs, generates on validation only for those, and decides with
  the `auto` rule and paired tests against the full adapter (boundary.pick_for_goal, --goal quality or
  size), so its answer is comparable with the one-boundary search. Preselected: for each share of the full
  adapter's probability gain (50, 75, 90, 95%) the pair keeping the fewest LoRA parameters that reaches it; the
  max-likelihood pair; the knee along each axis with the other group kept everywhere; the diagonal knee (the
  one-boundary answer of `knee`, LoRA on 0..b for both groups); the full adapter.
- greedy-drop: reads the greedy removal path (analysis/greedy.py). With --keep-fraction F it takes the first set on the
  path keeping at most F of the LoRA parameters. Otherwise it preselects sets along the path as `auto` does along
  the truncation curve (the fewest layers reaching each share of the gain, the max-likelihood set, local
  maxima, the full adapter) and takes the smallest shown non-inferior to the full adapter within --tolerance
  points (the rule of --goal size: search/boundary.py).

Both then compare the answer on validation with the prefix of the same size: the largest b whose LoRA on layers
0..b keeps no more parameters than the answer (the same number when every layer holds as many). That
comparison is optimistic, and labelled so: the validation data that chose the selection also judges it (a
selection picked for its validation score beats a fixed prefix there more often than chance). `run` repeats it
on the test split, which did not take part in the choice.
"""

from __future__ import annotations

from typing import Callable

from ..analysis.curves import joint_selection
from ..lora.selection import Selection
from ..lora.masking import lora_modules
from ..metrics.scores import paired_tests
from .boundary import (COMPARED, KNEE_FRACTIONS, NO_GAIN, SearchResult, SearchSettings, Validation, knee, knee_label,
                       pick_for_goal, preselect, raises_probability, score_candidates, test_methods)

Pairs = dict[tuple[int, str], int]  # LoRA parameters per (layer, module group)


def pair_params(model) -> Pairs:
    counts: Pairs = {}
    for m in lora_modules(model):
        counts[(m.layer, m.group)] = counts.get((m.layer, m.group), 0) + m.num_params()
    return counts


def kept_params(selection: Selection, params: Pairs) -> int:
    return sum(n for (layer, group), n in params.items() if selection.keeps(layer, group))


def canonical(selection: Selection, params: Pairs) -> Selection:
    """The selection stated on the adapter's own modules, so that equal selections are equal keys."""
    return selection.restricted_to(params)


# --------------------------------------------------------------------------------------------
# per-module
# --------------------------------------------------------------------------------------------

def preselect_pairs(joint: dict, params: Pairs, num_layers: int, knee_fraction: float = 0.9,
                    fractions=KNEE_FRACTIONS) -> dict[tuple[int, int], list[str]]:
    """Pairs (Ba, Bm) worth generating for, each with why, in order of kept LoRA parameters."""
    bounds, probs, top = joint["attention_boundary"], joint["mean_prob"], num_layers - 1
    cells = {(ba, bm): probs[i][j] for i, ba in enumerate(bounds) for j, bm in enumerate(bounds)}
    size = {pair: kept_params(joint_selection(*pair, top), params) for pair in cells}
    base, full = cells[(bounds[0], bounds[0])], cells[(bounds[-1], bounds[-1])]
    why: dict[tuple[int, int], list[str]] = {}
    for f in fractions:
        reach = [pair for pair, p in cells.items() if p >= base + f * (full - base) - 1e-12]
        cheapest = min(reach, key=lambda pair: (size[pair], -cells[pair]))
        reason = f"fewest parameters reaching {f:.0%} of the gain" if full > base else NO_GAIN
        if reason not in why.get(cheapest, []):  # without a gain every fraction names the same cheapest pair
            why.setdefault(cheapest, []).append(reason)
    best = max(cells.values())
    why.setdefault(min((pair for pair, p in cells.items() if p == best), key=size.get), []).append("max-likelihood")
    last = len(bounds) - 1
    attention_axis = {"boundary": bounds, "mean_prob": [probs[i][last] for i in range(len(bounds))]}
    mlp_axis = {"boundary": bounds, "mean_prob": probs[last]}
    diagonal = {"boundary": bounds, "mean_prob": [probs[i][i] for i in range(len(bounds))]}
    for axis, group, other, pair in ((attention_axis, "attention", "MLP", lambda b: (b, bounds[-1])),
                                     (mlp_axis, "MLP", "attention", lambda b: (bounds[-1], b))):
        # Without a gain along the axis its "knee" is that group's LoRA off everywhere: named so.
        named = (f"{group} knee {knee_fraction:.0%}" if raises_probability(axis)
                 else f"no {group} LoRA: it does not raise the ground-truth probability")
        why.setdefault(pair(knee(axis, knee_fraction)), []).append(f"{named} ({other} LoRA on every layer)")
    b = knee(diagonal, knee_fraction)
    why.setdefault((b, b), []).append(f"one boundary for both: {knee_label(diagonal, knee_fraction)}"
                                      + (" of the diagonal" if raises_probability(diagonal) else ""))
    why.setdefault((bounds[-1], bounds[-1]), []).append("full adapter")
    return dict(sorted(why.items(), key=lambda item: (size[item[0]], item[0])))


def search_per_module(joint: dict, settings: SearchSettings, num_layers: int, params: Pairs,
                      validation: Validation) -> SearchResult:
    top = num_layers - 1
    chosen_pairs = preselect_pairs(joint, params, num_layers, settings.knee_fraction)
    selection_of = {pair: canonical(joint_selection(*pair, top), params) for pair in chosen_pairs}
    bounds = joint["attention_boundary"]
    probs = {(ba, bm): joint["mean_prob"][i][j] for i, ba in enumerate(bounds) for j, bm in enumerate(bounds)}

    def row(pair: tuple[int, int]) -> dict:
        return {"attention_boundary": pair[0], "mlp_boundary": pair[1], "mean_prob": probs[pair]}

    return _decide({selection_of[p]: (chosen_pairs[p], row(p)) for p in chosen_pairs}, settings,
                   settings.resolved_goal, params, num_layers, validation, "per-module",
                   "preselected from the joint curve, plus the full adapter")


# --------------------------------------------------------------------------------------------
# greedy-drop
# --------------------------------------------------------------------------------------------

def preselect_path(path: dict, fractions=KNEE_FRACTIONS) -> dict[int, list[str]]:
    """Steps of the greedy path (by the number of layers kept) worth generating for, as `auto` reads a curve."""
    steps = sorted(path["steps"], key=lambda s: len(s["kept"]))
    curve = {"boundary": [len(s["kept"]) for s in steps], "mean_prob": [s["mean_prob"] for s in steps]}
    return {k: [w.replace("knee", "gain") for w in why] for k, why in preselect(curve, fractions).items()}


def search_greedy(path: dict, settings: SearchSettings, num_layers: int, params: Pairs,
                  validation: Validation) -> SearchResult:
    by_size = {len(s["kept"]): s for s in path["steps"]}
    if settings.keep_fraction is not None:
        chosen = {len(path["steps"][0]["kept"]): ["full adapter"]}
        chosen.setdefault(len(path["steps"][-1]["kept"]), []).append(
            f"first set on the path keeping at most {settings.keep_fraction:g} of the LoRA parameters")
    else:
        chosen = preselect_path(path)

    def row(step: dict) -> dict:
        return {"kept_layers": step["kept"], "mean_prob": step["mean_prob"]}

    candidates = {canonical(Selection.layers(by_size[k]["kept"]), params): (why, row(by_size[k]))
                  for k, why in chosen.items() if k in by_size}
    if settings.keep_fraction is None:
        result = _decide(candidates, settings, "size", params, num_layers, validation, "greedy-drop",
                         "preselected along the greedy path, plus the full adapter")
    else:
        last = canonical(Selection.layers(path["steps"][-1]["kept"]), params)
        why = (f"{last.describe()}: the first set on the greedy path keeping at most {settings.keep_fraction:g} of "
               f"the LoRA parameters ({kept_params(last, params):,} of {sum(params.values()):,})")
        result = _decide(candidates, settings, None, params, num_layers, validation, "greedy-drop",
                         "the budget's set and the full adapter", fixed=(last, why))
    result.greedy_path = path
    return result


# --------------------------------------------------------------------------------------------
# Shared: generate, decide, compare with the prefix of the same size
# --------------------------------------------------------------------------------------------

def _decide(candidates: dict[Selection, tuple[list[str], dict]], settings: SearchSettings, goal: str | None,
            params: Pairs, num_layers: int, validation: Validation, criterion: str, where: str,
            fixed: tuple[Selection, str] | None = None) -> SearchResult:
    """Score the candidates (the full adapter among them) on validation against the full adapter, and pick one
    by `goal`, or take `fixed` (a selection and why)."""
    full = Selection.full()

    def size(selection: Selection) -> int:
        return kept_params(selection, params)

    memo = _Memo(validation)
    scored = score_candidates({s: why for s, (why, _) in candidates.items()}, full, memo.validation(),
                               settings.bootstrap)
    if fixed is not None:
        chosen, reason = fixed
    else:
        chosen, reason = pick_for_goal(scored, goal, settings.margin, full, size=size,
                                        name=lambda s: s.describe(), noun="selection")
    reason += f" (candidates {where})"
    signatures = scored[full].pop("signatures")
    for other in scored.values():
        other.pop("signatures", None)
    rows = [{"selection": s.to_json(), "describe": s.describe(), "lora_params_kept": size(s), **extra,
             **scored[s]} for s, (_, extra) in candidates.items()]
    tests = {"against": "full adapter", "metrics": list(COMPARED), "n": len(validation.references),
             "resamples": settings.bootstrap, "seed": validation.seed, **test_methods(goal, settings.margin),
             **signatures}
    return SearchResult(criterion=criterion, boundary=_as_boundary(chosen, params), num_layers=num_layers,
                        reason=reason, candidates=rows, lora_params_kept=size(chosen), lora_params_total=size(full),
                        goal=goal, validation_tests=tests, selection=chosen.to_json(), selection_text=chosen.describe(),
                        compared_prefix=compare_with_prefix(chosen, params, memo, settings.bootstrap))


def _as_boundary(selection: Selection, params: Pairs) -> int | None:
    """b when the selection is LoRA on 0..b of every group (or the full adapter), else None."""
    if selection.is_full:
        return max(layer for layer, _ in params)
    return selection.prefix_boundary()


def same_size_prefix(selection: Selection, params: Pairs) -> int:
    """The largest b whose prefix keeps no more LoRA parameters than `selection` (-1: none fits)."""
    budget = kept_params(selection, params)
    layers = sorted({layer for layer, _ in params})
    fitting = [b for b in layers if kept_params(Selection.prefix(b), params) <= budget]
    return max(fitting, default=-1)


def compare_with_prefix(chosen: Selection, params: Pairs, memo: "_Memo", n_resamples: int) -> dict:
    """The chosen selection against the prefix of the same size on validation (paired tests, A = chosen).

    Optimistic: the validation data chose the selection, so it is not evidence; `run` repeats it on test."""
    b = same_size_prefix(chosen, params)
    prefix = canonical(Selection.prefix(b), params)
    row = {"boundary": b, "selection": prefix.to_json(), "describe": prefix.describe(),
           "lora_params_kept": kept_params(prefix, params), "tests": None,
           "how": "the largest b whose LoRA on layers 0..b keeps no more parameters than the chosen selection",
           "optimistic": "measured on the validation data that chose the selection: not evidence of a difference; "
                         "the test split's comparison (lorabound run) is"}
    if prefix == chosen:
        row["tests"] = "the chosen selection is this prefix"
        return row
    texts = memo.generate([chosen, prefix])
    refs, options, seed = memo.inner.references, memo.inner.metrics, memo.inner.seed
    tests = paired_tests(texts[chosen], texts[prefix], refs, metrics=COMPARED, n_resamples=n_resamples, seed=seed,
                         options=options)
    row["tests"] = {m: {"chosen": t["a_score"], "prefix": t["b_score"], "diff": t["diff"], "ci_low": t["ci_low"],
                        "ci_high": t["ci_high"], "p_value": t["p_value"], "mdd": t["mdd"]} for m, t in tests.items()}
    return row


class _Memo:
    """Validation outputs per selection, generated once in this search (the pipeline also caches them on disk)."""

    def __init__(self, validation: Validation):
        self.inner = validation
        self.texts: dict[Selection, list[str]] = {}

    def generate(self, selections: list[Selection]) -> dict[Selection, list[str]]:
        missing = [s for s in selections if s not in self.texts]
        if missing:
            many: Callable = self.inner.generate_many or (lambda keys: {k: self.inner.generate(k) for k in keys})
            self.texts.update(many(missing))
        return {s: self.texts[s] for s in selections}

    def validation(self) -> Validation:
        return Validation(lambda s: self.generate([s])[s], self.inner.references, self.inner.metrics,
                          self.inner.seed, self.generate)
