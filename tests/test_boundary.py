"""Boundary criteria on curves and validation outputs whose answer is known by construction."""

import re

import pytest

from lorabound.decision.boundary import (SearchSettings, Validation, knee, local_maxima, max_likelihood, pick_by_metric,
                                       preselect, search)
from lorabound.errors import LoraboundError
from lorabound.metrics.scores import COMBINED

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


def test_size_goal_takes_the_smallest_b_shown_non_inferior_within_the_margin():
    # b = 1 loses two examples (about 5 points; its interval reaches about -15); b = 0 loses twelve.
    right = {0: 0, 1: 10, 3: 12, 5: 12}
    settings = dict(criterion="auto", goal="size", candidates=[0, 1, 3])
    # b = 3 answers as the full adapter on all 24 examples, but up to 14% of such examples could differ (97.5%
    # bound) by as much as other candidates' differing examples do: no loss at all (margin 0) or a loss of at
    # most 1 point is not shown.
    for margin in (0, None):
        strict = search(CURVE, SearchSettings(**settings, tolerance=margin), 6, PER_LAYER, validation(right))
        assert strict.boundary == 5 and "the sequence stopped at b = 3" in strict.reason
    assert "margin of 1 points" in strict.reason  # the default
    loose = search(CURVE, SearchSettings(**settings, tolerance=20), 6, PER_LAYER, validation(right))
    assert loose.boundary == 1
    assert loose.reason.startswith("goal size: the smallest b shown non-inferior, b = 1")
    assert "margin of 20 points" in loose.reason and "the sequence stopped at b = 0" in loose.reason
    by_b = {c["boundary"]: c for c in loose.candidates}
    assert by_b[3]["non_inferior"] is True and by_b[1]["non_inferior"] is True and by_b[0]["non_inferior"] is False
    assert loose.validation_tests["margin"] == 20
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
    same = by_b[3]["vs_full"][COMBINED]  # identical outputs: no difference, no spread, nothing to detect
    assert (same["diff"], same["ci_low"], same["ci_high"], same["p_value"], same["mdd"]) == (0, 0, 0, 1, 0)
    assert same["n_for_effect"] is None and same["n"] == 24
    differs = by_b[1]["vs_full"][COMBINED]
    assert 0 < differs["mdd"] < 100 and differs["n_for_effect"] > 24  # 24 examples cannot detect 1.15 points
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


def compared(bleu: tuple, rouge: tuple) -> dict:
    """A candidate's row with (difference, p) against the full adapter for BLEU and ROUGE-L; the mean's p given."""
    mean_p = min(bleu[1], rouge[1])
    tests = {"bleu": bleu, "rougeL": rouge, COMBINED: ((bleu[0] + rouge[0]) / 2, mean_p)}
    return {"bleu": 30 + bleu[0], "rougeL": 50 + rouge[0], COMBINED: 40 + tests[COMBINED][0],
            "vs_full": {m: {"diff": d, "ci_low": d - 1, "ci_high": d + 1, "p_value": p, "smallest_p": 0.001, "se": 0.5,
                            "n": 40, "effect": 1.0} for m, (d, p) in tests.items()}}


def test_goal_rules_refuse_a_gain_that_costs_a_significant_loss_on_one_metric():
    from lorabound.decision.boundary import pick_for_goal

    full = {"bleu": 30, "rougeL": 50, COMBINED: 40, "vs_full": None}
    # b = 1: a big BLEU gain, a significant ROUGE-L loss. b = 2: a modest gain on both, beyond noise.
    scored = {1: compared((+12, 0.001), (-4, 0.01)), 2: compared((+2, 0.004), (+2, 0.004)), 5: full}
    b, reason = pick_for_goal(scored, "quality", 0.0, 5)
    assert b == 2 and "neither BLEU nor ROUGE-L significantly lower" in reason
    # For size, b = 1 is the smallest and gains on the mean, but is significantly worse on ROUGE-L.
    b, reason = pick_for_goal(scored, "size", 0.0, 5)
    assert b == 2 and reason.startswith("goal size: the smallest b shown non-inferior, b = 2")
    # A gain beyond noise for one candidate alone is not enough after the Bonferroni correction for three.
    scored = {0: compared((0, 1.0), (0, 1.0)), 1: compared((-1, 0.5), (-1, 0.5)), 2: compared((+2, 0.03), (+2, 0.03)),
              5: full}
    b, reason = pick_for_goal(scored, "quality", 0.0, 5)
    assert b == 5 and "needs p < 0.0167: 0.05 / 3 candidates" in reason


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
    with pytest.raises(LoraboundError, match="--goal applies to --criterion auto or per-module only, not bleu"):
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


