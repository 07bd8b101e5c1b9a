"""Choosing the boundary b on the validation split.

Criteria:
- knee: the smallest b whose gain in mean ground-truth probability over the base reaches a fraction of
  the full adapter's gain (the flattening of the curve the paper reads by eye);
- max-likelihood: the b with the highest mean ground-truth probability;
- bleu / rougeL / chrf: generate on validation for candidate boundaries and take the one with the highest score
  (ties go to the smaller b), or with --tolerance T the smallest b within T points of the highest (the paper's
  plain search; it does not account for validation noise);
- auto (default): generate on validation for candidates read off the cheap truncation curve, and decide by the
  paper's two metrics with validation noise accounted for.

How `auto` decides:
- Candidates: the smallest b reaching 50, 75, 90 and 95% of the full adapter's probability gain, the
  max-likelihood b, every interior local maximum of the truncation curve (where an intermediate b beats its
  neighbours: the paper's case), and the full adapter. Likelihood alone cannot show whether dropping upper-layer
  LoRA helps generation, and generating for every b costs too much on a CPU, so the curve picks where to look
  and generation decides.
- Score: the mean of validation BLEU and ROUGE-L (both 0-100, equal weight: one number). Each candidate is
  compared with the full adapter on validation (:func:`lorabound.metrics.scores.paired_tests`): the difference, its
  95% interval (t times the paired bootstrap's standard error), a paired sign-flip permutation p-value (exact up to 14
  examples, calibrated at any size), and the minimal detectable difference at 80% power, for BLEU, ROUGE-L and
  their mean.
- Goal `quality` (the default): drop layers only where validation shows a gain beyond noise, that is the
  candidate with the largest gain in the mean whose p-value is below 0.05 divided by the number of smaller
  candidates tested (Bonferroni: with several candidates, one of them beats the full adapter by chance far more
  often than 5% of the time), and whose BLEU and ROUGE-L are neither significantly lower (p < 0.05);
  otherwise keep the full adapter. The reason says when the level is out of reach of so few examples, and how
  many validation examples would detect a gain of the paper's size. It is the default because the answer must
  not be worse than the adapter the user already has.
- Goal `size`: non-inferiority. A smaller candidate is acceptable only when the lower end of its 95% interval
  against the full adapter lies above -margin (--tolerance, default 1 point: below the paper's reported gains
  of 0.9 ROUGE-L and 1.4 BLEU, so an accepted loss is smaller than the effect the method is said to bring) on
  the mean of BLEU and ROUGE-L and on each of them (all three must hold: an intersection-union test needs no
  correction). Multiplicity over candidates: fixed-sequence testing, from the largest candidate to the
  smallest, each at the full level, stopping at the first that fails; the answer is the smallest candidate
  before that stop. Fixed-sequence testing keeps the chance of accepting any candidate that is truly worse
  than the margin at 2.5% without a Bonferroni split, and the fewer the examples, the wider the intervals,
  so the earlier it stops: less data never drops more.
- A degenerate score (every candidate equal, e.g. all 0 because the metric cannot read the script) is said in
  the reason, and b is then the full adapter: nothing is dropped on a score that cannot tell candidates apart.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from ..errors import LoraboundError
from ..lora.selection import check_boundary
from ..metrics.scores import COMBINED, METRIC_LABELS, MetricOptions, format_p, paired_tests, score
from ..metrics.stats import LEVEL, examples_needed, t_quantile, unseen_floor
from ..results import SearchDocument

CRITERIA = ("auto", "knee", "max-likelihood", "bleu", "rougeL", "chrf", "per-module", "greedy-drop")
GOAL_CRITERIA = ("auto", "per-module")  # those deciding by --goal (greedy-drop decides as --goal size)
SELECTION_CRITERIA = ("per-module", "greedy-drop")  # their result is a Selection (search/modules.py)
GOALS = ("quality", "size")
METRIC_CRITERIA = {"auto": COMBINED, "bleu": "bleu", "rougeL": "rougeL", "chrf": "chrf"}
KNEE_FRACTIONS = (0.5, 0.75, 0.9, 0.95)
OWN_SPREAD = 5  # differing examples from which a candidate's own spread is trusted (guarded_lower_ends)
DEFAULT_MARGIN = 1.0  # --goal size's non-inferiority margin, in points of the 0-100 scores (see the docstring)
COMPARED = ("bleu", "rougeL", COMBINED)  # each candidate against the full adapter


@dataclass
class SearchSettings:
    criterion: str = field(default="auto", metadata={"help": "how to pick b: " + ", ".join(CRITERIA)})
    goal: str | None = field(default=None, metadata={"help": "for --criterion auto or per-module: quality "
                                                     "(default: drop layers only for a validation gain beyond "
                                                     "noise) or size (the smallest b shown non-inferior: its 95% "
                                                     "interval against the full adapter above -tolerance)"})
    knee_fraction: float = field(default=0.9, metadata={"help": "share of the full adapter's probability gain "
                                                        "the knee must reach"})
    tolerance: float | None = field(default=None, metadata={"help": "points of score a smaller b may lose: the "
                                                            "non-inferiority margin of --goal size and greedy-drop "
                                                            f"(default {DEFAULT_MARGIN:g}), or for the bleu / "
                                                            "rougeL / chrf criteria the smallest b within this "
                                                            "many points of the best (default 0)"})
    candidates: list[int] | None = field(default=None, metadata={"help": "boundaries to generate for "
                                                                 "(default: preselected from the curve)"})
    boundary: int | None = field(default=None, metadata={"help": "the user's own b: skips the search"})
    bootstrap: int = field(default=1000, metadata={"help": "paired bootstrap resamples for the validation tests"})
    keep_fraction: float | None = field(default=None, metadata={"help": "for --criterion greedy-drop: share of the "
                                                                "LoRA parameters to keep, in (0, 1] (instead of "
                                                                "--tolerance)"})

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise LoraboundError(f"unknown criterion '{self.criterion}'; choose one of {', '.join(CRITERIA)}")
        if self.goal is not None and self.goal not in GOALS:
            raise LoraboundError(f"unknown goal '{self.goal}'; choose one of {', '.join(GOALS)}")
        if self.goal is not None and self.criterion not in GOAL_CRITERIA and self.boundary is None:
            raise LoraboundError(f"--goal applies to --criterion auto or per-module only, not {self.criterion}; "
                                 "drop --goal or use --criterion auto")
        self._check_selection_criteria()
        if not 0.0 < self.knee_fraction <= 1.0:
            raise LoraboundError(f"--knee-fraction {self.knee_fraction} must be in (0, 1]; for example 0.9")
        if self.tolerance is not None and self.tolerance < 0:
            raise LoraboundError(f"--tolerance {self.tolerance} is negative; pass 0 or a positive number of points")
        uses_tolerance = self.criterion in ("bleu", "rougeL", "chrf") or self.resolved_goal == "size"
        if self.tolerance and not uses_tolerance and self.boundary is None:
            raise LoraboundError(f"--tolerance is not used by --criterion {self.criterion}"
                                 + (" --goal quality" if self.criterion in GOAL_CRITERIA else "")
                                 + "; pass it with --goal size or a bleu / rougeL / chrf criterion")
        if self.bootstrap < 1:
            raise LoraboundError(f"--bootstrap {self.bootstrap} must be at least 1; 1000 is usual")

    def _check_selection_criteria(self) -> None:
        """--keep-fraction and --candidates against per-module / greedy-drop (rules.py checks the ranges)."""
        if self.keep_fraction is not None:
            if not 0.0 < self.keep_fraction <= 1.0:
                raise LoraboundError(f"--keep-fraction {self.keep_fraction} must be in (0, 1]; for example 0.5")
            if self.criterion != "greedy-drop" and self.boundary is None:
                raise LoraboundError(f"--keep-fraction applies to --criterion greedy-drop only, not {self.criterion}; "
                                     "drop --keep-fraction or use --criterion greedy-drop")
            if self.tolerance and self.boundary is None:
                raise LoraboundError("--keep-fraction and --tolerance are two ways to stop greedy-drop (a parameter "
                                     "budget, a validation loss); pass one of them")
        if self.candidates and self.criterion in SELECTION_CRITERIA and self.boundary is None:
            raise LoraboundError(f"--candidates lists boundaries, which --criterion {self.criterion} does not take (it "
                                 "preselects its own candidates); drop --candidates")

    @property
    def margin(self) -> float:
        """--tolerance as used: the non-inferiority margin for size-seeking rules, else the metric criteria's."""
        if self.tolerance is not None:
            return self.tolerance
        return DEFAULT_MARGIN if self.resolved_goal == "size" else 0.0

    @property
    def resolved_goal(self) -> str | None:
        if self.criterion == "greedy-drop":
            return None if self.keep_fraction is not None else "size"
        return (self.goal or "quality") if self.criterion in GOAL_CRITERIA else None


