"""Paired comparisons of two systems on the same examples: an interval, a calibrated test, and power.

Everything here works on per-example sufficient statistics (:func:`lorabound.metrics.scores.segment_stats`), never on
text, so the decision rules can be checked on synthetic scores. A corpus score is recomputed from summed
statistics: BLEU with sacrebleu's own formula (vectorised here, checked against sacrebleu in the tests), ROUGE-L
as the mean of per-example F1; "bleu+rougeL" is the mean of the two.

Read top to bottom:

1. :class:`Paired` holds both systems' statistics, metric by metric;
2. :func:`bootstrap_differences` resamples examples (the same indices for both systems and every metric);
   :func:`interval` turns them into a 95% interval: the difference plus or minus t(n - 1) times the bootstrap's
   standard error, corrected by sqrt(n / (n - 1)). The plain percentile interval is too narrow on small samples
   (the normal quantile and the biased spread): it made "not significantly worse" and "non-inferior" easy to
   reach with few examples (at 4 examples even Hesterberg's expanded percentile interval accepted a loss at the
   margin 4.8% of the time instead of 2.5%); on per-example scores this interval is the paired t interval;
3. :func:`sign_flip_test` is the paired approximate-randomisation test (Noreen 1989; Riezler and Maxwell 2005):
   under "no difference" each example's two outputs are exchangeable, so swapping them at random gives the null
   distribution of the score difference. With n <= EXACT_MAX examples every one of the 2^n swaps is enumerated
   (an exact test); above, Monte Carlo with at least ``resamples_for(level)`` draws, so the smallest p it can
   report is far below the level a decision needs. Its false-positive rate is at most the level at any n
   (tests/test_stats.py checks 4, 8, 20 and 40 examples on synthetic and on real swapped-output nulls);
4. :func:`power` reads the minimal detectable difference at 80% power and the number of examples that would
   detect a given effect off the bootstrap's spread;
5. :func:`compare` puts the four together in one record.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats as scipy_stats

from ..results import Comparison

LEVEL = 0.05  # two-sided level of every test, and 1 - the coverage of every interval
POWER = 0.8
EXACT_MAX = 14  # enumerate all 2^n swaps up to this many examples (16,384 rows)
COMBINED = "bleu+rougeL"
PARTS = {"bleu": ("bleu",), "rougeL": ("rougeL",), COMBINED: ("bleu", "rougeL")}
# The paper's reported gains (arXiv 2503.23360): the default effect a comparison is sized against.
PAPER_EFFECT = {"bleu": 1.4, "rougeL": 0.9, COMBINED: (1.4 + 0.9) / 2}


@dataclass(frozen=True)
class Paired:
    """Per-example statistics of systems A and B on the same n examples: {metric: (a, b)}, each (n, k)."""
    stats: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def n(self) -> int:
        a, _ = next(iter(self.stats.values()))
        return len(a)

    def subset(self, rows) -> "Paired":
        return Paired({m: (a[rows], b[rows]) for m, (a, b) in self.stats.items()})

    def swapped(self, mask: np.ndarray) -> "Paired":
        """A and B exchanged on the examples where `mask` is true."""
        mask = np.asarray(mask, dtype=bool)[:, None]
        return Paired({m: (np.where(mask, b, a), np.where(mask, a, b)) for m, (a, b) in self.stats.items()})


# --------------------------------------------------------------------------------------------
# Corpus scores from summed statistics, many rows at once
# --------------------------------------------------------------------------------------------

def bleu_from_sums(summed: np.ndarray) -> np.ndarray:
    """sacrebleu's corpus BLEU (exp smoothing) for each row of summed statistics
    [sys_len, ref_len, correct 1..N, total 1..N]."""
    summed = np.atleast_2d(np.asarray(summed, dtype=np.float64))
    order = (summed.shape[1] - 2) // 2
    sys_len, ref_len = summed[:, 0], summed[:, 1]
    correct, total = summed[:, 2:2 + order], summed[:, 2 + order:]
    with np.errstate(divide="ignore", invalid="ignore"):
        brevity = np.where(sys_len < ref_len, np.where(sys_len > 0, np.exp(1 - ref_len / sys_len), 0.0), 1.0)
        zero = correct == 0
        halvings = np.cumsum(zero, axis=1)  # exp smoothing: the k-th order without a match gets 1 / 2^k
        precision = np.where(zero, 100.0 / (2.0 ** halvings * total), 100.0 * correct / total)
        value = brevity * np.exp(np.log(precision).mean(axis=1))
    defined = (total > 0).all(axis=1) & (correct > 0).any(axis=1)
    return np.where(defined, value, 0.0)


def corpus_scores(metric: str, summed: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """Corpus scores of one metric for rows of summed statistics over `n` examples each."""
    if metric == "bleu":
        return bleu_from_sums(summed)
    return np.atleast_2d(summed)[:, 0] / n


def _differences(paired: Paired, metric: str, weights_a: np.ndarray, weights_b: np.ndarray) -> np.ndarray:
    """score(A) - score(B) per row, where row r weights example i by weights_a[r, i] for A (weights_b for B)."""
    parts = PARTS[metric]
    out = np.zeros(len(weights_a))
    for part in parts:
        a, b = paired.stats[part]
        out += (corpus_scores(part, weights_a @ a, weights_a.sum(axis=1))
                - corpus_scores(part, weights_b @ b, weights_b.sum(axis=1))) / len(parts)
    return out


def scores(paired: Paired, metric: str) -> tuple[float, float]:
    """The two systems' corpus scores on all examples."""
    ones = np.ones((1, paired.n))
    a = sum(float(corpus_scores(p, ones @ paired.stats[p][0], paired.n)[0]) for p in PARTS[metric])
    b = sum(float(corpus_scores(p, ones @ paired.stats[p][1], paired.n)[0]) for p in PARTS[metric])
    return a / len(PARTS[metric]), b / len(PARTS[metric])


