"""Boundary criteria on curves whose answer is known by construction."""

import pytest

from lorabound.boundary import SearchSettings, knee, max_likelihood, pick_by_metric, preselect, search
from lorabound.errors import LoraboundError

# base 0.40, full 0.60: 90% of the gain is 0.58, first reached at b = 3.
CURVE = {"boundary": [-1, 0, 1, 2, 3, 4, 5], "mean_prob": [0.40, 0.45, 0.50, 0.55, 0.58, 0.61, 0.60]}


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


def test_preselect_includes_full_adapter_and_knees():
    chosen = preselect(CURVE)
    assert 5 in chosen and knee(CURVE, 0.9) in chosen and chosen == sorted(set(chosen))


def test_pick_by_metric_with_tolerance():
    scores = {3: 50.0, 4: 52.0, 5: 51.5}
    assert pick_by_metric(scores) == 4
    assert pick_by_metric(scores, tolerance=0.6) == 4
    assert pick_by_metric(scores, tolerance=2.0) == 3


def test_search_by_generation_metric_calls_only_candidates():
    asked = []

    def fake_scores(b):
        asked.append(b)
        return {"bleu": 10.0 + b, "rougeL": 40.0 - abs(b - 3), "chrf": 30.0}

    per_layer = {layer: 10 for layer in range(6)}
    result = search(CURVE, SearchSettings(criterion="auto"), 6, per_layer, fake_scores)
    assert asked == preselect(CURVE)
    assert result.boundary == 3 and result.lora_params_kept == 40 and result.lora_params_total == 60
    assert result.criterion == "auto"
    by_bleu = search(CURVE, SearchSettings(criterion="bleu"), 6, per_layer, fake_scores)
    assert by_bleu.boundary == 5


def test_user_boundary_and_errors():
    result = search(CURVE, SearchSettings(boundary=2), 6, {i: 1 for i in range(6)})
    assert result.boundary == 2 and result.kept_fraction == pytest.approx(0.5)
    with pytest.raises(LoraboundError, match="outside -1..5"):
        search(CURVE, SearchSettings(boundary=6), 6, {i: 1 for i in range(6)})
    with pytest.raises(LoraboundError, match="unknown criterion"):
        SearchSettings(criterion="best")
    with pytest.raises(LoraboundError, match="tolerance"):
        SearchSettings(tolerance=-1)


def test_candidates_are_checked_before_any_generation():
    def never(b):
        raise AssertionError("generated for an impossible boundary")

    with pytest.raises(LoraboundError, match="outside -1..5"):
        search(CURVE, SearchSettings(criterion="bleu", candidates=[2, -2]), 6, {i: 1 for i in range(6)}, never)
    # A candidate between the curve's points scores as the LoRA layer below it; below all of them, as unknown.
    restricted = {"boundary": [-1, 2, 3], "mean_prob": [0.4, 0.5, 0.6]}
    result = search(restricted, SearchSettings(criterion="bleu", candidates=[1, 3]), 6, {2: 1, 3: 1},
                    lambda b: {"bleu": float(b), "rougeL": 0.0, "chrf": 0.0})
    assert [c["mean_prob"] for c in result.candidates] == [0.4, 0.6]
