"""per-module and greedy-drop searches: preselection, the auto rule on selections, the same-size prefix, the CLI."""

import json

import pytest

from lorabound.decision.boundary import SearchSettings, Validation
from lorabound.cli import main
from lorabound.errors import LoraboundError
from lorabound.lora.selection import Selection
from lorabound.decision.modules import canonical, preselect_pairs, same_size_prefix, search_greedy, search_per_module

# Two layers; attention LoRA holds 10 parameters a layer, MLP LoRA 20.
PARAMS = {(0, "attention"): 10, (1, "attention"): 10, (0, "mlp"): 20, (1, "mlp"): 20}
# mean_prob[i(Ba)][i(Bm)], boundaries -1, 0, 1; base 0.10, full 0.20
JOINT = {"attention_boundary": [-1, 0, 1], "mlp_boundary": [-1, 0, 1],
         "mean_prob": [[0.10, 0.12, 0.13],
                       [0.15, 0.17, 0.195],
                       [0.18, 0.199, 0.20]]}
REFERENCES = [[f"place {i} is a french restaurant by the river"] for i in range(24)]


def fake_validation(good: set[Selection]) -> Validation:
    """Selections in `good` answer every reference exactly; the others answer nonsense."""
    def many(selections):
        return {s: [r[0] if s in good else "zz qq" for r in REFERENCES] for s in selections}
    return Validation(lambda s: many([s])[s], REFERENCES, generate_many=many)


def test_preselected_pairs_are_the_cheapest_reaching_each_gain_and_the_axis_knees():
    found = preselect_pairs(JOINT, PARAMS, num_layers=2)
    # kept parameters: (0,-1) 10, (1,-1) 20, (1,0) 40, (0,1) 50, (1,1) 60
    assert list(found) == [(0, -1), (1, -1), (1, 0), (0, 1), (1, 1)]
    assert found[(0, -1)] == ["fewest parameters reaching 50% of the gain"]
    assert found[(1, -1)] == ["fewest parameters reaching 75% of the gain"]
    assert found[(1, 0)] == ["fewest parameters reaching 90% of the gain", "fewest parameters reaching 95% of the gain",
                             "MLP knee 90% (attention LoRA on every layer)"]
    assert found[(0, 1)] == ["attention knee 90% (MLP LoRA on every layer)"]
    assert found[(1, 1)] == ["max-likelihood", "one boundary for both: knee 90% of the diagonal", "full adapter"]


def test_per_module_goal_size_takes_the_smallest_pair_not_worse_and_compares_the_same_size_prefix():
    chosen = canonical(Selection.per_group({"attention": 1, "mlp": 0}), PARAMS)
    larger = canonical(Selection.per_group({"attention": 0, "mlp": 1}), PARAMS)  # 50 parameters, tested first
    result = search_per_module(JOINT, SearchSettings(criterion="per-module", goal="size", bootstrap=200), 2, PARAMS,
                               fake_validation({Selection.full(), larger, chosen}))
    assert result.selection == {"attention": [0, 1], "mlp": [0]} and result.boundary is None
    assert result.selection_text == "attention 0..1, mlp 0" and result.lora_params_kept == 40
    assert result.goal == "size" and "goal size: the smallest selection shown non-inferior" in result.reason
    rows = {(r["attention_boundary"], r["mlp_boundary"]): r for r in result.candidates}
    assert rows[(1, 0)]["vs_full"]["bleu+rougeL"]["diff"] == 0 and rows[(0, -1)]["vs_full"]["bleu+rougeL"]["diff"] < 0
    # The prefix of the same size: LoRA on layer 0 (30 parameters; layers 0..1 would be 60 > 40). It answers
    # nonsense, so the chosen pair beats it by the whole score.
    prefix = result.compared_prefix
    assert prefix["boundary"] == 0 and prefix["lora_params_kept"] == 30
    assert prefix["tests"]["bleu+rougeL"]["diff"] > 50 and prefix["tests"]["bleu+rougeL"]["p_value"] < 0.05
    assert "not evidence" in prefix["optimistic"]  # the validation data chose the selection