# --------------------------------------------------------------------------------------------
# The interval: t times the paired bootstrap's standard error
# --------------------------------------------------------------------------------------------

def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """counts[r, i] = how often resample r drew example i (numpy default_rng(seed), n draws with replacement)."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n), dtype=np.float64)
    np.add.at(counts, (np.arange(resamples)[:, None], indices), 1)
    return counts


def bootstrap_differences(paired: Paired, metric: str, resamples: int, seed: int) -> np.ndarray:
    counts = resample_counts(paired.n, resamples, seed)
    return _differences(paired, metric, counts, counts)


def t_quantile(n: int, level: float = LEVEL) -> float:
    """The two-sided t quantile with n - 1 degrees of freedom (at least 1)."""
    return float(scipy_stats.t.ppf(1 - level / 2, max(n - 1, 1)))


def standard_error(differences: np.ndarray, n: int) -> float:
    """The bootstrap's spread of the difference, unbiased for per-example means (x sqrt(n / (n - 1)))."""
    return float(differences.std()) * math.sqrt(n / (n - 1)) if n > 1 else math.inf


def interval(differences: np.ndarray, n: int, observed: float | None = None,
             level: float = LEVEL) -> tuple[float, float]:
    """The two-sided (1 - level) interval: observed +- t(n - 1) x standard error (observed: the bootstrap's
    mean when not given)."""
    centre = float(differences.mean()) if observed is None else observed
    se = standard_error(differences, n)
    if se == 0:
        return centre, centre
    if not math.isfinite(se):
        return -math.inf, math.inf
    half = t_quantile(n, level) * se
    return centre - half, centre + half


# --------------------------------------------------------------------------------------------
# The test: paired sign-flip permutation
# --------------------------------------------------------------------------------------------

MIN_SWAPS = 10_000  # Monte Carlo floor: p can reach 1e-4, a twentieth of 0.05 / 25 candidates


def resamples_for(level: float) -> int:
    """Monte Carlo draws that let a p-value reach a twentieth of `level` (1 / (R + 1) <= level / 20)."""
    return max(MIN_SWAPS, math.ceil(20 / level))