# --------------------------------------------------------------------------------------------
# Reading the truncation curve
# --------------------------------------------------------------------------------------------

NO_GAIN = "the base model: the adapter does not raise the ground-truth probability, so the curve has no knee"


def raises_probability(truncation: dict) -> bool:
    """Whether the full adapter's mean ground-truth probability is above the base model's (the curve has a knee)."""
    probs = truncation["mean_prob"]
    return probs[-1] > probs[0]


def knee(truncation: dict, fraction: float = 0.9) -> int:
    """Smallest b whose probability gain over the base reaches `fraction` of the full adapter's gain.

    If the adapter does not raise the ground-truth probability at all, that is -1 (the base model): no knee, and
    knee_label names it so.
    """
    boundaries, probs = truncation["boundary"], truncation["mean_prob"]
    if not raises_probability(truncation):
        return boundaries[0]
    base, full = probs[0], probs[-1]
    goal = base + fraction * (full - base)
    return next(b for b, p in zip(boundaries, probs) if p >= goal - 1e-12)


def knee_label(truncation: dict, fraction: float, name: str = "knee") -> str:
    """What the point knee() returns is: "knee 90%", or NO_GAIN when the adapter lowers (or keeps) the probability."""
    return f"{name} {fraction:.0%}" if raises_probability(truncation) else NO_GAIN