def test_per_module_goal_size_stops_at_the_first_larger_candidate_that_fails():
    # Fixed sequence by size: (0, 1) keeps 50 parameters and answers nonsense, so the smaller (1, 0) is not
    # tested, however good: the search keeps the full adapter and says where it stopped.
    chosen = canonical(Selection.per_group({"attention": 1, "mlp": 0}), PARAMS)
    result = search_per_module(JOINT, SearchSettings(criterion="per-module", goal="size", bootstrap=200), 2, PARAMS,
                               fake_validation({Selection.full(), chosen}))
    assert result.selection is None and result.boundary == 1
    assert "the sequence stopped at attention 0, mlp 0..1" in result.reason
    rows = {(r["attention_boundary"], r["mlp_boundary"]): r for r in result.candidates}
    assert rows[(0, 1)]["non_inferior"] is False and rows[(1, 0)]["non_inferior"] is None


def test_per_module_goal_quality_keeps_the_full_adapter_without_a_gain():
    chosen = canonical(Selection.per_group({"attention": 1, "mlp": 0}), PARAMS)
    result = search_per_module(JOINT, SearchSettings(criterion="per-module", bootstrap=200), 2, PARAMS,
                               fake_validation({Selection.full(), chosen}))
    assert result.selection is None and result.boundary == 1 and result.goal == "quality"
    assert result.compared_prefix["tests"] == "the chosen selection is this prefix"


GREEDY_PARAMS = {(layer, group): 5 for layer in range(4) for group in ("attention", "mlp")}


def greedy_path_of(*kept_and_probs):
    return {"steps": [{"kept": kept, "mean_prob": p, "params_kept": 10 * len(kept)} for kept, p in kept_and_probs]}


PATH = greedy_path_of(([0, 1, 2, 3], 0.2), ([0, 2, 3], 0.199), ([0, 2], 0.19), ([0], 0.15), ([], 0.1))


def test_greedy_tolerance_takes_the_smallest_set_along_the_path_within_it():
    good = {Selection.full(), Selection.layers([0, 2]), Selection.layers([0, 2, 3])}
    result = search_greedy(PATH, SearchSettings(criterion="greedy-drop", bootstrap=200), 4, GREEDY_PARAMS,
                           fake_validation(good))
    # Preselected along the path: the fewest layers reaching 50% of the gain ([0]), 75% and 90% ([0, 2]), 95%
    # ([0, 2, 3]) and the full adapter; [0] answers nonsense, so [0, 2] is the smallest not worse.
    assert sorted(len(r["kept_layers"]) for r in result.candidates) == [1, 2, 3, 4]
    assert result.selection == {"*": [0, 2]} and result.boundary is None and result.greedy_path is PATH
    assert result.compared_prefix["boundary"] == 1  # the prefix with the same 20 parameters: layers 0..1
    assert result.compared_prefix["tests"]["bleu+rougeL"]["diff"] > 50


def test_greedy_keep_fraction_takes_the_budgets_set():
    path = greedy_path_of(([0, 1, 2, 3], 0.2), ([0, 2, 3], 0.199), ([0, 2], 0.19))  # stopped at the budget
    result = search_greedy(path, SearchSettings(criterion="greedy-drop", keep_fraction=0.5, bootstrap=200), 4,
                           GREEDY_PARAMS, fake_validation({Selection.full()}))
    assert result.selection == {"*": [0, 2]} and result.lora_params_kept == 20
    assert "keeping at most 0.5 of the LoRA parameters (20 of 40)" in result.reason
    budget = "first set on the path keeping at most 0.5 of the LoRA parameters"
    assert [r["why"] for r in result.candidates] == [["full adapter"], [budget]]


