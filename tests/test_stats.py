"""Paired comparisons (lorabound.metrics.stats) and the decision rules built on them, on synthetic per-example scores.

The properties a decision must have whatever the model: its test rejects a true null no more often than its
level at the sample sizes users have; non-inferiority accepts a candidate that is truly worse than the margin
no more often than 2.5%; and fewer validation examples never make the size search drop more.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from lorabound.decision.boundary import COMPARED, pick_for_goal
from lorabound.metrics.stats import (COMBINED, EXACT_MAX, Paired, bleu_from_sums, bootstrap_differences, compare,
                                     interval, power, sign_flip_test, smallest_p, units_needed)

SIZES = (4, 8, 20, 40)


# --------------------------------------------------------------------------------------------
# Synthetic systems: per-example BLEU statistics and ROUGE-L scores from a per-example quality
# --------------------------------------------------------------------------------------------

def system(rng, quality: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example statistics of a system whose example i is right with probability quality[i]."""
    n = len(quality)
    length = rng.integers(6, 16, size=n)
    totals = np.stack([np.maximum(length - k, 0) for k in range(4)], axis=1)
    correct = rng.binomial(totals, np.clip(quality, 0, 1)[:, None] ** np.arange(1, 5))
    ref_len = length + rng.integers(-2, 3, size=n)
    bleu = np.concatenate([length[:, None], ref_len[:, None], correct, totals], axis=1)
    rouge = np.clip(100 * quality + rng.normal(0, 8, size=n), 0, 100)[:, None]
    return {"bleu": bleu, "rougeL": rouge}


def paired(a: dict, b: dict) -> Paired:
    return Paired({m: (a[m], b[m]) for m in ("bleu", "rougeL")})


def exchangeable_pair(rng, n: int) -> Paired:
    """Two systems drawn from one distribution per example: a true difference of 0 on every metric."""
    difficulty = rng.uniform(0.2, 0.9, size=n)
    return paired(system(rng, difficulty), system(rng, difficulty))


# --------------------------------------------------------------------------------------------
# BLEU from summed statistics
# --------------------------------------------------------------------------------------------

def test_vectorised_bleu_equals_sacrebleus_formula_on_every_edge():
    from sacrebleu.metrics import BLEU

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 30, size=10) for _ in range(300)]
    rows += [np.array([5, 9, 3, 0, 0, 0, 5, 4, 3, 2]),  # short output, no 2-gram matches
             np.array([0, 9, 0, 0, 0, 0, 0, 0, 0, 0]),  # empty output
             np.array([3, 3, 2, 1, 0, 0, 3, 2, 1, 0]),  # no 4-grams at all
             np.array([12, 10, 12, 11, 10, 9, 12, 11, 10, 9])]  # perfect and longer than the reference
    for row in rows:
        row[6:] = np.maximum(row[6:], row[2:6])  # matches never exceed totals
        expected = BLEU.compute_bleu(correct=list(row[2:6]), total=list(row[6:]), sys_len=int(row[0]),
                                     ref_len=int(row[1]), smooth_method="exp", max_ngram_order=4).score
        assert bleu_from_sums(row)[0] == pytest.approx(expected, abs=1e-9), row


# --------------------------------------------------------------------------------------------
# The test's false-positive rate, at the sizes users have
# --------------------------------------------------------------------------------------------

def bootstrap_p(pair: Paired, metric: str, resamples: int, seed: int) -> float:
    """The plain paired bootstrap's p-value lorabound used before: it is too optimistic on small samples."""
    d = bootstrap_differences(pair, metric, resamples, seed)
    return min(1.0, 2 * (min((d <= 0).sum(), (d >= 0).sum()) + 1) / (resamples + 1))


@pytest.fixture
def few_swaps(monkeypatch):
    """Monte Carlo p-values with 200 random swaps instead of 10,000: (k + 1) / (R + 1) is valid at any R, and
    thousands of null draws then take seconds."""
    monkeypatch.setattr("lorabound.metrics.stats.MIN_SWAPS", 200)


