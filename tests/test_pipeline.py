"""The commands end to end: tiny random models through the CLI, and the demo path on the real model."""

import json

import pytest
import torch
from peft import PeftModel

from lorabound import engines, pipeline
from lorabound.cli import main
from lorabound.files import folder_hashes
from lorabound.files import write_marker
from lorabound.model import load_model
from lorabound.pipeline import DataOptions, GenerationOptions
from lorabound.surgery import keep_up_to

from tiny import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model folder, a JSONL task with two references per example, and an adapter trained by the CLI."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    rows = [{"input": f"name: Place {i}, area: riverside",
             "target": [f"Place {i} is by the riverside.", f"By the river is Place {i}."]} for i in range(30)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", str(root / "base"), "--data", str(root / "data.jsonl"), "--validation-size", "6",
              "--test-size", "8", "--max-length", "64"]
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