def test_same_size_prefix_counts_parameters_not_layers():
    uneven = {(0, "mlp"): 10, (1, "mlp"): 30, (2, "mlp"): 10}
    assert same_size_prefix(Selection.layers([0, 2]), uneven) == 0  # layers 0..1 hold 40 > 20
    assert same_size_prefix(Selection.layers([1]), uneven) == 0
    assert same_size_prefix(Selection.layers([0, 1]), uneven) == 1


@pytest.mark.parametrize("settings,message", [
    (dict(criterion="auto", keep_fraction=0.5), "--keep-fraction applies to --criterion greedy-drop only, not auto"),
    (dict(criterion="greedy-drop", keep_fraction=1.5), "--keep-fraction 1.5 must be in (0, 1]"),
    (dict(criterion="greedy-drop", keep_fraction=0.5, tolerance=1.0), "two ways to stop greedy-drop"),
    (dict(criterion="greedy-drop", goal="size"), "--goal applies to --criterion auto or per-module only"),
    (dict(criterion="per-module", candidates=[1]), "--candidates lists boundaries"),
    (dict(criterion="per-module", tolerance=1.0), "--tolerance is not used by --criterion per-module --goal quality"),
])
def test_settings_refuse_what_the_new_criteria_do_not_take(settings, message):
    with pytest.raises(LoraboundError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SearchSettings(**settings)


# ---------------------------------------------------------------------------
# Through the pipeline and the CLI, on a tiny model
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tiny import tiny_lora, save_tiny_base

    root = tmp_path_factory.mktemp("selections")
    save_tiny_base(root)
    tiny_lora(seed=3).save_pretrained(root / "adapter")
    rows = [{"input": f"name: Place {i}, area: riverside",
             "target": [f"Place {i} is by the riverside.", f"By the river is Place {i}."]} for i in range(30)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", str(root / "base"), "--data", str(root / "data.jsonl"), "--validation-size", "6",
              "--test-size", "8", "--max-length", "64", "--adapter", str(root / "adapter"), "--max-new-tokens", "6",
              "--bootstrap", "100"]
    return root, common


def test_cli_search_per_module_writes_the_joint_curve_and_the_selection(workspace, capsys):
    root, common = workspace
    assert main(["--quiet", "search", *common, "--criterion", "per-module", "--goal", "size", "--tolerance", "100",
                 "--out", str(root / "pm")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("selection: ") and "prefix of the same size" in printed
    curves = json.loads((root / "pm" / "curves.json").read_text())
    assert len(curves["joint"]["mean_prob"]) == 5 and "truncation" in curves
    found = json.loads((root / "pm" / "search.json").read_text())
    assert found["criterion"] == "per-module" and found["selection_text"] in printed
    # --tolerance 100 accepts any candidate not significantly worse: the cheapest is chosen, never more
    # parameters than a cheaper candidate that also fits.
    assert found["lora_params_kept"] < found["lora_params_total"]
    assert all("attention_boundary" in row for row in found["candidates"])


def test_cli_search_greedy_drop_with_a_budget(workspace, capsys):
    root, common = workspace
    assert main(["--quiet", "search", *common, "--criterion", "greedy-drop", "--keep-fraction", "0.5",
                 "--out", str(root / "gd")]) == 0
    found = json.loads((root / "gd" / "search.json").read_text())
    kept = found["greedy_path"]["steps"][-1]["kept"]
    assert len(kept) == 2 and found["lora_params_kept"] * 2 == found["lora_params_total"]
    assert (found["selection"] or {"*": [0, 1, 2, 3]})["*"] == kept
    assert found["compared_prefix"]["boundary"] == 1


def test_selections_generate_as_a_direct_keep_selection_run_and_are_cached(workspace, tmp_path):
    """Selections that are no prefix go through the engine: outputs equal generate() under keep_selection,
    and a second request reads the file back instead of generating."""
    from lorabound.generation import cache as generation_cache
    from lorabound import pipeline
    from lorabound.generation.decode import generate
    from lorabound.lora.masking import keep_selection
    from tiny import tiny_task

    root, _ = workspace
    model_options = pipeline.ModelOptions(model=str(root / "base"))
    peft_model, tokenizer = model_options.load(root / "adapter")
    generation = pipeline.GenerationOptions(max_new_tokens=6)
    engine = generation_cache.make_engine(generation, None, peft_model, tokenizer, model_options, root / "adapter", tmp_path)
    task = tiny_task()
    examples = task.examples[:4]
    from lorabound.lora.masking import adapter_pairs

    pairs = adapter_pairs(peft_model)
    make = lambda: generation_cache.SelectionGenerator(engine, peft_model, task, examples, tmp_path, generation,  # noqa: E731
                                                {"model": "tiny"}, root / "adapter", pairs, False)
    odd = Selection.per_group({"attention": 2, "mlp": 0})
    texts = make().texts([odd, Selection.full()])
    with keep_selection(peft_model, odd):
        direct = generate(peft_model, tokenizer, [task.prompt(e) for e in examples], max_new_tokens=6,
                          progress=False).texts
    assert texts[odd] == direct
    files = sorted((tmp_path / "generations").iterdir())
    assert len(files) == 2 and any("attention-0-2-mlp-0" in f.name for f in files)
    engine.generate = engine._sharded = None  # a second request must not generate
    assert make().texts([odd])[odd] == direct


def test_run_with_a_selection_that_is_no_prefix_reports_it_on_test(workspace, monkeypatch, tmp_path, capsys):
    """A greedy set {0, 2} (the path is fixed here, its measurement is tested in test_greedy.py): run evaluates
    it on test against the full adapter and the prefix of the same size (layers 0..1), and reports both."""
    from lorabound import pipeline

    root, common = workspace
    path = greedy_path_of(([0, 1, 2, 3], 0.2), ([0, 2, 3], 0.19), ([0, 2], 0.18))
    monkeypatch.setattr(pipeline, "greedy_path", lambda *a, **k: path)
    out = tmp_path / "run"
    assert main(["--quiet", "run", *common, "--criterion", "greedy-drop", "--keep-fraction", "0.5",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["search"]["selection"] == {"*": [0, 2]} and report["search"]["boundary"] is None
    on_test = report["selection_test"]
    assert set(on_test["against"]) == {"full adapter", "prefix LoRA on layers 0..1"}
    assert on_test["against"]["full adapter"]["bleu"]["n"] == 8  # the test split
    assert report["verdict"].startswith("The search (greedy-drop) chose LoRA on layers 0,2, keeping 50% of the LoRA")
    rows = {row["boundary"]: row["origin"] for row in report["variants"]}
    assert rows[1] == "for comparison: prefix of the same size as the selection"
    exported = json.loads((out / "adapter-pruned" / "adapter_config.json").read_text())
    assert exported["layers_to_transform"] == [0, 2] and on_test["exported_to"] == str(out / "adapter-pruned")
    assert json.loads((out / "adapter-pruned" / "lorabound.json").read_text())["selection"] == {"*": [0, 2]}
    assert any(f.name.startswith("test-selection-lora-on-layers-0-2-") for f in (out / "generations").iterdir())
    assert (out / "selection_layers.png").is_file()


def test_cli_analyze_computes_the_joint_curve_on_request(workspace):
    root, common = workspace
    args = [a for a in common[:-4]]  # without --max-new-tokens and --bootstrap, which analyze does not take
    assert main(["--quiet", "analyze", *args, "--curves", "truncation", "joint", "--out", str(root / "an")]) == 0
    curves = json.loads((root / "an" / "curves.json").read_text())
    assert set(curves) == {"meta", "truncation", "joint"} and (root / "an" / "joint_curve.png").is_file()
    assert [row[i] for i, row in enumerate(curves["joint"]["nll"])] == pytest.approx(curves["truncation"]["nll"])
