"""The commands end to end: tiny random models through the CLI, and the demo path on the real model."""

import json
import shutil

import pytest
import torch
from peft import PeftModel

from lorabound.generation import engines, cache as generation_cache
from lorabound import pipeline
from lorabound.cli import main
from lorabound.data import Example, load_task
from lorabound.runtime.files import folder_hashes
from lorabound.runtime.files import write_marker
from lorabound.model import load_model
from lorabound.pipeline import DataOptions, GenerationOptions
from lorabound.lora.masking import keep_up_to

from tiny import save_tiny_base


def tiny_task_folder(root):
    """A tiny model folder and a JSONL task with two references per example; returns the CLI's common flags."""
    save_tiny_base(root)
    rows = [{"input": f"name: Place {i}, area: riverside",
             "target": [f"Place {i} is by the riverside.", f"By the river is Place {i}."]} for i in range(30)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--model", str(root / "base"), "--data", str(root / "data.jsonl"), "--validation-size", "6",
            "--test-size", "8", "--max-length", "64"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """tiny_task_folder and an adapter trained on it by the CLI."""
    root = tmp_path_factory.mktemp("tiny")
    common = tiny_task_folder(root)
    assert main(["--quiet", "train", *common, "--out", str(root / "adapter"), "--rank", "4", "--epochs", "3",
                 "--batch-size", "4", "--lr", "5e-3"]) == 0
    return root, common


def test_cli_run_end_to_end(workspace, capsys):
    root, common = workspace
    before = folder_hashes(root / "adapter")
    out = root / "run"
    assert main(["--quiet", "run", *common, "--adapter", str(root / "adapter"), "--out", str(out),
                 "--max-new-tokens", "8", "--bootstrap", "200", "--boundaries", "1"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names[:2] == ["base model", "full adapter"] and "pruned (b=1)" in names
    for name in names:
        assert name in printed
    curves = json.loads((out / "curves.json").read_text())
    assert curves["truncation"]["boundary"] == [-1, 0, 1, 2, 3]
    assert report["search"]["boundary"] in curves["truncation"]["boundary"]
    # Every hypothesis is saved, one line per test example.
    for variant in report["variants"]:
        lines = (out / variant["hypotheses_file"]).read_text().splitlines()
        assert len(lines) == 8
    assert {s["metric"] for s in report["significance"]} == {"bleu", "rougeL"}
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert folder_hashes(root / "adapter") == before


def test_run_resumes_from_finished_stages(workspace, monkeypatch):
    root, common = workspace
    data = DataOptions(data=str(root / "data.jsonl"), validation_size=6, test_size=8, max_length=64)
    kwargs = dict(data_options=data, generation=GenerationOptions(max_new_tokens=8), bootstrap=200, progress=False)
    first = pipeline.run(str(root / "base"), root / "adapter", out=root / "resume", **kwargs)

    def must_not_run(*a, **k):
        raise AssertionError("a finished stage ran again")
    monkeypatch.setattr(pipeline, "analyze_curves", must_not_run)
    monkeypatch.setattr(engines, "generate", must_not_run)
    monkeypatch.setattr(engines, "generate_variants", must_not_run)
    again = pipeline.run(str(root / "base"), root / "adapter", out=root / "resume", **kwargs)
    for key in ("curves", "search", "variants", "significance", "verdict"):
        assert again[key] == first[key], key


def test_cli_prune_and_evaluate_exported_adapter(workspace, capsys):
    root, common = workspace
    assert main(["prune", "--adapter", str(root / "adapter"), "--boundary", "1", "--out", str(root / "b1")]) == 0
    assert "LoRA parameters" in capsys.readouterr().out
    base, _ = load_model(str(root / "base"))
    exported = PeftModel.from_pretrained(base, str(root / "b1"))
    original = PeftModel.from_pretrained(load_model(str(root / "base"))[0], str(root / "adapter"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad(), keep_up_to(original, 1):
        assert torch.allclose(exported(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-6)
    out = root / "eval"
    assert main(["--quiet", "evaluate", *common, "--adapter", str(root / "adapter"), "--boundaries", "1",
                 "--adapters", str(root / "b1"), "--out", str(out), "--max-new-tokens", "8",
                 "--bootstrap", "100"]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    rows = {v["name"]: v for v in result["variants"]}
    # The exported adapter generates exactly what the in-memory drop at the same b generates.
    assert rows[str(root / "b1")]["metrics"] == rows["pruned (b=1)"]["metrics"]
    for row in rows.values():
        assert len((out / row["hypotheses_file"]).read_text().splitlines()) == 8


def test_cli_search_and_analyze(workspace, capsys):
    root, common = workspace
    assert main(["--quiet", "analyze", *common, "--adapter", str(root / "adapter"), "--out", str(root / "an")]) == 0
    assert (root / "an" / "curves.json").is_file() and (root / "an" / "truncation_curve.png").is_file()
    capsys.readouterr()
    assert main(["--quiet", "search", *common, "--adapter", str(root / "adapter"), "--criterion", "knee"]) == 0
    assert "boundary b =" in capsys.readouterr().out
    assert main(["--quiet", "search", *common, "--adapter", str(root / "adapter"), "--boundary", "9"]) == 2
    assert "outside -1..3" in capsys.readouterr().err


def test_every_command_help_shows_an_example(capsys):
    for command in ("train", "analyze", "search", "prune", "evaluate", "run", "demo"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        assert f"lorabound {command}" in capsys.readouterr().out.split("example:")[1]


@pytest.mark.real
def test_demo_path_on_real_model(tmp_path, capsys):
    """The main job on SmolLM2-135M and real E2E data, at small sizes."""
    report = pipeline.demo(tmp_path / "demo", train_size=6, validation_size=4, test_size=6, epochs=1,
                           max_new_tokens=12)
    printed = capsys.readouterr().out
    assert "full adapter" in printed and "base model" in printed and report["verdict"] in printed
    assert report["curves"]["meta"]["num_layers"] == 30
    assert len(report["curves"]["truncation"]["boundary"]) == 31
    assert (tmp_path / "demo" / "run" / "report.html").is_file()
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()


def test_run_refuses_test_examples_the_adapter_was_trained_on(workspace, capsys):
    """The adapter was trained with validation 6 / test 8; other sizes move trained inputs into the test split."""
    root, common = workspace
    trained = json.loads((root / "adapter" / "lorabound_train.json").read_text())["train_input_hashes"]
    assert len(trained) == 30 - 6 - 8
    moved = [a if a not in ("6", "8") else {"6": "2", "8": "20"}[a] for a in common]
    assert main(["--quiet", "evaluate", *moved, "--adapter", str(root / "adapter"), "--out", str(root / "leak")]) == 2
    assert "were in the adapter's training data" in capsys.readouterr().err
    assert not (root / "leak").exists()


def test_quiet_is_accepted_before_and_after_the_command():
    from lorabound.cli import build_parser

    parser = build_parser()
    rest = ["--adapter", "a", "--boundary", "1", "--out", "o"]
    assert parser.parse_args(["--quiet", "prune", *rest]).quiet
    assert parser.parse_args(["prune", *rest, "--quiet"]).quiet
    assert not parser.parse_args(["prune", *rest]).quiet


def test_overwrite_starts_from_an_empty_folder(workspace):
    """--overwrite must not let caches of an earlier call (other adapter, other data) leak into the new one."""
    root, common = workspace
    out = root / "again"
    out.mkdir()
    write_marker(out, finished=True)  # a folder an earlier lorabound command wrote: --overwrite may replace it
    (out / "curves.json").write_text('{"truncation": {"boundary": [-1], "mean_prob": [0.5]}}')
    assert main(["--quiet", "search", *common, "--adapter", str(root / "adapter"), "--criterion", "knee",
                 "--out", str(out), "--overwrite"]) == 0
    curves = json.loads((out / "curves.json").read_text())
    assert curves["truncation"]["boundary"] == [-1, 0, 1, 2, 3]


def test_run_does_not_resume_over_changed_data(workspace, tmp_path, capsys):
    root, common = workspace
    data = tmp_path / "data.jsonl"
    data.write_text((root / "data.jsonl").read_text())
    args = [a if a != str(root / "data.jsonl") else str(data) for a in common]
    run_args = ["--quiet", "run", *args, "--adapter", str(root / "adapter"), "--out", str(tmp_path / "run"),
                "--boundary", "1", "--max-new-tokens", "4", "--bootstrap", "50"]
    assert main(run_args) == 0
    with data.open("a") as f:
        f.write(json.dumps({"input": "name: New Place", "target": "New Place is new."}) + "\n")
    capsys.readouterr()
    assert main(run_args) == 2
    assert "holds a run with other settings" in capsys.readouterr().err


def test_run_records_each_stage_time(workspace):
    root, common = workspace
    data = DataOptions(data=str(root / "data.jsonl"), validation_size=6, test_size=8, max_length=64)
    report = pipeline.run(str(root / "base"), root / "adapter", out=root / "timed", data_options=data,
                          generation=GenerationOptions(max_new_tokens=4), bootstrap=50, progress=False,
                          earlier_stages={"train": 1.5})
    saved = json.loads((root / "timed" / "report.json").read_text())
    assert list(saved["stage_seconds"]) == ["train", "analysis", "search", "prune", "evaluate", "report"]
    assert saved["stage_seconds"]["train"] == 1.5 and all(v >= 0 for v in saved["stage_seconds"].values())
    assert report["stage_seconds"] == saved["stage_seconds"]
    assert saved["meta"]["torch_threads"] == torch.get_num_threads()


# ---------------------------------------------------------------------------
# Cached generations belong to one variant: keyed by content, never by name
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def light(tmp_path_factory):
    """tiny_task_folder without training an adapter."""
    root = tmp_path_factory.mktemp("light")
    return root, tiny_task_folder(root)


def hypotheses(folder, row) -> list[str]:
    return [json.loads(line)["output"] for line in (folder / row["hypotheses_file"]).read_text().splitlines()]


def fresh_outputs(root, adapter, prompts) -> list[str]:
    from lorabound.generation.decode import generate
    from lorabound.model import load_adapter

    model, tokenizer = load_model(str(root / "base"))
    return generate(load_adapter(model, adapter), tokenizer, prompts, max_new_tokens=8, progress=False).texts


def test_adapters_whose_names_collide_get_their_own_outputs(light, tmp_path, monkeypatch):
    """x_y and x-y (one slug), and a folder named like the in-memory variant pruned (b=1), each get their own."""
    from tiny import tiny_lora

    root, common = light
    monkeypatch.chdir(tmp_path)
    tiny_lora(seed=3).save_pretrained(tmp_path / "main")
    tiny_lora(seed=4).save_pretrained(tmp_path / "x_y")
    tiny_lora(seed=5).save_pretrained(tmp_path / "x-y")
    shutil.copytree(tmp_path / "main", tmp_path / "pruned_b_1")  # the full adapter, under a misleading name
    assert main(["--quiet", "evaluate", *common, "--adapter", "main", "--boundaries", "1", "--adapters", "x_y", "x-y",
                 "pruned_b_1", "--out", "ev", "--max-new-tokens", "8", "--bootstrap", "20"]) == 0
    result = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    rows = {v["name"]: v for v in result["variants"]}
    assert len({r["hypotheses_file"] for r in rows.values()}) == len(rows) == 6
    out = tmp_path / "ev"
    assert hypotheses(out, rows["pruned_b_1"]) == hypotheses(out, rows["full adapter"])
    assert hypotheses(out, rows["pruned (b=1)"]) != hypotheses(out, rows["full adapter"])  # so the above can fail
    prompts = [json.loads(line)["input"] for line in (out / rows["x-y"]["hypotheses_file"]).read_text().splitlines()]
    task = load_task(str(root / "data.jsonl"))
    task_prompts = [task.prompt(Example(input=p, references=())) for p in prompts]
    assert hypotheses(out, rows["x-y"]) == fresh_outputs(root, tmp_path / "x-y", task_prompts)
    assert hypotheses(out, rows["x_y"]) == fresh_outputs(root, tmp_path / "x_y", task_prompts)
    assert hypotheses(out, rows["x_y"]) != hypotheses(out, rows["x-y"])


def test_changed_adapter_files_are_regenerated_not_reused(light, tmp_path, monkeypatch):
    from lorabound.generation.engines import HFEngine, Variant
    from lorabound.model import load_adapter
    from lorabound.lora.masking import adapter_pairs
    from tiny import tiny_lora, tiny_task

    root, _ = light
    task = tiny_task()
    calls = []
    real_generate = engines.generate
    monkeypatch.setattr(engines, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    folder = tmp_path / "adapter"

    def generate_with(seed: int):
        tiny_lora(seed=seed).save_pretrained(folder)  # the same folder name, new content
        model, tokenizer = load_model(str(root / "base"))
        model = load_adapter(model, folder)
        engine = HFEngine(model, tokenizer, max_new_tokens=8, batch_size=16, stop_at_newline=True)
        return generation_cache.generate_cached(engine, task, task.examples[:4], [Variant("my adapter")], "test",
                                         tmp_path / "out", GenerationOptions(max_new_tokens=8), {"model": "tiny"},
                                         folder, adapter_pairs(model), False)["my adapter"]

    first = generate_with(1)
    assert generate_with(1).texts == first.texts and len(calls) == 1  # unchanged: reused
    changed = generate_with(2)
    assert len(calls) == 2 and changed.file != first.file
    assert changed.texts == fresh_outputs(root, folder, [task.prompt(e) for e in task.examples[:4]])
    assert changed.texts != first.texts


def test_variant_keys_hold_content_not_names():
    from lorabound.lora.selection import Selection
    from lorabound.lora.variants import Variant

    pairs = [(layer, group) for layer in (0, 1, 2) for group in ("attention", "mlp")]
    prefix = Variant.at_boundary("a", 1)
    assert prefix.key("hash1", pairs) == Variant.at_boundary("b", 1).key("hash1", pairs)  # names do not count
    assert prefix.key("hash1", pairs) != prefix.key("hash2", pairs)  # the adapter's content does
    assert prefix.key("hash1", pairs) != Variant.at_boundary("a", 0).key("hash1", pairs)
    assert Variant("a").key("hash1", pairs) != Variant.at_boundary("a", -1).key("hash1", pairs)  # full is not base
    assert Variant.at_boundary("a", -1).key("hash1", pairs) == Variant.at_boundary("b", -1).key("hash2", pairs)
    # Selections that keep the same modules of this adapter are one variant; any other selection is not.
    same = [Selection.per_group({"attention": 1, "mlp": 1}), Selection.layers([0, 1])]
    assert {Variant("x", s).key("hash1", pairs) for s in same} == {prefix.key("hash1", pairs)}
    assert Variant.at_boundary("x", 2).key("hash1", pairs) == Variant("x").key("hash1", pairs)
    assert Variant.at_boundary("x", 9).key("hash1", pairs) == Variant("x").key("hash1", pairs)
    others = [Selection.per_group({"attention": 1, "mlp": 0}), Selection.per_group({"attention": 0, "mlp": 1}),
              Selection.layers([0, 2]), Selection.layers([1]), Selection.per_group({"attention": 2})]
    keys = [Variant("x", s).key("hash1", pairs) for s in others]
    assert len(set(keys)) == len(others) and prefix.key("hash1", pairs) not in keys
    # On an adapter with LoRA on layers 0 and 2 only, b = 1 keeps what b = 0 keeps.
    sparse = [(0, "attention"), (2, "attention")]
    assert Variant.at_boundary("x", 1).key("h", sparse) == Variant.at_boundary("y", 0).key("h", sparse)


# ---------------------------------------------------------------------------
# Sizes: measured on disk, in the adapter's stored dtype
# ---------------------------------------------------------------------------

def test_pruned_rows_show_the_export_size_in_the_stored_dtype(light, tmp_path):
    """An adapter stored in bf16 and loaded in float32: the in-memory pruned row is the bf16 export's size."""
    from safetensors.torch import load_file, save_file

    from lorabound.lora.export import prune_adapter
    from tiny import tiny_lora

    root, _ = light
    adapter = tmp_path / "bf16"
    tiny_lora(seed=3).save_pretrained(adapter)
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}, str(weights),
              metadata={"format": "pt"})
    data = DataOptions(data=str(root / "data.jsonl"), validation_size=6, test_size=8, max_length=64)
    result = pipeline.evaluate(str(root / "base"), adapter, boundaries=[1], out=tmp_path / "ev", data_options=data,
                               generation=GenerationOptions(max_new_tokens=4), bootstrap=20, progress=False)
    prune_adapter(adapter, 1, tmp_path / "b1", num_layers=4)
    rows = {v["name"]: v for v in result["variants"]}
    exported = (tmp_path / "b1" / "adapter_model.safetensors").stat().st_size / 1e6
    assert (rows["pruned (b=1)"]["adapter_mb"], rows["pruned (b=1)"]["adapter_mb_source"]) == (exported, "export")
    assert (rows["full adapter"]["adapter_mb"], rows["full adapter"]["adapter_mb_source"]) == \
        (weights.stat().st_size / 1e6, "file")
    assert rows["base model"]["adapter_mb"] is None


# ---------------------------------------------------------------------------
# Every row says where its b came from; the verdict names rows shown only for comparison
# ---------------------------------------------------------------------------

def test_verdict_names_rows_shown_only_for_comparison():
    from lorabound.pipeline import verdict

    evaluation = {"significance": [], "variants": [
        {"name": "base model", "origin": "reference: no adapter"},
        {"name": "full adapter", "origin": "chosen by the search (auto)"},
        {"name": "pruned (b=2)", "origin": "for comparison: knee of the curve (90% of the gain)"}]}
    text = verdict({"boundary": 3, "kept_fraction": 1.0, "reason": "best by validation rougeL"}, evaluation, 3)
    assert text.startswith("LoRA was kept on every layer, so nothing was dropped (b = 3: best by validation rougeL)")
    assert "Not chosen, shown for comparison only: pruned (b=2): knee of the curve (90% of the gain)." in text


def test_run_rows_say_where_each_b_comes_from(light, tmp_path):
    from tiny import tiny_lora

    root, _ = light
    tiny_lora(seed=3).save_pretrained(tmp_path / "adapter")
    data = DataOptions(data=str(root / "data.jsonl"), validation_size=6, test_size=8, max_length=64)
    report = pipeline.run(str(root / "base"), tmp_path / "adapter", out=tmp_path / "run", boundary=1, boundaries=[2],
                          data_options=data, generation=GenerationOptions(max_new_tokens=4), bootstrap=20,
                          progress=False)
    origins = {v["name"]: v["origin"] for v in report["variants"]}
    truncation = report["curves"]["truncation"]
    knee_b = pipeline.knee(truncation)
    knee_row = generation_cache.variant_name(knee_b, 3)
    # this random adapter may lower the probability: then b = -1 is the base model, never called a knee
    gains = truncation["mean_prob"][-1] > truncation["mean_prob"][0]
    assert ("knee of the curve (90% of the gain)" if gains else "for comparison: the base model: the adapter does not "
            "raise the ground-truth probability, so the curve has no knee") in origins[knee_row]
    assert gains or knee_b == -1
    assert origins["pruned (b=1)"].startswith("given with --boundary")
    assert "asked with --boundaries" in origins["pruned (b=2)"]
    assert knee_row == "base model" or origins["base model"] == "reference: no adapter"
    markdown, html = (tmp_path / "run" / "report.md").read_text(), (tmp_path / "run" / "report.html").read_text()
    for origin in origins.values():
        assert origin in markdown and html_escape(origin) in html
    assert "shown for comparison only: pruned (b=2)" in report["verdict"] or knee_b == 2


def html_escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)