def max_likelihood(truncation: dict) -> int:
    """The b with the highest mean ground-truth probability (the smallest such b on ties)."""
    best = max(truncation["mean_prob"])
    return next(b for b, p in zip(truncation["boundary"], truncation["mean_prob"]) if p == best)


def local_maxima(truncation: dict) -> list[int]:
    """Interior points of the curve above the point before and above the next different point after.

    A flat top counts once, at its first b; the curve's two ends (base model, full adapter) are not interior.
    """
    boundaries, probs = truncation["boundary"], truncation["mean_prob"]
    found = []
    for i in range(1, len(probs) - 1):
        if probs[i] <= probs[i - 1]:
            continue
        j = i
        while j + 1 < len(probs) and probs[j + 1] == probs[i]:
            j += 1
        if j + 1 < len(probs) and probs[j + 1] < probs[i]:
            found.append(boundaries[i])
    return found


def preselect(truncation: dict, fractions=KNEE_FRACTIONS, full: int | None = None) -> dict[int, list[str]]:
    """Candidate boundaries worth generating for, each with why it is one, in order of b.

    `full` is the adapter's top LoRA layer (default: the curve's last point).
    """
    why: dict[int, list[str]] = {}
    for f in fractions:
        reasons = why.setdefault(knee(truncation, f), [])
        if knee_label(truncation, f) not in reasons:  # without a gain every fraction names the same base model
            reasons.append(knee_label(truncation, f))
    why.setdefault(max_likelihood(truncation), []).append("max-likelihood")
    for b in local_maxima(truncation):
        why.setdefault(b, []).append("local maximum")
    why.setdefault(truncation["boundary"][-1] if full is None else full, []).append("full adapter")
    return dict(sorted(why.items()))