# --------------------------------------------------------------------------------------------
# The search command on a tiny model, as a user runs it
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A tiny model folder, a random adapter on every layer, and a JSONL task with Russian references."""
    import json

    from tiny import tiny_lora, save_tiny_base

    root = tmp_path_factory.mktemp("search")
    save_tiny_base(root)
    tiny_lora().save_pretrained(root / "adapter")
    rows = [{"input": f"место {i}", "target": RUSSIAN[i % len(RUSSIAN)]} for i in range(12)]
    (root / "data.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    args = ["--model", str(root / "base"), "--adapter", str(root / "adapter"), "--data", str(root / "data.jsonl"),
            "--validation-size", "4", "--test-size", "2", "--max-length", "64", "--max-new-tokens", "3"]
    return root, args


def test_cli_search_prints_each_candidates_interval(tiny_world, capsys):
    import json

    from lorabound.cli import main

    root, args = tiny_world
    out = root / "searched"
    code = main(["--quiet", "search", *args, "--criterion", "auto", "--goal", "size", "--tolerance", "100",
                 "--bleu-tokenize", "char", "--bootstrap", "50", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    found = json.loads((out / "search.json").read_text())
    assert found["goal"] == "size" and found["reason"].startswith(("goal size:", "every candidate scored the same"))
    assert "tok:char" in found["validation_tests"]["bleu_signature"] and found["validation_tests"]["resamples"] == 50
    lines = printed.splitlines()
    assert lines[0] == f"boundary b = {found['boundary']} ({found['reason']})"
    assert "against the full adapter (b = 3)" in printed and "mean vs full" in printed
    for c in found["candidates"]:
        row = next(line for line in lines if line.startswith(f"{c['boundary']:4d}  "))
        if c["vs_full"] is None:
            assert "(reference)" in row and row.endswith("full adapter")
        else:
            t = c["vs_full"]["bleu+rougeL"]
            assert f"{t['diff']:+7.2f} [{t['ci_low']:+6.1f}, {t['ci_high']:+6.1f}]" in row
            assert row.endswith(", ".join(c["why"]))


def test_cli_search_refuses_a_goal_for_another_criterion(tiny_world, capsys):
    from lorabound.cli import main

    _, args = tiny_world
    assert main(["--quiet", "search", *args, "--criterion", "bleu", "--goal", "size"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --goal applies to --criterion auto or per-module only, not "
                                               "bleu; drop --goal or use --criterion auto")
    assert main(["--quiet", "search", *args, "--bleu-tokenize", "klingon"]) == 2
    assert "--bleu-tokenize 'klingon' is not a tokenizer" in capsys.readouterr().err


def test_cli_search_with_a_given_boundary_prints_without_a_curve(tiny_world, capsys):
    from lorabound.cli import main

    _, args = tiny_world
    assert main(["--quiet", "search", *args, "--boundary", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("boundary b = 1 (b = 1 was given with --boundary)")
    assert "   1              -" in printed  # no curve was computed: the probability is unknown, not a crash


def test_report_shows_candidate_intervals_and_metric_signatures():
    from lorabound.report.document import render_markdown

    right = {0: 2, 3: 12, 5: 12}
    result = search(CURVE, SearchSettings(criterion="auto", candidates=[0, 3]), 6, PER_LAYER, validation(right))
    report = {"search": result.to_dict(), "bleu_signature": "nrefs:1|tok:zh", "rouge_signature": "rouge-score:x"}
    text = render_markdown(report, {})
    zero = next(c for c in result.candidates if c["boundary"] == 0)["vs_full"][COMBINED]
    assert f"{zero['diff']:+.2f} [{zero['ci_low']:+.2f}, {zero['ci_high']:+.2f}], p = {zero['p_value']:.3f}" in text
    assert re.search(r"\|\s+reference \|\s+full adapter \|", text)
    assert "BLEU signature: nrefs:1|tok:zh" in text and "ROUGE signature: rouge-score:x" in text


def test_cli_evaluate_and_run_record_the_bleu_tokenizer(tiny_world, capsys):
    import json

    from lorabound.cli import main

    root, args = tiny_world
    assert main(["--quiet", "evaluate", *args, "--bleu-tokenize", "zh", "--bootstrap", "20",
                 "--out", str(root / "eval")]) == 0
    printed = capsys.readouterr().out
    evaluation = json.loads((root / "eval" / "evaluation.json").read_text())
    assert "tok:zh" in evaluation["bleu_signature"]
    assert f"BLEU signature: {evaluation['bleu_signature']}" in printed
    assert f"ROUGE signature: {evaluation['rouge_signature']}" in printed and "tok:unicode-v1" in printed
    assert main(["--quiet", "run", *args, "--boundary", "1", "--bleu-tokenize", "char", "--bootstrap", "20",
                 "--out", str(root / "run")]) == 0
    report = json.loads((root / "run" / "report.json").read_text())
    assert "tok:char" in report["bleu_signature"]
    assert json.loads((root / "run" / "run.json").read_text())["metrics"] == {"bleu_tokenize": "char"}
    markdown = (root / "run" / "report.md").read_text()
    assert f"BLEU signature: {report['bleu_signature']}" in markdown and "ROUGE signature: rouge-score:" in markdown


# Curves whose adapter does not raise the ground-truth probability (full <= base): knee() is the base model there.
NO_GAIN_CURVES = {
    "falling": FALLING,
    "lower everywhere": {"boundary": [-1, 0, 1, 2], "mean_prob": [0.50, 0.45, 0.40, 0.35]},
    "flat": {"boundary": [-1, 0, 1, 2], "mean_prob": [0.30, 0.30, 0.30, 0.30]},
    "rises then ends below": {"boundary": [-1, 0, 1, 2], "mean_prob": [0.30, 0.50, 0.40, 0.29]},
}


@pytest.mark.parametrize("name", list(NO_GAIN_CURVES))
def test_the_base_model_is_never_called_a_knee_when_the_adapter_does_not_raise_the_probability(name):
    from lorabound.evaluation import run_origins

    curve = NO_GAIN_CURVES[name]
    top = curve["boundary"][-1]
    found = {"boundary": top, "criterion": "auto", "candidates": []}
    origins = run_origins(found, {"truncation": curve}, 0.9, [], top)
    assert origins[-1] == ["for comparison: the base model: the adapter does not raise the ground-truth probability, "
                           "so the curve has no knee"]
    assert not any("knee of the curve" in text for texts in origins.values() for text in texts)
    why = preselect(curve)
    assert why[-1][0] == ("the base model: the adapter does not raise the ground-truth probability, so the curve "
                          "has no knee")  # once, not once per knee fraction
    assert not any(reason.startswith("knee") for reasons in why.values() for reason in reasons)
    result = search(curve, SearchSettings(criterion="knee"), len(curve["boundary"]) - 1,
                    {layer: 10 for layer in curve["boundary"][1:]})
    assert result.boundary == -1
    assert result.reason.startswith("the base model: the adapter does not raise the ground-truth "
                                    "probability, so the curve has no knee (mean ground-truth probability "
                                    f"{curve['mean_prob'][0]:.4f} without LoRA, {curve['mean_prob'][-1]:.4f} with")


def test_a_rising_curve_keeps_its_knee_labels():
    from lorabound.evaluation import run_origins

    origins = run_origins({"boundary": 5, "criterion": "auto", "candidates": []}, {"truncation": CURVE}, 0.9, [], 5)
    assert origins[3] == ["for comparison: knee of the curve (90% of the gain)"]
    assert search(CURVE, SearchSettings(criterion="knee"), 6, PER_LAYER).reason.startswith(
        "smallest b whose ground-truth probability gain over the base reaches 90%")


@pytest.mark.parametrize("joint,expected", [
    # full (1, 1) below base (-1, -1): no knee anywhere
    ({"attention_boundary": [-1, 0, 1], "mlp_boundary": [-1, 0, 1],
      "mean_prob": [[0.30, 0.28, 0.27], [0.29, 0.26, 0.25], [0.28, 0.25, 0.20]]},
     {(-1, -1): ["the base model: the adapter does not raise the ground-truth probability, so the curve has no knee",
                 "max-likelihood", "one boundary for both: the base model: the adapter does not raise the "
                 "ground-truth probability, so the curve has no knee"],
      (-1, 1): ["no attention LoRA: it does not raise the ground-truth probability (MLP LoRA on every layer)"],
      (1, -1): ["no MLP LoRA: it does not raise the ground-truth probability (attention LoRA on every layer)"]}),
    # a gain overall, but attention LoRA lowers the probability with MLP LoRA on: only that axis has no knee
    ({"attention_boundary": [-1, 0, 1], "mlp_boundary": [-1, 0, 1],
      "mean_prob": [[0.10, 0.15, 0.30], [0.12, 0.16, 0.26], [0.14, 0.18, 0.25]]},
     {(-1, 1): ["no attention LoRA: it does not raise the ground-truth probability (MLP LoRA on every layer)"]}),
])
def test_per_module_candidates_name_a_missing_gain_for_what_it_is(joint, expected):
    from lorabound.decision.modules import preselect_pairs

    params = {(0, "attention"): 10, (1, "attention"): 10, (0, "mlp"): 20, (1, "mlp"): 20}
    found = preselect_pairs(joint, params, num_layers=2)
    for pair, reasons in expected.items():
        assert [r for r in found[pair] if r in reasons] == reasons, (pair, found)
    assert not any("knee" in r and "no knee" not in r for pair in expected for r in found[pair])