def smallest_p(n: int, resamples: int, level: float = LEVEL) -> float:
    """The smallest p-value the sign-flip test can give with n examples (exact: 2 / 2^n)."""
    if n <= EXACT_MAX:
        return min(1.0, 2.0 / 2 ** n)
    return 1.0 / (max(resamples, resamples_for(level)) + 1)


@lru_cache(maxsize=EXACT_MAX + 1)
def every_swap(n: int) -> np.ndarray:
    masks = np.array(list(itertools.product((0.0, 1.0), repeat=n)))
    masks.flags.writeable = False  # shared between calls
    return masks


def swap_masks(n: int, resamples: int, seed: int, level: float = LEVEL) -> tuple[np.ndarray, str]:
    """Rows of swap masks (1: exchange the example's outputs): every mask when n is small, else random draws."""
    if n <= EXACT_MAX:
        return every_swap(n), f"exact, all {2 ** n} swaps"
    draws = max(resamples, resamples_for(level))
    rng = np.random.default_rng(seed + 1)  # not the bootstrap's stream
    return rng.integers(0, 2, size=(draws, n)).astype(np.float64), f"Monte Carlo, {draws} random swaps"


def sign_flip_test(paired: Paired, metric: str, resamples: int, seed: int, level: float = LEVEL) -> tuple[float, str]:
    """Two-sided p-value of the paired sign-flip test, and how it was computed."""
    masks, how = swap_masks(paired.n, resamples, seed, level)
    keep = 1.0 - masks
    observed = _differences(paired, metric, np.ones((1, paired.n)), np.ones((1, paired.n)))[0]
    # A' takes B's output where swapped, B' takes A's.
    null = np.zeros(len(masks))
    for part in PARTS[metric]:
        a, b = paired.stats[part]
        null += (corpus_scores(part, keep @ a + masks @ b, paired.n)
                 - corpus_scores(part, masks @ a + keep @ b, paired.n)) / len(PARTS[metric])
    extreme = int((np.abs(null) >= abs(observed) - 1e-9).sum())
    if paired.n <= EXACT_MAX:
        return min(1.0, extreme / len(masks)), how
    return min(1.0, (extreme + 1) / (len(masks) + 1)), how


# --------------------------------------------------------------------------------------------
# Power
# --------------------------------------------------------------------------------------------

def power(spread: float, n: int, effect: float, level: float = LEVEL, target: float = POWER) -> dict:
    """From the standard error of the difference (`spread`, the bootstrap's SD) at n examples:

    - mdd: the smallest true difference a two-sided test at `level` detects with probability `target`;
    - n_for_effect: examples that would give that power for a difference of `effect` (the spread shrinks as
      1 / sqrt(n)); None when the outputs never differ (no spread to scale).
    """
    if spread <= 0:
        return {"mdd": 0.0, "se": 0.0, "effect": effect, "n_for_effect": None, "power": target}
    if n < 2:
        return {"mdd": math.inf, "se": math.inf, "effect": effect, "n_for_effect": None, "power": target}
    df = n - 1
    factor = scipy_stats.t.ppf(1 - level / 2, df) + scipy_stats.t.ppf(target, df)
    se = spread * math.sqrt(n / df)
    return {"mdd": float(factor * se), "se": float(se), "effect": effect,
            "n_for_effect": examples_needed(se, n, effect, level, target), "power": target}


def examples_needed(se: float, n: int, effect: float, level: float = LEVEL, target: float = POWER) -> int | None:
    """About how many examples give `target` power for a true difference of `effect` at two-sided `level`,
    from the standard error `se` seen at n examples (normal approximation; it shrinks as 1 / sqrt(n))."""
    if not se or effect <= 0 or not math.isfinite(se):
        return None
    factor = scipy_stats.norm.ppf(1 - level / 2) + scipy_stats.norm.ppf(target)
    return max(2, math.ceil(n * (factor * se / effect) ** 2))


# --------------------------------------------------------------------------------------------
# One comparison
# --------------------------------------------------------------------------------------------

UNITS_LIMIT = 100_000  # units_needed answers None beyond this many units


