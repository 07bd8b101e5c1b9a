"""Boundary criteria on curves and validation outputs whose answer is known by construction."""

import pytest

from lorabound.boundary import (SearchSettings, Validation, knee, local_maxima, max_likelihood, pick_by_metric,
                                preselect, search)
from lorabound.errors import LoraboundError
from lorabound.evaluate import COMBINED

# base 0.40, full 0.60: 90% of the gain is 0.58, first reached at b = 3.
CURVE = {"boundary": [-1, 0, 1, 2, 3, 4, 5], "mean_prob": [0.40, 0.45, 0.50, 0.55, 0.58, 0.61, 0.60]}
PER_LAYER = {layer: 10 for layer in range(6)}

# The adapter lowers the probability at the top (full <= base): every knee is -1, the peak is at b = 1.
FALLING = {"boundary": [-1, 0, 1, 2, 3, 4, 5], "mean_prob": [0.50, 0.52, 0.60, 0.55, 0.50, 0.49, 0.48]}
# An interior bump at b = 0 below half the full gain: no knee reaches it.
BUMPY = {"boundary": [-1, 0, 1, 2, 3, 4, 5], "mean_prob": [0.40, 0.47, 0.44, 0.46, 0.55, 0.59, 0.60]}


def test_knee_reaches_fraction_of_gain():
    assert knee(CURVE, 0.9) == 3
    assert knee(CURVE, 0.5) == 1
    assert knee(CURVE, 1.0) == 4


def test_knee_when_adapter_does_not_help():
    flat = {"boundary": [-1, 0, 1], "mean_prob": [0.5, 0.45, 0.40]}
    assert knee(flat, 0.9) == -1


def test_max_likelihood_prefers_smallest_on_ties():
    assert max_likelihood(CURVE) == 4
    assert max_likelihood({"boundary": [-1, 0, 1], "mean_prob": [0.1, 0.3, 0.3]}) == 0


def test_local_maxima_are_interior_and_count_a_flat_top_once():
    assert local_maxima(CURVE) == [4]
    assert local_maxima(BUMPY) == [0]
    assert local_maxima(FALLING) == [1]
    flat_top = {"boundary": [-1, 0, 1, 2, 3], "mean_prob": [0.1, 0.3, 0.3, 0.2, 0.4]}
    assert local_maxima(flat_top) == [0]
    rising_step = {"boundary": [-1, 0, 1, 2], "mean_prob": [0.1, 0.3, 0.3, 0.4]}  # a step, not a peak
    assert local_maxima(rising_step) == []


def test_preselect_includes_knees_peaks_and_full_adapter():
    chosen = preselect(CURVE)
    assert list(chosen) == sorted(chosen)
    assert "full adapter" in chosen[5] and "knee 90%" in chosen[3]
    assert chosen[4] == ["knee 95%", "max-likelihood", "local maximum"]
    # The paper's case the knees cannot reach: a bump below half the gain, and a peak when the full adapter
    # is no better than the base (the old preselection tried only -1 and the full adapter there).
    assert 0 in preselect(BUMPY) and "local maximum" in preselect(BUMPY)[0]
    falling = preselect(FALLING)
    assert list(falling) == [-1, 1, 5]
    assert falling[1] == ["max-likelihood", "local maximum"]


def test_pick_by_metric_with_tolerance():
    scores = {3: 50.0, 4: 52.0, 5: 51.5}
    assert pick_by_metric(scores) == 4
    assert pick_by_metric(scores, tolerance=0.6) == 4
    assert pick_by_metric(scores, tolerance=2.0) == 3


# --------------------------------------------------------------------------------------------
# Generating criteria, on outputs built from the references
# --------------------------------------------------------------------------------------------

SENTENCES = [
    "the cat sat on the mat", "a dog ran across the busy road", "we had fish and chips for dinner",
    "the train left the station at noon", "she plays the violin every morning", "rain is expected later today",
    "the museum opens at nine on sundays", "he forgot his keys in the car", "birds sing loudly in the spring",
    "the soup was too hot to eat", "our team won the final match", "coffee tastes better with fresh milk",
]
REFS = SENTENCES * 2  # 24 validation examples
RUSSIAN = ["кошка сидела на ковре у окна", "поезд ушёл со станции ровно в полдень",
           "мы ели рыбу с картошкой на ужин", "она играет на скрипке каждое утро"] * 3