def pick_by_metric(scores: dict[int, float], tolerance: float = 0.0) -> int:
    """The smallest boundary whose score is within `tolerance` points of the best."""
    best = max(scores.values())
    return min(b for b, s in scores.items() if s >= best - tolerance)


# --------------------------------------------------------------------------------------------
# Generating on validation
# --------------------------------------------------------------------------------------------

@dataclass
class Validation:
    """What the generating criteria need: hypotheses for a boundary, the references, how to score them."""
    generate: Callable[[int], list[str]]  # LoRA kept on layers 0..b, greedy outputs on the validation split
    references: list[list[str]]
    metrics: MetricOptions = field(default_factory=MetricOptions)
    seed: int = 0
    # Optional: hypotheses for several boundaries at once (one batched pass), {b: outputs}
    generate_many: Callable[[list[int]], dict[int, list[str]]] | None = None


def score_candidates(chosen: dict[int, list[str]], full: int, validation: Validation,
                      n_resamples: int) -> dict[int, dict]:
    """Per candidate: BLEU / ROUGE-L / chrF on validation, and its paired tests against the full adapter."""
    texts = (validation.generate_many(list(chosen)) if validation.generate_many is not None
             else {b: validation.generate(b) for b in chosen})
    refs, options = validation.references, validation.metrics
    rows = {}
    for b, why in chosen.items():
        metrics = score(texts[b], refs, options)
        row = {"why": why, **{m: metrics[m] for m in ("bleu", "rougeL", "chrf")},
               COMBINED: (metrics["bleu"] + metrics["rougeL"]) / 2, "vs_full": None,
               "signatures": {k: metrics[k] for k in ("bleu_signature", "rouge_signature")}}
        if b != full:
            tests = paired_tests(texts[b], texts[full], refs, metrics=COMPARED, n_resamples=n_resamples,
                                 seed=validation.seed, options=options)
            row["vs_full"] = {m: test_summary(t) for m, t in tests.items()}
        rows[b] = row
    return rows


def test_summary(test: dict) -> dict:
    """What search.json keeps of a paired test: the difference, interval, p-value and power."""
    return {"diff": test["diff"], "ci_low": test["ci_low"], "ci_high": test["ci_high"], "p_value": test["p_value"],
            "smallest_p": test["smallest_p"], "mdd": test["mdd"], "se": test["se"], "effect": test["effect"],
            "n_for_effect": test["n_for_effect"], "n": test["n"], "differing": test["differing"]}


def _degenerate(scored: dict[int, dict], metric: str) -> str | None:
    """A sentence when every candidate has the same score, which then cannot tell them apart."""
    values = {round(row[metric], 9) for row in scored.values()}
    if len(scored) < 2 or len(values) > 1:
        return None
    value = values.pop()
    zero = " (all zero: check --bleu-tokenize, and that outputs and references are in the same language)" \
        if value == 0 else ""
    return f"every candidate scored the same validation {METRIC_LABELS[metric]}, {value:.2f}{zero}"


def _fallback(tie: str, full: int) -> tuple[int, str]:
    return full, f"{tie}; a score that cannot tell candidates apart drops nothing, so b = {full} (the full adapter)"


def _pick_best(scored: dict[int, dict], metric: str, tolerance: float, full: int) -> tuple[int, str]:
    """bleu / rougeL / chrf criteria: the highest score (ties to the smaller b), or the smallest b within T."""
    label = METRIC_LABELS[metric]
    if (tie := _degenerate(scored, metric)) is not None:
        return _fallback(tie, full)
    scores = {b: row[metric] for b, row in scored.items()}
    best = max(scores.values())
    top = [b for b, s in scores.items() if s == best]
    if tolerance:
        b = pick_by_metric(scores, tolerance)
        return b, (f"the smallest b whose validation {label} ({scores[b]:.2f}) is within {tolerance:g} points of "
                   f"the highest ({best:.2f}, b = {min(top)}) among candidates {list(scored)}")
    if len(top) > 1:
        return min(top), (f"b = {', '.join(map(str, top))} tied for the highest validation {label} ({best:.2f}) "
                          f"among candidates {list(scored)}; the smallest of them was taken")
    return top[0], f"the highest validation {label} ({best:.2f}) among candidates {list(scored)}"