def units_needed(se: float, n: int, effect: float, level: float = LEVEL, target: float = POWER,
                 limit: int = UNITS_LIMIT) -> int | None:
    """The fewest independent units (test sets of a study) whose mean detects a true difference of `effect` with
    `target` power at two-sided `level`, from the standard error `se` of the mean over n units: the spread between
    units held fixed, t with (units - 1) degrees of freedom, so the cost of few units is counted (unlike
    examples_needed's normal approximation). None without a spread, or beyond `limit` units."""
    if not se or effect <= 0 or n < 2 or not math.isfinite(se):
        return None
    spread = se * math.sqrt(n)  # between units

    def detects(units: int) -> bool:
        factor = scipy_stats.t.ppf(1 - level / 2, units - 1) + scipy_stats.t.ppf(target, units - 1)
        return factor * spread / math.sqrt(units) <= effect

    if not detects(limit):
        return None
    low, high = 2, limit  # detects() only turns true as units grow: bisect for the first
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if detects(middle) else (middle + 1, high)
    return low


def differing(paired: Paired, metric: str) -> int:
    """How many examples' statistics differ between A and B (identical outputs have identical statistics)."""
    parts = [np.any(paired.stats[p][0] != paired.stats[p][1], axis=1) for p in PARTS[metric]]
    return int(np.any(parts, axis=0).sum())


def unseen_floor(n: int, k: int, spread2: float, level: float = LEVEL) -> float:
    """A floor for the standard error of a difference seen on only k of n differing examples.

    The share of examples whose outputs differ may be as high as its one-sided upper bound given k of n
    (Clopper-Pearson at level / 2); with `spread2` the variance of one differing example's contribution
    (pooled from comparisons that saw differences), the standard error is at least sqrt(share * spread2 / n).
    Without it, a candidate whose outputs happen to equal the reference on all of a few examples would look
    exactly as good, and fewer examples would then drop more."""
    share = float(scipy_stats.beta.ppf(1 - level / 2, k + 1, n - k)) if k < n else 1.0
    return math.sqrt(share * spread2 / n)


def compare(paired: Paired, metric: str, *, resamples: int = 1000, seed: int = 0, level: float = LEVEL,
            effect: float | None = None) -> Comparison:
    """A against B on `metric`: scores, difference, 95% interval, sign-flip p-value, and power.

    Keys: metric, a_score, b_score, diff, mean_diff (the bootstrap's mean), ci_low, ci_high, interval (how),
    p_value, test (how), smallest_p, mdd, se, effect, n_for_effect, n, differing (examples whose outputs
    differ), n_resamples, seed.
    """
    a, b = scores(paired, metric)
    differences = bootstrap_differences(paired, metric, resamples, seed)
    low, high = interval(differences, paired.n, a - b, level)
    p, how = sign_flip_test(paired, metric, resamples, seed, level)
    effect = PAPER_EFFECT.get(metric, 1.0) if effect is None else effect
    sized = power(float(differences.std()), paired.n, effect, level)
    return {
        "metric": metric, "a_score": a, "b_score": b, "diff": a - b, "mean_diff": float(differences.mean()),
        "ci_low": low, "ci_high": high,
        "interval": f"difference +- t(n-1) x paired-bootstrap standard error, {resamples} resamples, seed {seed}",
        "p_value": p, "test": f"paired sign-flip permutation ({how})", "smallest_p": smallest_p(paired.n, resamples, level),
        "mdd": sized["mdd"], "se": sized["se"], "effect": effect, "n_for_effect": sized["n_for_effect"],
        "n": paired.n, "differing": differing(paired, metric), "n_resamples": int(resamples), "seed": int(seed),
    }


def non_inferior(comparison: dict, margin: float) -> bool:
    """A is at most `margin` points worse than B: the interval's lower end lies above -margin."""
    return comparison["ci_low"] >= -margin


def conclusion(comparison: dict, level: float = LEVEL) -> str:
    """'better', 'worse', 'equivalent' (interval within +-effect) or 'inconclusive' (could not tell)."""
    if comparison["p_value"] < level and comparison["diff"] != 0:
        return "better" if comparison["diff"] > 0 else "worse"
    if -comparison["effect"] < comparison["ci_low"] and comparison["ci_high"] < comparison["effect"]:
        return "equivalent"
    return "inconclusive"