def damaged(text: str) -> str:
    words = text.split()
    return " ".join(words[: len(words) // 2] + ["zzz"] * (len(words) - len(words) // 2))


def outputs(right: int, refs=REFS) -> list[str]:
    """The first `right` examples exactly right, the rest half wrong: more right is better on every metric."""
    return [r if i < right else damaged(r) for i, r in enumerate(refs)]


def validation(right_per_b: dict[int, int], refs=REFS, asked=None) -> Validation:
    def generate(b):
        if asked is not None:
            asked.append(b)
        return outputs(right_per_b[b], refs)

    return Validation(generate=generate, references=[[r] for r in refs])


def test_auto_generates_for_the_preselected_candidates_only():
    asked = []
    right = {b: 10 for b in range(6)}
    result = search(CURVE, SearchSettings(criterion="auto"), 6, PER_LAYER, validation(right, asked=asked))
    assert asked == list(preselect(CURVE))
    assert result.criterion == "auto" and result.goal == "quality"


def test_quality_goal_ignores_a_small_validation_edge():
    # b = 3 gets one more example right than the full adapter: about a point better, well within the noise.
    # The old rule (best validation ROUGE-L, ties to the smaller b) chose it.
    right = {1: 4, 2: 4, 3: 13, 4: 12, 5: 12}
    result = search(CURVE, SearchSettings(criterion="auto"), 6, PER_LAYER, validation(right))
    assert result.boundary == 5
    assert result.reason.startswith("goal quality: no candidate beat the full adapter beyond noise")
    assert "the closest was b = 3: +" in result.reason and "Bonferroni" in result.reason
    three = next(c for c in result.candidates if c["boundary"] == 3)
    assert three["rougeL"] > next(c for c in result.candidates if c["boundary"] == 5)["rougeL"]
    assert three["vs_full"][COMBINED]["p_value"] > 0.05


def test_quality_goal_drops_layers_for_a_gain_beyond_noise():
    # b = 3 gets ten more examples right than the full adapter, and the same ones wrong otherwise.
    right = {1: 4, 2: 4, 3: 22, 4: 12, 5: 12}
    result = search(CURVE, SearchSettings(criterion="auto"), 6, PER_LAYER, validation(right))
    assert result.boundary == 3
    assert result.reason.startswith("goal quality: the largest validation gain beyond noise, b = 3: +")
    test = next(c for c in result.candidates if c["boundary"] == 3)["vs_full"][COMBINED]
    assert test["ci_low"] > 0 and test["p_value"] < 0.05 / 4  # four smaller candidates: b = 1, 2, 3, 4


def test_size_goal_takes_the_smallest_b_not_significantly_worse_within_tolerance():
    # b = 1 loses two examples (a couple of points, not significant); b = 0 loses twelve (significant).
    right = {0: 0, 1: 10, 3: 12, 5: 12}
    settings = dict(criterion="auto", goal="size", candidates=[0, 1, 3])
    strict = search(CURVE, SearchSettings(**settings), 6, PER_LAYER, validation(right))
    assert strict.boundary == 3  # tolerance 0: no loss at all
    loose = search(CURVE, SearchSettings(**settings, tolerance=10), 6, PER_LAYER, validation(right))
    assert loose.boundary == 1
    assert loose.reason.startswith("goal size: the smallest b not significantly worse")
    assert "at most 10 points below it" in loose.reason
    zero = next(c for c in loose.candidates if c["boundary"] == 0)["vs_full"][COMBINED]
    assert zero["diff"] < -10 and zero["p_value"] < 0.05


def test_every_candidate_has_intervals_against_the_full_adapter():
    right = {0: 2, 1: 6, 3: 12, 5: 12}
    result = search(CURVE, SearchSettings(criterion="auto", candidates=[0, 1, 3]), 6, PER_LAYER, validation(right))
    by_b = {c["boundary"]: c for c in result.candidates}
    assert by_b[5]["vs_full"] is None and by_b[5]["why"] == ["full adapter"]
    for b in (0, 1, 3):
        assert by_b[b]["why"] == ["given"]
        for metric in ("bleu", "rougeL", COMBINED):
            t = by_b[b]["vs_full"][metric]
            assert t["ci_low"] <= t["ci_high"] and 0 < t["p_value"] <= 1
        assert by_b[b]["vs_full"]["bleu"]["diff"] == pytest.approx(by_b[b]["bleu"] - by_b[5]["bleu"])
    assert by_b[0]["vs_full"]["rougeL"]["ci_high"] < 0  # far worse: the interval says so
    assert by_b[3]["vs_full"][COMBINED] == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}
    tests = result.validation_tests
    assert tests["n"] == 24 and tests["resamples"] == 1000 and "tok:13a" in tests["bleu_signature"]
    assert "tok:unicode" in tests["rouge_signature"]


def test_metric_criterion_says_exactly_what_it_did():
    right = {1: 4, 3: 13, 4: 13, 5: 12}
    best = search(CURVE, SearchSettings(criterion="rougeL", candidates=[1, 4]), 6, PER_LAYER, validation(right))
    assert best.boundary == 4
    assert best.reason.startswith("the highest validation ROUGE-L (")
    assert "among candidates [1, 4, 5]" in best.reason
    tied = search(CURVE, SearchSettings(criterion="rougeL", candidates=[1, 3, 4]), 6, PER_LAYER, validation(right))
    assert tied.boundary == 3
    assert "b = 3, 4 tied for the highest validation ROUGE-L" in tied.reason
    assert "the smallest of them was taken" in tied.reason
    within = search(CURVE, SearchSettings(criterion="bleu", candidates=[1, 4], tolerance=50), 6, PER_LAYER,
                    validation(right))
    assert within.boundary == 1
    assert within.reason.startswith("the smallest b whose validation BLEU (")
    assert "is within 50 points of the highest (" in within.reason


@pytest.mark.parametrize("criterion", ["auto", "rougeL", "bleu"])
def test_a_degenerate_tie_is_said_and_keeps_the_full_adapter(criterion):
    same = {b: 6 for b in range(6)}
    result = search(CURVE, SearchSettings(criterion=criterion), 6, PER_LAYER, validation(same))
    assert result.boundary == 5
    assert "every candidate scored the same validation" in result.reason
    assert "so b = 5 (the full adapter)" in result.reason


def test_non_latin_outputs_are_told_apart():
    # Russian outputs: rouge-score's own tokenizer scored every candidate 0 and the search took the smallest b.
    right = {1: 2, 3: 12, 4: 6, 5: 6}
    result = search(CURVE, SearchSettings(criterion="rougeL", candidates=[1, 3, 4]), 6, PER_LAYER,
                    validation(right, refs=RUSSIAN))
    assert result.boundary == 3
    scores = [c["rougeL"] for c in result.candidates]
    assert len(set(scores)) == 3 and min(scores) > 0


def test_all_zero_scores_say_so():
    # Outputs in another script than the references: nothing matches, every candidate scores 0.
    def generate(b):
        return ["zzz qqq"] * len(RUSSIAN)

    val = Validation(generate=generate, references=[[r] for r in RUSSIAN])
    result = search(CURVE, SearchSettings(criterion="auto"), 6, PER_LAYER, val)
    assert result.boundary == 5
    assert "(all zero: check --bleu-tokenize" in result.reason


def test_user_boundary_and_errors():
    result = search(CURVE, SearchSettings(boundary=2), 6, {i: 1 for i in range(6)})
    assert result.boundary == 2 and result.kept_fraction == pytest.approx(0.5)
    with pytest.raises(LoraboundError, match="outside -1..5"):
        search(CURVE, SearchSettings(boundary=6), 6, {i: 1 for i in range(6)})
    with pytest.raises(LoraboundError, match="unknown criterion"):
        SearchSettings(criterion="best")
    with pytest.raises(LoraboundError, match="tolerance"):
        SearchSettings(tolerance=-1)
    with pytest.raises(LoraboundError, match="unknown goal 'small'; choose one of quality, size"):
        SearchSettings(goal="small")
    with pytest.raises(LoraboundError, match="--goal applies to --criterion auto only, not bleu"):
        SearchSettings(criterion="bleu", goal="size")
    with pytest.raises(LoraboundError, match="--tolerance is not used by --criterion auto --goal quality"):
        SearchSettings(tolerance=1.0)
    assert SearchSettings(goal="size", tolerance=1.0).resolved_goal == "size"


def test_candidates_are_checked_before_any_generation():
    def never(b):
        raise AssertionError("generated for an impossible boundary")

    with pytest.raises(LoraboundError, match="outside -1..5"):
        search(CURVE, SearchSettings(criterion="bleu", candidates=[2, -2]), 6, {i: 1 for i in range(6)},
               Validation(generate=never, references=[["x"]]))


def test_a_candidate_between_lora_layers_scores_as_the_layer_below():
    # LoRA on layers 2 and 4 only. b = 3 keeps what b = 2 keeps; b = 1 keeps no LoRA layer, so it is the base.
    restricted = {"boundary": [-1, 2, 4], "mean_prob": [0.4, 0.5, 0.6]}
    result = search(restricted, SearchSettings(criterion="bleu", candidates=[1, 3]), 6, {2: 1, 4: 1},
                    validation({1: 0, 3: 6, 4: 6}))
    assert [(c["boundary"], c["mean_prob"]) for c in result.candidates] == [(1, 0.4), (3, 0.5), (4, 0.6)]