def test_methods(goal: str | None, margin: float) -> dict:
    """How the validation comparisons were made, for search.json."""
    return {"level": LEVEL, "test": "paired sign-flip permutation (exact up to 14 examples, else Monte Carlo)",
            "interval": "95%: the difference +- t(n-1) x the paired bootstrap's standard error",
            "power": "mdd: the smallest difference detected with 80% power at the level; n_for_effect: examples "
                     "that would detect `effect` (the paper's gain)",
            **({"margin": margin, "rule": "non-inferiority, fixed sequence from the largest candidate"}
               if goal == "size" else {})}


def _significantly_worse(vs_full: dict) -> bool:
    """Below the full adapter at p < LEVEL on BLEU, ROUGE-L or their mean (uncorrected: the cautious way here)."""
    return any(vs_full[m]["diff"] < 0 and vs_full[m]["p_value"] < LEVEL for m in COMPARED)


def pick_for_goal(scored: dict, goal: str, margin: float, full, size: Callable = lambda b: b,
                  name: Callable = lambda b: f"b = {b}", noun: str = "b") -> tuple:
    """auto: decide on the mean of BLEU and ROUGE-L against the full adapter, noise accounted for (see the
    module's docstring). Marks each smaller candidate's row with "non_inferior" under goal size.

    Candidates are boundaries by default; the per-module and greedy-drop searches pass other keys (selections)
    with their `size` (LoRA parameters kept), `name` and `noun`, and get the same rule."""
    if (tie := _degenerate(scored, COMBINED)) is not None:
        return _fallback(tie, full)
    notes = "".join(f" ({METRIC_LABELS[m]} was {scored[full][m]:.2f} for every candidate and did not separate them)"
                    for m in ("bleu", "rougeL") if _degenerate(scored, m))
    smaller = {b: row["vs_full"] for b, row in scored.items() if size(b) < size(full)}
    if not smaller:
        return full, f"goal {goal}: no candidate below the full adapter to compare{notes}"
    if goal == "quality":
        b, reason = _pick_quality(smaller, full, size, name)
    else:
        b, reason = _pick_non_inferior(scored, smaller, margin, full, size, name, noun)
    return b, reason + notes


def _said(test: dict, what: str) -> str:
    return (f"{what}: {test['diff']:+.2f} points of the {METRIC_LABELS[COMBINED]} against the full adapter on "
            f"validation (95% CI {test['ci_low']:+.2f} to {test['ci_high']:+.2f}, {format_p(test['p_value'])})")


def _pick_quality(smaller: dict, full, size: Callable, name: Callable) -> tuple:
    """The largest gain beyond noise (Bonferroni over the smaller candidates), else the full adapter."""
    level = LEVEL / len(smaller)
    combined = {b: tests[COMBINED] for b, tests in smaller.items()}
    gains = [b for b, t in combined.items()
             if t["diff"] > 0 and t["p_value"] < level and not _significantly_worse(smaller[b])]
    rule = (f"needs p < {level:.3g}: {LEVEL} / {len(smaller)} candidates, Bonferroni, and neither BLEU nor "
            f"ROUGE-L significantly lower")
    if gains:
        b = max(gains, key=lambda x: (combined[x]["diff"], -size(x)))
        return b, f"goal quality: the largest validation gain beyond noise, {_said(combined[b], name(b))}; {rule}"
    best = max(combined, key=lambda x: (combined[x]["diff"], -size(x)))
    test = combined[best]
    reach = ""
    if test["smallest_p"] >= level:
        reach = (f"; with these validation examples the smallest p-value the test can give is "
                 f"{test['smallest_p']:.3g}, so no gain could be shown at that level")
    needed = examples_needed(test["se"], test["n"], test["effect"], level)
    data = (f"; about {needed:,} validation examples would detect (80% power) a gain of {test['effect']:g} points "
            f"at that level" if needed else "")
    return full, (f"goal quality: no candidate beat the full adapter beyond noise ({rule}); the closest was "
                  f"{_said(test, name(best))}, so LoRA stays on every layer{reach}{data}")