def null_rate(p_values: list[float], level: float) -> float:
    return float(np.mean(np.asarray(p_values) < level))


@pytest.mark.parametrize("n", SIZES)
def test_sign_flip_test_holds_its_level_on_a_synthetic_null(n, few_swaps):
    # 4,000 null draws for the mean of BLEU and ROUGE-L (the decisions' metric: a rate's standard error of
    # 0.35 points), 1,500 for each metric alone.
    rng = np.random.default_rng(n)
    pairs = [exchangeable_pair(rng, n) for _ in range(4000)]
    combined = [sign_flip_test(pair, COMBINED, 200, i)[0] for i, pair in enumerate(pairs)]
    assert null_rate(combined, 0.05) <= 0.05 + 0.01
    for metric in ("bleu", "rougeL"):
        alone = [sign_flip_test(pair, metric, 200, i)[0] for i, pair in enumerate(pairs[:1500])]
        assert null_rate(alone, 0.05) <= 0.05 + 0.01, metric
    if n == 4:  # the check can fail: the plain bootstrap's p-value breaks it where the sign-flip test holds
        naive = [bootstrap_p(pair, COMBINED, 200, i) for i, pair in enumerate(pairs[:1000])]
        assert null_rate(naive, 0.05) > 0.05 + 0.01


@pytest.mark.parametrize("n", [8, 20])
def test_sign_flip_test_holds_a_bonferroni_level_too(n, few_swaps):
    rng = np.random.default_rng(100 + n)
    level = 0.05 / 4
    p_values = [sign_flip_test(exchangeable_pair(rng, n), COMBINED, 800, i, level)[0] for i in range(2000)]
    assert null_rate(p_values, level) <= level + 0.005


def test_exact_enumeration_and_the_smallest_p():
    rng = np.random.default_rng(3)
    better = system(rng, np.full(6, 0.9))
    worse = system(rng, np.full(6, 0.1))
    p, how = sign_flip_test(paired(better, worse), "rougeL", resamples=10, seed=0)
    assert how == "exact, all 64 swaps"
    assert p == pytest.approx(2 / 64)  # only "no swap" and "all swapped" are as extreme
    assert smallest_p(6, 10) == 2 / 64 and smallest_p(4, 10) == 2 / 16 > 0.05
    # Monte Carlo above EXACT_MAX: enough draws to reach a twentieth of the level, whatever was asked
    assert smallest_p(EXACT_MAX + 1, resamples=100, level=0.05 / 25) <= 0.05 / 25 / 20


def test_a_clear_gain_reaches_a_bonferroni_level_with_few_resamples():
    # Once "--bootstrap 100 and 3 candidates" could never reach 0.05 / 3: the p-value's floor was 2 / 101.
    rng = np.random.default_rng(4)
    strong = paired(system(rng, np.full(30, 0.9)), system(rng, np.full(30, 0.3)))
    result = compare(strong, COMBINED, resamples=100, seed=0)
    assert result["p_value"] < 0.05 / 25 and result["ci_low"] > 0


# --------------------------------------------------------------------------------------------
# The interval: non-inferiority accepts a candidate worse than the margin at most 2.5% of the time
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
def test_non_inferiority_rarely_accepts_a_loss_at_the_margin(n):
    rng = np.random.default_rng(200 + n)
    margin, draws, accepted = 2.0, 500, 0
    for i in range(draws):
        base = rng.uniform(20, 80, size=n)
        full = base + rng.normal(0, 10, size=n)
        worse = base - margin + rng.normal(0, 10, size=n)  # truly `margin` points worse
        pair = Paired({"rougeL": (worse[:, None], full[:, None])})
        low, _ = interval(bootstrap_differences(pair, "rougeL", 400, i), n, float((worse - full).mean()))
        accepted += low >= -margin
    assert accepted / draws <= 0.025 + 0.01


