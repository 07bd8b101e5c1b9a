"""Choosing the boundary b on the validation split.

Criteria:
- knee: the smallest b whose gain in mean ground-truth probability over the base reaches a fraction of
  the full adapter's gain (the flattening of the curve the paper reads by eye);
- max-likelihood: the b with the highest mean ground-truth probability;
- bleu / rougeL / chrf: generate on validation for candidate boundaries and take the best score, or the
  smallest b within --tolerance points of it (the paper's automatic search);
- auto (default): rougeL, generating only for candidates preselected from the cheap curve (knee points at
  several fractions, plus the full adapter). Likelihood alone cannot show whether dropping upper-layer LoRA
  helps generation, and generating for every b costs too much on a CPU, so the curve picks where to look
  and generation decides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import LoraboundError

CRITERIA = ("auto", "knee", "max-likelihood", "bleu", "rougeL", "chrf")
METRIC_CRITERIA = {"auto": "rougeL", "bleu": "bleu", "rougeL": "rougeL", "chrf": "chrf"}
KNEE_FRACTIONS = (0.5, 0.75, 0.9, 0.95)


@dataclass
class SearchSettings:
    criterion: str = field(default="auto", metadata={"help": "how to pick b: " + ", ".join(CRITERIA)})
    knee_fraction: float = field(default=0.9, metadata={"help": "share of the full adapter's probability gain "
                                                        "the knee must reach"})
    tolerance: float = field(default=0.0, metadata={"help": "take the smallest b within this many metric points "
                                                    "of the best candidate"})
    candidates: list[int] | None = field(default=None, metadata={"help": "boundaries to generate for "
                                                                 "(default: preselected from the curve)"})
    boundary: int | None = field(default=None, metadata={"help": "the user's own b: skips the search"})

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise LoraboundError(f"unknown criterion '{self.criterion}'; choose one of {', '.join(CRITERIA)}")
        if not 0.0 < self.knee_fraction <= 1.0:
            raise LoraboundError(f"--knee-fraction {self.knee_fraction} must be in (0, 1]; for example 0.9")
        if self.tolerance < 0:
            raise LoraboundError(f"--tolerance {self.tolerance} is negative; pass 0 or a positive number of points")


def check_boundary(boundary: int, num_layers: int) -> None:
    if not -1 <= boundary <= num_layers - 1:
        raise LoraboundError(
            f"boundary {boundary} is outside -1..{num_layers - 1} for this {num_layers}-layer model; "
            f"pass --boundary between -1 (base model) and {num_layers - 1} (full adapter)"
        )


def knee(truncation: dict, fraction: float = 0.9) -> int:
    """Smallest b whose probability gain over the base reaches `fraction` of the full adapter's gain.

    If the adapter does not raise the ground-truth probability at all, that is -1 (the base model).
    """
    boundaries, probs = truncation["boundary"], truncation["mean_prob"]
    base, full = probs[0], probs[-1]
    if full <= base:
        return boundaries[0]
    goal = base + fraction * (full - base)
    return next(b for b, p in zip(boundaries, probs) if p >= goal - 1e-12)


def max_likelihood(truncation: dict) -> int:
    """The b with the highest mean ground-truth probability (the smallest such b on ties)."""
    best = max(truncation["mean_prob"])
    return next(b for b, p in zip(truncation["boundary"], truncation["mean_prob"]) if p == best)


def preselect(truncation: dict, fractions=KNEE_FRACTIONS) -> list[int]:
    """Candidate boundaries worth generating for: knee points at several fractions, and the full adapter."""
    found = {knee(truncation, f) for f in fractions} | {truncation["boundary"][-1]}
    return sorted(found)


def pick_by_metric(scores: dict[int, float], tolerance: float = 0.0) -> int:
    """The smallest boundary whose score is within `tolerance` points of the best."""
    best = max(scores.values())
    return min(b for b, s in scores.items() if s >= best - tolerance)


@dataclass
class SearchResult:
    criterion: str
    boundary: int
    num_layers: int
    reason: str
    candidates: list[dict]
    lora_params_kept: int = 0
    lora_params_total: int = 0

    @property
    def kept_fraction(self) -> float:
        return self.lora_params_kept / self.lora_params_total if self.lora_params_total else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "kept_fraction": self.kept_fraction}


def search(truncation: dict, settings: SearchSettings, num_layers: int, params_per_layer: dict[int, int],
           score_boundary=None) -> SearchResult:
    """Pick b. `score_boundary(b) -> metrics dict` generates on validation; only metric criteria call it."""
    probs = dict(zip(truncation["boundary"], truncation["mean_prob"]))
    for b in [settings.boundary] if settings.boundary is not None else settings.candidates or []:
        check_boundary(b, num_layers)  # before any generation

    def row(b: int, metrics: dict | None = None) -> dict:
        # A b between two LoRA layers scores as the lower one (the curve lists LoRA layers only).
        below = [x for x in probs if x <= b]
        prob = probs[max(below)] if below else None
        return {"boundary": b, "mean_prob": prob, **{m: (metrics or {}).get(m) for m in ("bleu", "rougeL", "chrf")}}

    if settings.boundary is not None:
        b, candidates = settings.boundary, [row(settings.boundary)]
        reason = f"b = {b} was given with --boundary"
    elif settings.criterion == "knee":
        b = knee(truncation, settings.knee_fraction)
        candidates = [row(x) for x in truncation["boundary"]]
        reason = (f"smallest b whose ground-truth probability gain over the base reaches "
                  f"{settings.knee_fraction:.0%} of the full adapter's gain")
    elif settings.criterion == "max-likelihood":
        b = max_likelihood(truncation)
        candidates = [row(x) for x in truncation["boundary"]]
        reason = "b with the highest mean ground-truth probability on validation"
    else:
        if score_boundary is None:
            raise LoraboundError(f"criterion {settings.criterion} needs generation on validation data")
        metric = METRIC_CRITERIA[settings.criterion]
        chosen = settings.candidates or preselect(truncation)
        scored = {c: score_boundary(c) for c in chosen}
        b = pick_by_metric({c: m[metric] for c, m in scored.items()}, settings.tolerance)
        candidates = [row(c, scored[c]) for c in chosen]
        within = f" within {settings.tolerance:g} points of the best" if settings.tolerance else ""
        reason = (f"smallest b{within} by validation {metric} among candidates {chosen}"
                  + (" (preselected from the truncation curve)" if not settings.candidates else ""))

    return SearchResult(
        criterion="boundary" if settings.boundary is not None else settings.criterion, boundary=b,
        num_layers=num_layers, reason=reason, candidates=candidates,
        lora_params_kept=sum(n for layer, n in params_per_layer.items() if layer <= b),
        lora_params_total=sum(params_per_layer.values()),
    )