def guarded_lower_ends(smaller: dict) -> dict:
    """Per candidate and metric, the lower end of the 95% interval used for non-inferiority: the plain one, or
    lower where the candidate's outputs differed from the full adapter's on too few examples to trust their
    spread (stats.unseen_floor; the spread of one differing example is the candidate's own when at least
    OWN_SPREAD examples differ, else the median over this search's candidates that differ anywhere). When no
    candidate differs on any example, nothing measures a possible loss: no lower end is trusted."""
    def spread(t: dict) -> float:
        return t["se"] ** 2 * t["n"] ** 2 / t["differing"]

    pooled = {}
    for m in COMPARED:
        seen = [spread(t[m]) for t in smaller.values()
                if t[m].get("differing", 0) >= 1 and math.isfinite(t[m]["se"])]
        pooled[m] = float(np.median(seen)) if seen else None
    lows = {}
    for b, tests in smaller.items():
        lows[b] = {}
        for m in COMPARED:
            t = tests[m]
            if "differing" not in t:  # a comparison made elsewhere, without the count: its own interval
                lows[b][m] = t["ci_low"]
                continue
            own = t["differing"] >= OWN_SPREAD and math.isfinite(t["se"])
            spread2 = spread(t) if own else pooled[m]
            if spread2 is None:
                lows[b][m] = -math.inf
                continue
            se = max(t["se"], unseen_floor(t["n"], t["differing"], spread2))
            lows[b][m] = min(t["ci_low"], t["diff"] - t_quantile(t["n"]) * se)
    return lows


def _pick_non_inferior(scored: dict, smaller: dict, margin: float, full, size: Callable, name: Callable,
                       noun: str) -> tuple:
    """Fixed-sequence non-inferiority: from the largest candidate down, stop at the first that fails."""
    lows = guarded_lower_ends(smaller)
    passed, failed = [], None
    for b in sorted(smaller, key=size, reverse=True):
        if failed is not None:
            scored[b]["non_inferior"] = None  # not tested: the sequence stopped above it
            continue
        ok = all(lows[b][m] >= -margin for m in COMPARED)
        scored[b]["non_inferior"] = ok
        scored[b]["ni_lower_end"] = lows[b]
        if ok:
            passed.append(b)
        else:
            failed = b
    rule = (f"non-inferiority with a margin of {margin:g} points: the lower end of the 95% interval against the "
            f"full adapter above -{margin:g} on BLEU, ROUGE-L and their mean, candidates tested from the largest "
            f"to the smallest and stopping at the first that fails (fixed sequence)")
    stop = ""
    if failed is not None:
        said_lows = ", ".join(f"{METRIC_LABELS[m]} {lows[failed][m]:+.2f}" for m in COMPARED)
        t = smaller[failed][COMBINED]
        se_used = (t["diff"] - lows[failed][COMBINED]) / t_quantile(t["n"])  # the guarded one
        needed = examples_needed(se_used, t["n"], margin) if math.isfinite(se_used) else None
        more = (f"; if it were truly as good as the full adapter, about {needed:,} validation examples would "
                f"show that (80% power)") if needed else ""
        stop = f"; the sequence stopped at {name(failed)} (interval lower ends {said_lows}){more}"
    if passed:
        b = passed[-1]
        return b, f"goal size: the smallest {noun} shown non-inferior, {_said(smaller[b][COMBINED], name(b))}; " \
                  f"{rule}{stop}"
    return full, f"goal size: no smaller candidate was shown non-inferior ({rule}){stop}, so LoRA stays on every layer"


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------