def test_the_interval_widens_on_small_samples_beyond_the_plain_percentiles():
    rng = np.random.default_rng(5)
    pair = Paired({"rougeL": (rng.normal(50, 10, (6, 1)), rng.normal(50, 10, (6, 1)))})
    d = bootstrap_differences(pair, "rougeL", 2000, 0)
    low, high = interval(d, 6)
    assert low < np.quantile(d, 0.025) and high > np.quantile(d, 0.975)


# --------------------------------------------------------------------------------------------
# Power
# --------------------------------------------------------------------------------------------

def test_power_scales_with_the_square_root_of_the_examples():
    small, large = power(2.0, 50, effect=1.0), power(1.0, 200, effect=1.0)  # 4x the data halves the spread
    assert large["mdd"] < small["mdd"] / 1.9
    assert small["n_for_effect"] == pytest.approx(large["n_for_effect"], rel=0.02)
    # the minimal detectable difference is what the examples needed say: at n_for_effect, mdd is about the effect
    at = power(2.0 * math.sqrt(50 / small["n_for_effect"]), small["n_for_effect"], effect=1.0)
    assert at["mdd"] == pytest.approx(1.0, rel=0.05)
    assert power(0.0, 50, effect=1.0)["n_for_effect"] is None  # identical outputs: nothing to scale


def test_the_minimal_detectable_difference_is_detected_about_80_percent_of_the_time():
    rng = np.random.default_rng(6)
    n, spread = 40, 10.0
    probe = Paired({"rougeL": (rng.normal(50, spread, (n, 1)), rng.normal(50, spread, (n, 1)))})
    mdd = compare(probe, "rougeL", resamples=400)["mdd"]
    hits, draws = 0, 300
    for i in range(draws):
        b = rng.normal(50, spread, n)
        a = rng.normal(50, spread, n) + mdd
        hits += compare(Paired({"rougeL": (a[:, None], b[:, None])}), "rougeL", resamples=400, seed=i)["p_value"] < 0.05
    assert 0.65 <= hits / draws <= 0.95


# --------------------------------------------------------------------------------------------
# The size search: fewer examples never drop more, in expectation
# --------------------------------------------------------------------------------------------

# boundary: (share of examples whose output equals the full adapter's, change in quality on the others)
CANDIDATES = {4: (0.9, 0.0), 3: (0.8, 0.0), 2: (0.5, -0.1), 1: (0.1, -0.3)}
FULL = 5


def scored_on(pairs: dict[int, Paired], rows) -> dict:
    scored = {FULL: {COMBINED: 50.0, "bleu": 40.0, "rougeL": 60.0, "vs_full": None}}
    for b, pair in pairs.items():
        sub = pair.subset(rows)
        tests = {m: compare(sub, m, resamples=300, seed=0) for m in COMPARED}
        scored[b] = {m: 50.0 + tests[m]["diff"] for m in COMPARED} | {"vs_full": tests}
    return scored


def candidate(rng, full: dict, quality: np.ndarray, same: float, change: float) -> dict:
    """A pruned variant: the full adapter's output on a share `same` of the examples, another elsewhere."""
    other = system(rng, np.clip(quality + change, 0, 1))
    keep = rng.random(len(quality)) < same
    return {m: np.where(keep[:, None], full[m], other[m]) for m in full}


def test_fewer_validation_examples_never_make_the_size_search_drop_more(few_swaps):
    rng = np.random.default_rng(7)
    n = 40
    quality = rng.uniform(0.3, 0.9, size=n)
    full = system(rng, quality)
    pairs = {b: paired(candidate(rng, full, quality, *how), full) for b, how in CANDIDATES.items()}

    def dropped(rows) -> int:
        b, _ = pick_for_goal(scored_on(pairs, rows), "size", 4.0, FULL)
        return FULL - b  # layers dropped

    mean_dropped = {}
    for size in (8, 16):
        draws = [dropped(rng.choice(n, size, replace=False)) for _ in range(60)]
        mean_dropped[size] = float(np.mean(draws))
    mean_dropped[n] = dropped(np.arange(n))
    assert mean_dropped[8] <= mean_dropped[16] <= mean_dropped[n], mean_dropped
    assert mean_dropped[n] >= 1  # the candidates are close enough that all 40 examples do drop something


