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
- Score: the mean of validation BLEU and ROUGE-L (both 0-100, equal weight: one number, so one test per
  candidate). Each candidate is compared with the full adapter by a paired bootstrap on validation
  (:func:`lorabound.evaluate.paired_bootstrap`, the same resamples for both metrics): the difference, its 95%
  interval and a p-value, for BLEU, ROUGE-L and their mean.
- Goal `quality` (the default): drop layers only where validation shows a gain beyond noise, that is the
  candidate with the largest gain in the mean whose p-value is below 0.05 divided by the number of smaller
  candidates tested (Bonferroni: with several candidates, one of them beats the full adapter by chance far more
  often than 5% of the time), and whose BLEU and ROUGE-L are neither significantly lower (p < 0.05);
  otherwise keep the full adapter. It is the default because the answer must not be
  worse than the adapter the user already has: with the usual few dozen validation examples, a 1-point edge is
  noise more often than not.
- Goal `size`: the smallest b not significantly below the full adapter on BLEU, ROUGE-L or their mean (p >= 0.05
  or no drop; uncorrected, the stricter way for this goal) whose mean is at most --tolerance points below it. With few validation
  examples "not significantly worse" is weak evidence: set --tolerance to the loss you accept.
- A degenerate score (every candidate equal, e.g. all 0 because the metric cannot read the script) is said in
  the reason, and b is then the full adapter: nothing is dropped on a score that cannot tell candidates apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from .errors import LoraboundError
from .evaluate import COMBINED, METRIC_LABELS, MetricOptions, format_p, paired_bootstrap, score

CRITERIA = ("auto", "knee", "max-likelihood", "bleu", "rougeL", "chrf", "per-module", "greedy-drop")
GOAL_CRITERIA = ("auto", "per-module")  # those deciding by --goal (greedy-drop decides as --goal size)
SELECTION_CRITERIA = ("per-module", "greedy-drop")  # their result is a Selection (selection_search.py)
GOALS = ("quality", "size")
METRIC_CRITERIA = {"auto": COMBINED, "bleu": "bleu", "rougeL": "rougeL", "chrf": "chrf"}
KNEE_FRACTIONS = (0.5, 0.75, 0.9, 0.95)
LEVEL = 0.05  # significance level of the validation tests
COMPARED = ("bleu", "rougeL", COMBINED)  # each candidate against the full adapter


@dataclass
class SearchSettings:
    criterion: str = field(default="auto", metadata={"help": "how to pick b: " + ", ".join(CRITERIA)})
    goal: str | None = field(default=None, metadata={"help": "for --criterion auto or per-module: quality "
                                                     "(default: drop layers only for a validation gain beyond "
                                                     "noise) or size (the "
                                                     "smallest b not significantly worse, within --tolerance)"})
    knee_fraction: float = field(default=0.9, metadata={"help": "share of the full adapter's probability gain "
                                                        "the knee must reach"})
    tolerance: float = field(default=0.0, metadata={"help": "points of score a smaller b may lose: for --goal size, "
                                                    "and for the bleu / rougeL / chrf criteria (smallest b within "
                                                    "this many points of the best)"})
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
        if self.tolerance < 0:
            raise LoraboundError(f"--tolerance {self.tolerance} is negative; pass 0 or a positive number of points")
        uses_tolerance = self.criterion in ("bleu", "rougeL", "chrf") or self.resolved_goal == "size"
        if self.tolerance and not uses_tolerance and self.boundary is None:
            raise LoraboundError(f"--tolerance is not used by --criterion {self.criterion}"
                                 + (" --goal quality" if self.criterion in GOAL_CRITERIA else "")
                                 + "; pass it with --goal size or a bleu / rougeL / chrf criterion")
        if self.bootstrap < 1:
            raise LoraboundError(f"--bootstrap {self.bootstrap} must be at least 1; 1000 is usual")

    def _check_selection_criteria(self) -> None:
        """--keep-fraction and --candidates against per-module / greedy-drop (validation.py checks the ranges)."""
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
    def resolved_goal(self) -> str | None:
        if self.criterion == "greedy-drop":
            return None if self.keep_fraction is not None else "size"
        return (self.goal or "quality") if self.criterion in GOAL_CRITERIA else None


def check_boundary(boundary: int, num_layers: int) -> None:
    if not -1 <= boundary <= num_layers - 1:
        raise LoraboundError(
            f"boundary {boundary} is outside -1..{num_layers - 1} for this {num_layers}-layer model; "
            f"pass --boundary between -1 (base model) and {num_layers - 1} (full adapter)"
        )


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


def _score_candidates(chosen: dict[int, list[str]], full: int, validation: Validation,
                      n_resamples: int) -> dict[int, dict]:
    """Per candidate: BLEU / ROUGE-L / chrF on validation, and its paired bootstrap against the full adapter."""
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
            row["vs_full"] = {}
            for m in COMPARED:
                test = paired_bootstrap(texts[b], texts[full], refs, metric=m, n_resamples=n_resamples,
                                        seed=validation.seed, options=options)
                row["vs_full"][m] = {"diff": test["a_score"] - test["b_score"], "ci_low": test["ci_low"],
                                     "ci_high": test["ci_high"], "p_value": test["p_value"]}
        rows[b] = row
    return rows


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