@dataclass
class SearchResult:
    criterion: str
    boundary: int | None  # None: the chosen selection is no prefix (see `selection`)
    num_layers: int
    reason: str
    candidates: list[dict]
    lora_params_kept: int = 0
    lora_params_total: int = 0
    goal: str | None = None
    validation_tests: dict | None = None  # how the candidates were compared with the full adapter
    # per-module / greedy-drop (search/modules.py): the chosen Selection (Selection.to_json), said for people,
    # its comparison on validation with the prefix of the same size, and the greedy removal path
    selection: dict | None = None
    selection_text: str | None = None
    compared_prefix: dict | None = None
    greedy_path: dict | None = None

    @property
    def kept_fraction(self) -> float:
        return self.lora_params_kept / self.lora_params_total if self.lora_params_total else 0.0

    def to_dict(self) -> SearchDocument:
        return {**asdict(self), "kept_fraction": self.kept_fraction}


def search(truncation: dict, settings: SearchSettings, num_layers: int, params_per_layer: dict[int, int],
           validation: Validation | None = None) -> SearchResult:
    """Pick b. Only the generating criteria (auto, bleu, rougeL, chrf) use `validation`."""
    probs = dict(zip(truncation["boundary"], truncation["mean_prob"]))
    for b in [settings.boundary] if settings.boundary is not None else settings.candidates or []:
        check_boundary(b, num_layers)  # before any generation
    full = max(params_per_layer) if params_per_layer else num_layers - 1  # the adapter's top LoRA layer

    def row(b: int, scores: dict | None = None) -> dict:
        # A b between two LoRA layers scores as the LoRA layer below it; below every LoRA layer, as the base (-1).
        below = [x for x in probs if x <= b]
        empty = {"why": [], "bleu": None, "rougeL": None, "chrf": None, COMBINED: None, "vs_full": None}
        return {"boundary": b, "mean_prob": probs[max(below)] if below else None, **empty, **(scores or {})}

    goal, tests = settings.resolved_goal if settings.boundary is None else None, None
    if settings.boundary is not None:
        b, candidates = settings.boundary, [row(settings.boundary)]
        reason = f"b = {b} was given with --boundary"
    elif settings.criterion == "knee":
        b = knee(truncation, settings.knee_fraction)
        candidates = [row(x) for x in truncation["boundary"]]
        reason = (f"smallest b whose ground-truth probability gain over the base reaches "
                  f"{settings.knee_fraction:.0%} of the full adapter's gain" if raises_probability(truncation) else
                  f"{NO_GAIN} (mean ground-truth probability {probs[b]:.4f} without LoRA, "
                  f"{truncation['mean_prob'][-1]:.4f} with all of it)")
    elif settings.criterion == "max-likelihood":
        b = max_likelihood(truncation)
        candidates = [row(x) for x in truncation["boundary"]]
        reason = "b with the highest mean ground-truth probability on validation"
    else:
        if validation is None:
            raise LoraboundError(f"criterion {settings.criterion} needs generation on validation data")
        if settings.candidates:
            chosen = {c: ["given"] for c in sorted(set(settings.candidates))}
            chosen.setdefault(full, []).append("full adapter")
        else:
            chosen = preselect(truncation, full=full)
        scored = score_candidates(chosen, full, validation, settings.bootstrap)
        if settings.criterion == "auto":
            b, reason = pick_for_goal(scored, goal, settings.margin, full)
        else:
            b, reason = _pick_best(scored, METRIC_CRITERIA[settings.criterion], settings.margin, full)
        where = "given with --candidates, plus the full adapter" if settings.candidates else \
            "preselected from the truncation curve"
        reason += f" (candidates {where})"
        signatures = scored[full].pop("signatures")
        for other in scored.values():
            other.pop("signatures", None)
        candidates = [row(c, scored[c]) for c in chosen]
        tests = {"against": f"full adapter (b = {full})", "metrics": list(COMPARED), "n": len(validation.references),
                 "resamples": settings.bootstrap, "seed": validation.seed, **test_methods(goal, settings.margin),
                 **signatures}

    return SearchResult(
        criterion="boundary" if settings.boundary is not None else settings.criterion, boundary=b,
        num_layers=num_layers, reason=reason, candidates=candidates,
        lora_params_kept=sum(n for layer, n in params_per_layer.items() if layer <= b),
        lora_params_total=sum(params_per_layer.values()), goal=goal, validation_tests=tests,
    )