# --------------------------------------------------------------------------------------------
# Real outputs: the embedded model with the demo's adapter (tests/data, how they were made is in the file)
# --------------------------------------------------------------------------------------------

REAL = Path(__file__).parent / "data" / "e2e-demo-validation-outputs.json"


@pytest.fixture(scope="module")
def real_statistics():
    """Per-example statistics of the full adapter's and b = 24's real outputs on 40 E2E validation inputs."""
    from lorabound.metrics.scores import paired_statistics

    examples = json.loads(REAL.read_text())["examples"]
    refs = [e["references"] for e in examples]
    return paired_statistics([e["b24"] for e in examples], [e["full"] for e in examples], refs, ["bleu", "rougeL"])


@pytest.mark.parametrize("n", SIZES)
def test_sign_flip_test_holds_its_level_on_real_swapped_outputs(n, real_statistics, few_swaps):
    # A true difference of 0 built from real outputs: n of the 40 examples, each example's two outputs swapped
    # at random (the null the earlier paired bootstrap failed: 17% false positives at 4 examples).
    rng = np.random.default_rng(300 + n)
    p_values, naive = [], []
    for i in range(2000):
        pair = real_statistics.subset(rng.choice(40, n, replace=False)).swapped(rng.random(n) < 0.5)
        p_values.append(sign_flip_test(pair, COMBINED, 200, i)[0])
        if i < 600:
            naive.append(bootstrap_p(pair, COMBINED, 200, i))
    assert null_rate(p_values, 0.05) <= 0.05 + 0.01
    if n <= 8:
        assert null_rate(naive, 0.05) > 0.05 + 0.01  # the check tells a miscalibrated test apart


def test_the_real_outputs_differ_where_they_should(real_statistics):
    # Not a null: b = 24 against the full adapter as generated (40 examples), with what it could detect.
    result = compare(real_statistics, COMBINED, resamples=1000)
    assert result["differing"] == 29 and result["n"] == 40
    assert result["ci_low"] < result["diff"] < result["ci_high"] and result["mdd"] > 1.15
    assert result["n_for_effect"] > 40  # 40 examples cannot detect the paper's gain here


@pytest.mark.parametrize("spread, effect", [(1.2, 1.4), (2.0, 1.4), (0.9, 0.9)])
def test_units_needed_gives_the_power_it_promises(spread, effect):
    """A study pooled over k independent test sets: units_needed(se at k0 sets) test sets detect `effect` with
    about 80% power (checked by simulating t tests on that many sets, 4,000 times), and one set fewer does not
    reach it: the t quantiles' cost at few sets is counted, which a normal approximation would miss."""
    k0 = 3
    needed = units_needed(spread / math.sqrt(k0), k0, effect)
    rng = np.random.default_rng(7)

    def simulated_power(k: int) -> float:
        draws = rng.normal(effect, spread, size=(4000, k))
        t = draws.mean(axis=1) / (draws.std(axis=1, ddof=1) / math.sqrt(k))
        return float(np.mean(np.abs(t) > scipy_stats.t.ppf(0.975, k - 1)))

    assert 0.78 <= simulated_power(needed) <= 0.9
    assert simulated_power(needed - 1) < 0.82
    assert units_needed(0.0, k0, effect) is None and units_needed(spread, 1, effect) is None
    assert units_needed(100.0, k0, 0.01) is None  # beyond the limit: no number rather than a made-up one