def _significantly_worse(vs_full: dict) -> bool:
    """Below the full adapter at p < LEVEL on BLEU, ROUGE-L or their mean (uncorrected: the cautious way here)."""
    return any(vs_full[m]["diff"] < 0 and vs_full[m]["p_value"] < LEVEL for m in COMPARED)


def _pick_for_goal(scored: dict, goal: str, tolerance: float, full, size: Callable = lambda b: b,
                   name: Callable = lambda b: f"b = {b}", noun: str = "b") -> tuple:
    """auto: decide on the mean of BLEU and ROUGE-L against the full adapter, noise accounted for.

    Candidates are boundaries by default; the per-module and greedy-drop searches pass other keys (selections)
    with their `size` (LoRA parameters kept), `name` and `noun`, and get the same rule."""
    label = METRIC_LABELS[COMBINED]
    if (tie := _degenerate(scored, COMBINED)) is not None:
        return _fallback(tie, full)
    notes = "".join(f" ({METRIC_LABELS[m]} was {scored[full][m]:.2f} for every candidate and did not separate them)"
                    for m in ("bleu", "rougeL") if _degenerate(scored, m))
    smaller = {b: row["vs_full"][COMBINED] for b, row in scored.items() if size(b) < size(full)}
    worse = {b for b in smaller if _significantly_worse(scored[b]["vs_full"])}
    if not smaller:
        return full, f"goal {goal}: no candidate below the full adapter to compare{notes}"

    def said(b: int) -> str:
        t = smaller[b]
        return (f"{name(b)}: {t['diff']:+.2f} points of the {label} against the full adapter on validation "
                f"(95% CI {t['ci_low']:+.2f} to {t['ci_high']:+.2f}, {format_p(t['p_value'])})")

    if goal == "quality":
        level = LEVEL / len(smaller)
        gains = [b for b, t in smaller.items() if t["diff"] > 0 and t["p_value"] < level and b not in worse]
        rule = (f"needs p < {level:.3g}: {LEVEL} / {len(smaller)} candidates, Bonferroni, and neither BLEU nor "
                f"ROUGE-L significantly lower")
        if gains:
            b = max(gains, key=lambda x: (smaller[x]["diff"], -size(x)))
            return b, f"goal quality: the largest validation gain beyond noise, {said(b)}; {rule}{notes}"
        best = max(smaller, key=lambda x: (smaller[x]["diff"], -size(x)))
        return full, (f"goal quality: no candidate beat the full adapter beyond noise ({rule}); the closest was "
                      f"{said(best)}, so LoRA stays on every layer{notes}")
    fits = [b for b, t in smaller.items() if t["diff"] >= -tolerance and b not in worse]
    rule = (f"not significantly worse on BLEU, ROUGE-L or their mean (p >= {LEVEL} or no drop) and at most "
            f"{tolerance:g} points below it")
    if fits:
        b = min(fits, key=size)
        return b, f"goal size: the smallest {noun} {rule}, {said(b)}{notes}"
    return full, f"goal size: no smaller candidate was {rule}, so LoRA stays on every layer{notes}"


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
    # per-module / greedy-drop (selection_search.py): the chosen Selection (Selection.to_json), said for people,
    # its comparison on validation with the prefix of the same size, and the greedy removal path
    selection: dict | None = None
    selection_text: str | None = None
    compared_prefix: dict | None = None
    greedy_path: dict | None = None

    @property
    def kept_fraction(self) -> float:
        return self.lora_params_kept / self.lora_params_total if self.lora_params_total else 0.0

    def to_dict(self) -> dict:
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
        scored = _score_candidates(chosen, full, validation, settings.bootstrap)
        if settings.criterion == "auto":
            b, reason = _pick_for_goal(scored, goal, settings.tolerance, full)
        else:
            b, reason = _pick_best(scored, METRIC_CRITERIA[settings.criterion], settings.tolerance, full)
        where = "given with --candidates, plus the full adapter" if settings.candidates else \
            "preselected from the truncation curve"
        reason += f" (candidates {where})"
        signatures = scored[full].pop("signatures")
        for other in scored.values():
            other.pop("signatures", None)
        candidates = [row(c, scored[c]) for c in chosen]
        tests = {"against": f"full adapter (b = {full})", "metrics": list(COMPARED), "n": len(validation.references),
                 "resamples": settings.bootstrap, "seed": validation.seed, "level": LEVEL, **signatures}

    return SearchResult(
        criterion="boundary" if settings.boundary is not None else settings.criterion, boundary=b,
        num_layers=num_layers, reason=reason, candidates=candidates,
        lora_params_kept=sum(n for layer, n in params_per_layer.items() if layer <= b),
        lora_params_total=sum(params_per_layer.values()), goal=goal, validation_tests=tests,
    )
