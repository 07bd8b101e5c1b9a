"""Metrics and significance: BLEU / chrF / ROUGE and a paired bootstrap test.

Read top to bottom:

1. :func:`score` computes corpus BLEU and chrF (sacrebleu) and ROUGE-1/2/L (rouge-score) against every
   reference of each example;
2. :func:`paired_bootstrap` tests whether two systems differ, resampling examples; corpus BLEU and chrF are
   recomputed from per-sentence sufficient statistics, so 1,000 resamples take a fraction of a second;
3. :func:`describe_significance` says the result in one plain sentence.

Generation lives in :mod:`lorabound.generation`. All metric values are on a 0-100 scale.
"""

from __future__ import annotations

import numpy as np

from .errors import LoraboundError

METRICS = ("bleu", "chrf", "rougeL")
METRIC_LABELS = {"bleu": "BLEU", "chrf": "chrF", "rougeL": "ROUGE-L", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2"}


# --------------------------------------------------------------------------------------------
# 1. Metrics
# --------------------------------------------------------------------------------------------

def _check_pairs(hypotheses, references) -> tuple[list[str], list[list[str]]]:
    hypotheses, references = list(hypotheses), [list(refs) for refs in references]
    if len(hypotheses) != len(references):
        raise LoraboundError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists; "
                             "pass one reference list per hypothesis")
    if not hypotheses:
        raise LoraboundError("no examples to score; pass at least one hypothesis with its references")
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        if not isinstance(hyp, str):
            raise LoraboundError(f"hypothesis {i} is {type(hyp).__name__}, not text; pass strings")
        if not refs:
            raise LoraboundError(f"example {i} has no references; give every example at least one reference")
        if not all(isinstance(r, str) for r in refs):
            raise LoraboundError(f"example {i} has a reference that is not text; pass lists of strings")
    return hypotheses, references


def reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: stream k holds every example's k-th reference, None where an example has fewer.

    sacrebleu drops None entries per example, so a missing reference is not scored as an empty one
    (an empty string would be, and would change BLEU's closest reference length).
    """
    depth = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(depth)]


def _sacrebleu_metric(metric: str):
    from sacrebleu.metrics import BLEU, CHRF

    if metric == "bleu":
        return BLEU()
    if metric == "chrf":
        return CHRF()
    raise LoraboundError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")


def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def _rouge_per_example(hypotheses: list[str], references: list[list[str]], scorer=None) -> dict[str, np.ndarray]:
    """Per example, the best F1 over its references (x100), for rouge1, rouge2 and rougeL."""
    scorer = scorer or _rouge_scorer()
    out = {key: np.zeros(len(hypotheses)) for key in ("rouge1", "rouge2", "rougeL")}
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        best = scorer.score_multi(refs, hyp)
        for key in out:
            out[key][i] = 100.0 * best[key].fmeasure
    return out


def score(hypotheses: list[str], references: list[list[str]]) -> dict:
    """Corpus BLEU and chrF (sacrebleu), mean best-reference ROUGE-1/2/L F1; every value 0-100.

    Every reference of each example counts; examples may have different numbers of references.
    Returns bleu, chrf, rouge1, rouge2, rougeL, bleu_signature, chrf_signature and n.
    """
    hypotheses, references = _check_pairs(hypotheses, references)
    streams = reference_streams(references)
    bleu, chrf = _sacrebleu_metric("bleu"), _sacrebleu_metric("chrf")
    bleu_score = bleu.corpus_score(hypotheses, streams)
    chrf_score = chrf.corpus_score(hypotheses, streams)
    rouge = _rouge_per_example(hypotheses, references)
    return {
        "bleu": float(bleu_score.score),
        "chrf": float(chrf_score.score),
        "rouge1": float(rouge["rouge1"].mean()),
        "rouge2": float(rouge["rouge2"].mean()),
        "rougeL": float(rouge["rougeL"].mean()),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "n": len(hypotheses),
    }


# --------------------------------------------------------------------------------------------
# 2. Paired bootstrap
# --------------------------------------------------------------------------------------------

def segment_stats(metric: str, hypotheses: list[str], references: list[list[str]]) -> np.ndarray:
    """Per-example sufficient statistics, shape (n, k): summed over examples they give the corpus score.

    bleu / chrf: sacrebleu's own per-segment statistics; rougeL: the example's best-reference F1 (k = 1).
    """
    hypotheses, references = _check_pairs(hypotheses, references)
    if metric == "rougeL":
        return _rouge_per_example(hypotheses, references)["rougeL"][:, None]
    scorer = _sacrebleu_metric(metric)
    stats = scorer._extract_corpus_statistics(hypotheses, reference_streams(references))
    return np.asarray(stats, dtype=np.int64)


def score_from_stats(metric: str, summed: np.ndarray, n: int) -> float:
    """The corpus score from statistics summed over `n` examples (sacrebleu's own formula for bleu / chrf)."""
    if metric == "rougeL":
        return float(summed[0] / n)
    return float(_sacrebleu_metric(metric)._compute_score_from_stats([int(x) for x in summed]).score)


def _scores_for_counts(metric: str, stats: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Corpus scores for many resamples at once; counts[r, i] = how often resample r drew example i."""
    summed = counts @ stats  # (R, k): the statistics of each resample, summed
    if metric == "rougeL":
        return summed[:, 0] / counts.shape[1]
    scorer = _sacrebleu_metric(metric)
    return np.array([scorer._compute_score_from_stats(row).score for row in summed.tolist()])


def paired_bootstrap(hyps_a: list[str], hyps_b: list[str], references: list[list[str]], *, metric: str = "bleu",
                     n_resamples: int = 1000, seed: int = 0) -> dict:
    """Paired bootstrap test of system A against system B on `metric` ("bleu", "rougeL" or "chrf").

    Each resample draws n example indices with replacement (numpy ``default_rng(seed)``), the same indices for
    both systems, and recomputes each system's corpus score (BLEU / chrF from summed sacrebleu statistics,
    ROUGE-L as the mean of per-example scores). With d = score(A) - score(B) per resample:

    - mean_diff: the mean of d; ci_low / ci_high: its 2.5th and 97.5th percentiles (95% interval);
    - p_value, two-sided: ``min(1, 2 * (min(#{d <= 0}, #{d >= 0}) + 1) / (n_resamples + 1))``. The +1 keeps
      it honest: a bootstrap of R resamples cannot show p below about 2 / (R + 1), so it never reports 0.
      Identical systems give 1.

    Deterministic for a given seed.
    """
    if metric not in METRICS:
        raise LoraboundError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
    if len(hyps_a) != len(hyps_b):
        raise LoraboundError(f"system A has {len(hyps_a)} outputs and system B {len(hyps_b)}; "
                             "compare outputs for the same examples")
    if n_resamples < 1:
        raise LoraboundError(f"n_resamples {n_resamples} must be at least 1; 1000 is usual")
    stats_a = segment_stats(metric, hyps_a, references)
    stats_b = segment_stats(metric, hyps_b, references)
    n = stats_a.shape[0]

    rng = np.random.default_rng(seed)
    indices = rng.integers(0, n, size=(n_resamples, n))
    counts = np.zeros((n_resamples, n), dtype=np.int64)
    np.add.at(counts, (np.arange(n_resamples)[:, None], indices), 1)
    diffs = _scores_for_counts(metric, stats_a, counts) - _scores_for_counts(metric, stats_b, counts)

    tail = min(int((diffs <= 0).sum()), int((diffs >= 0).sum()))
    p_value = min(1.0, 2.0 * (tail + 1) / (n_resamples + 1))
    return {
        "metric": metric,
        "a_score": score_from_stats(metric, stats_a.sum(axis=0), n),
        "b_score": score_from_stats(metric, stats_b.sum(axis=0), n),
        "mean_diff": float(diffs.mean()),
        "ci_low": float(np.percentile(diffs, 2.5)),
        "ci_high": float(np.percentile(diffs, 97.5)),
        "p_value": float(p_value),
        "n_resamples": int(n_resamples),
        "seed": int(seed),
        "n": int(n),
    }


# --------------------------------------------------------------------------------------------
# 3. In words
# --------------------------------------------------------------------------------------------

def format_p(p: float) -> str:
    """'p < 0.001', 'p = 0.004', 'p = 0.41'."""
    if p < 0.001:
        return "p < 0.001"
    if p < 0.1:
        return f"p = {p:.3f}"
    return f"p = {p:.2f}"


def _points(x: float) -> str:
    """A score difference to one decimal (two below 0.1), never '-0.0'."""
    text = f"{x:.2f}" if 0 < abs(x) < 0.1 else f"{x:.1f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def describe_significance(result: dict, name_a: str, name_b: str, level: float = 0.05) -> str:
    """One plain sentence: how A scored against B, the 95% interval, and whether that is significant."""
    label = METRIC_LABELS.get(result["metric"], result["metric"])
    diff = result["a_score"] - result["b_score"]
    p = format_p(result["p_value"])
    ci = f"95% CI {_points(result['ci_low'])} to {_points(result['ci_high'])}"
    if diff == 0:
        head = f"{name_a} scores the same {label} as {name_b}"
    else:
        head = f"{name_a} scores {_points(abs(diff))} {label} {'higher' if diff > 0 else 'lower'} than {name_b}"
    if result["p_value"] < level and diff != 0:
        change = "gain" if diff > 0 else "drop"
        return f"{head} ({ci}, {p}): the {change} is statistically significant at the {level:.0%} level."
    return f"{head} ({ci}): the difference is not statistically significant ({p})."
