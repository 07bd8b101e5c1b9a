"""`lorabound speed`: the variants it measures really differ as intended, its files and report section, and its
refusals. Tiny random models (tiny.py); no timing is asserted, only structure and equalities."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorabound import pipeline
from lorabound.errors import LoraboundError
from lorabound.runtime.files import folder_hashes
from lorabound.timing import (Job, SpeedSettings, build_model, greedy_steps, lora_module_count, prompt_batch,
                             variant_jobs)
from lorabound.lora.export import prune_adapter

from clitools import ok, refused_alone
from tiny import tiny_lora, save_tiny_base

FAST = dict(batch_sizes=[1, 2], new_tokens=2, repeats=2, isolate=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    save_tiny_base(root)
    tiny_lora().save_pretrained(root / "adapter")
    rows = [{"input": f"name: Place {i}, area: riverside", "target": f"Place {i} is by the river."} for i in range(12)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def data_options(world, **kw):
    return pipeline.DataOptions(data=str(world / "data.jsonl"), validation_size=2, test_size=3, **kw)


def model_options(world):
    return pipeline.ModelOptions(model=str(world / "base"))


def jobs_for(world, tmp_path, boundary=1):
    pruned = prune_adapter(world / "adapter", boundary, tmp_path / "pruned", num_layers=4)
    base = Job(name="", model=str(world / "base"), adapter=None, merged=False, dtype="float32", device="cpu",
               threads=1, prompts=("Describe: name: Place 1\nText:", "Describe: x\nText:"))
    return variant_jobs(base, str(world / "adapter"), str(pruned.out_dir), boundary)


def lora_layers(model) -> set[int]:
    """The transformer layers that hold a LoRA module."""
    from peft.tuners.lora import LoraLayer

    return {int(name.split("layers.")[1].split(".")[0]) for name, m in model.named_modules()
            if isinstance(m, LoraLayer)}


def test_variants_differ_as_intended(world, tmp_path):
    """Pruned: LoRA modules on layers 0..b only (a real PEFT export); merged: no LoRA module and the unmerged
    model's logits; the pruned model's logits differ from the full adapter's and from the base model's."""
    base, full, pruned, full_merged, pruned_merged = jobs_for(world, tmp_path, boundary=1)
    models = {job.name: build_model(job) for job in (base, full, pruned, full_merged, pruned_merged)}
    model, tokenizer = models[full.name]
    ids, mask = prompt_batch(full, tokenizer, model, 2)
    assert mask[1].tolist()[0] == 0  # the shorter prompt is left-padded

    assert lora_layers(models[full.name][0]) == {0, 1, 2, 3}
    assert lora_layers(models[pruned.name][0]) == {0, 1}
    assert lora_module_count(models[pruned.name][0]) * 2 == lora_module_count(models[full.name][0])
    for name in (base.name, full_merged.name, pruned_merged.name):
        assert lora_module_count(models[name][0]) == 0, name

    with torch.inference_mode():
        logits = {name: m(input_ids=ids, attention_mask=mask).logits[mask.bool()] for name, (m, _) in models.items()}
    torch.testing.assert_close(logits[full_merged.name], logits[full.name], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[pruned_merged.name], logits[pruned.name], atol=1e-4, rtol=1e-4)
    assert (logits[pruned.name] - logits[full.name]).abs().max() > 1e-2
    assert (logits[pruned.name] - logits[base.name]).abs().max() > 1e-2


def test_jobs_state_their_variant_as_variant_does(world, tmp_path):
    """A job's adapter None is the base model, as Variant's selection None is; a folder is a Variant(adapter=...);
    a selection of a loaded adapter is no folder to measure and is refused."""
    from lorabound.lora.selection import Selection
    from lorabound.lora.variants import Variant

    base, full, pruned, full_merged, _ = jobs_for(world, tmp_path)
    assert base.adapter is None and base.variant().is_base and base.variant() == Variant("base model", None)
    assert full.variant() == Variant("full adapter", adapter=world / "adapter") and not full.variant().is_base
    assert full_merged.merged and full_merged.adapter == full.adapter and pruned.adapter != full.adapter
    assert Job.for_variant(base, full.variant()) == full
    with pytest.raises(LoraboundError, match="selection of a loaded adapter"):
        Job.for_variant(base, Variant("b=1", Selection.prefix(1)))


def test_timed_loop_decodes_exactly_the_asked_steps_as_generate_does(world, tmp_path):
    """The timed work is greedy decoding with no early stop: the same tokens as transformers' generate forced to
    the same length, one prefill token plus `new_tokens` decoding steps for every row."""
    job = jobs_for(world, tmp_path)[1]
    model, tokenizer = build_model(job)
    ids, mask = prompt_batch(job, tokenizer, model, 2)
    tokens, prefill, decode = greedy_steps(model, ids, mask, 5)
    assert prefill > 0 and decode > 0
    with torch.inference_mode():
        expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                                  min_new_tokens=6, pad_token_id=0)[:, ids.shape[1]:]
    assert tokens == expected.tolist()


def test_synthetic_prompts_are_the_same_in_every_variant(world, tmp_path):
    job = Job(name="", model=str(world / "base"), adapter=None, merged=False, dtype="float32", device="cpu",
              threads=1, prompts=(), prompt_tokens=7, seed=3)
    model, tokenizer = build_model(job)
    ids, mask = prompt_batch(job, tokenizer, model, 3)
    again, _ = prompt_batch(job, tokenizer, model, 3)
    assert ids.shape == (3, 7) and bool(mask.all()) and torch.equal(ids, again)


def test_speed_writes_every_variant_batch_and_ratio(world, tmp_path):
    before = folder_hashes(world)
    result = pipeline.speed(adapter=world / "adapter", boundary=1, out=tmp_path / "out",
                            settings=SpeedSettings(**FAST), data_options=data_options(world),
                            model_options=model_options(world), progress=False)
    assert folder_hashes(world) == before  # inputs only read
    written = json.loads((tmp_path / "out" / "speed.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["measured"] is True and written["device"] == "cpu" and written["torch_version"] == torch.__version__
    names = [v["name"] for v in written["variants"]]
    assert names == ["base model", "full adapter", "pruned (b=1)", "full adapter, merged", "pruned (b=1), merged"]
    assert [v["lora_modules"] for v in written["variants"]] == [0, 28, 14, 0, 0]
    assert written["layers_kept"] == [0, 1] and written["prompts"]["source"] == "test"
    assert written["prompts"] == {"source": "test", "task": "data.jsonl", "count": 2, "distinct": 2}
    for variant in written["variants"]:
        assert set(variant["batches"]) == {"1", "2"}
        for batch, row in variant["batches"].items():
            assert len(row["prefill_seconds"]) == len(row["decode_seconds"]) == 2  # repeats, warm-up excluded
            assert row["decode_steps"] == 2 and row["prompt_tokens"] <= int(batch) * row["padded_length"]
            s = row["decode_ms_per_step"]
            assert s["min"] <= s["median"] <= s["max"]
    pairs = {(r["variant"], r["against"], r["batch"]) for r in written["ratios"]}
    assert ("pruned (b=1)", "full adapter", 1) in pairs
    assert ("pruned (b=1), merged", "full adapter, merged", 2) in pairs
    assert len(pairs) == 3 * 2  # base, pruned, pruned merged; each batch
    markdown = (tmp_path / "out" / "speed.md").read_text()
    assert "measured" in markdown.lower() and "| pruned (b=1), merged |" in markdown
    assert not (tmp_path / "out" / "speed-scratch").exists()


def test_cli_speed_runs_each_variant_in_its_own_process(world, tmp_path, capsys):
    """The CLI path with the default isolation: every variant's peak memory is its own process's RSS."""
    out = ok(capsys, "--threads", 1, "speed", "--model", world / "base", "--adapter", world / "adapter", "--data",
             world / "data.jsonl", "--validation-size", 2, "--test-size", 3, "--boundary", 2, "--batch-sizes", "1,2",
             "--new-tokens", 2, "--repeats", 1, "--out", tmp_path / "out")
    assert "| pruned (b=2)" in out and "Peak memory (MiB)" in out
    written = json.loads((tmp_path / "out" / "speed.json").read_text())
    assert written["isolated"] is True and written["threads"] == 1
    for variant in written["variants"]:
        memory = variant["memory_mib"]
        assert memory["peak"] >= memory["after_load"] >= memory["before_load"] > 0
    assert [v["lora_modules"] for v in written["variants"]] == [0, 28, 21, 0, 0]


def fake_run_folder(world, folder: Path, boundary: int) -> Path:
    """What `lorabound run` leaves that `speed --run` reads: run.json (the settings) and report.json."""
    from dataclasses import asdict

    from lorabound.runtime.files import write_marker
    from lorabound.report.document import write_report

    folder.mkdir()
    write_marker(folder, finished=True)
    asked = {"model": str(world / "base"), "adapter": str(world / "adapter"),
             "data": asdict(data_options(world)), "dtype": "float32"}
    (folder / "run.json").write_text(json.dumps(asked))
    write_report(folder, {"meta": {"model": "base"}, "search": {"boundary": boundary, "criterion": "auto"}})
    return folder


def test_speed_from_a_run_folder_goes_into_its_report(world, tmp_path):
    run = fake_run_folder(world, tmp_path / "run", boundary=2)
    assert "Inference speed" not in (run / "report.md").read_text()
    result = pipeline.speed(run=run, settings=SpeedSettings(**FAST), progress=False)
    assert result["boundary"] == 2 and "chosen by the run's search" in result["boundary_origin"]
    assert (run / "speed.json").is_file()
    markdown, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    assert "## Inference speed (measured)" in markdown and "| pruned (b=2), merged |" in markdown
    assert 'id="speed"' in page and "pruned (b=2), merged" in page
    assert "speed" not in json.loads((run / "report.json").read_text())  # speed.json stays the one source

    # --boundary overrides the run's b; a rerendered report (a resumed run) keeps showing speed.json
    again = pipeline.speed(run=run, boundary=1, settings=SpeedSettings(**FAST), progress=False)
    assert again["boundary_origin"] == "asked with --boundary"
    from lorabound.report.document import write_report
    write_report(run, json.loads((run / "report.json").read_text()))
    assert "| pruned (b=1) " in (run / "report.md").read_text()


@pytest.mark.parametrize("change,message", [
    (dict(boundary=4), "outside -1..3"),
    (dict(boundary=3), "keeps every LoRA layer"),
    (dict(boundary=-1), "keeps no LoRA layer"),
    (dict(boundary=None), "no boundary"),
    (dict(adapter=None), "no adapter"),
    (dict(out=None), "no output folder"),
    (dict(adapter="{world}/missing"), "missing"),
    (dict(adapter="{world}/base"), "adapter"),
    (dict(run="{world}"), "has no run.json"),
])
def test_bad_requests_are_refused_before_any_work(world, tmp_path, change, message):
    args = dict(adapter=world / "adapter", boundary=1, out=tmp_path / "out")
    args.update({k: v.format(world=world) if isinstance(v, str) else v for k, v in change.items()})
    with pytest.raises(LoraboundError, match=message):
        pipeline.speed(**args, settings=SpeedSettings(**FAST), data_options=data_options(world),
                       model_options=model_options(world), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,message", [
    (dict(batch_sizes=[1, 0]), "--batch-sizes 0 is out of range"),
    (dict(batch_sizes=[]), "--batch-sizes is empty"),
    (dict(new_tokens=0), "--new-tokens"),
    (dict(repeats=-1), "--repeats"),
    (dict(prompt_tokens=0), "--prompt-tokens"),
    (dict(prompts="file"), "--prompts"),
    (dict(device="tpu"), "--device"),
])
def test_bad_settings_are_refused(change, message):
    with pytest.raises(LoraboundError, match=message):
        SpeedSettings(**{**FAST, **change})


def test_cuda_without_a_gpu_is_refused_in_one_line(world, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    line = refused_alone(capsys, "speed", "--model", world / "base", "--adapter", world / "adapter",
                         "--boundary", 1, "--device", "cuda", "--out", tmp_path / "out")
    assert "torch sees no CUDA GPU" in line
    assert not (tmp_path / "out").exists()


def test_run_with_model_or_data_flags_is_refused(world, tmp_path):
    run = fake_run_folder(world, tmp_path / "run", boundary=1)
    with pytest.raises(LoraboundError, match="drop --model"):
        pipeline.speed(model=str(world / "base"), run=run, settings=SpeedSettings(**FAST), progress=False)
    with pytest.raises(LoraboundError, match="data options"):
        pipeline.speed(run=run, data_options=pipeline.DataOptions(test_size=5), settings=SpeedSettings(**FAST),
                       progress=False)
    assert not (run / "speed.json").exists()


@pytest.mark.real
def test_speed_on_the_embedded_model(real_model, tmp_path):
    """The embedded SmolLM2-135M with a random r=4 LoRA, tiny sizes: each variant in its own process."""
    from peft import LoraConfig, get_peft_model

    from lorabound.model import load_model
    from tiny import randomize_lora

    model, _ = load_model("smollm2-135m")
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(adapted, scale=0.01)
    adapted.save_pretrained(tmp_path / "adapter")
    result = pipeline.speed(adapter=tmp_path / "adapter", boundary=14, out=tmp_path / "out",
                            settings=SpeedSettings(batch_sizes=[1, 2], new_tokens=3, repeats=1, prompts="synthetic",
                                                   prompt_tokens=16), progress=False)
    counts = {v["name"]: v["lora_modules"] for v in result["variants"]}
    assert counts == {"base model": 0, "full adapter": 60, "pruned (b=14)": 30, "full adapter, merged": 0,
                      "pruned (b=14), merged": 0}
    assert result["num_layers"] == 30 and result["layers_kept"] == list(range(15))
    full = next(v for v in result["variants"] if v["name"] == "full adapter")
    assert full["memory_mib"]["after_load"] - full["memory_mib"]["before_load"] > 300  # 135M float32 weights


def test_run_with_speed_adds_the_speed_section(world, tmp_path, capsys, monkeypatch):
    """`run --speed` measures at the chosen b after the report, and the report shows it (small settings here)."""
    measure = pipeline.speed

    def small(**kwargs):
        return measure(**{**kwargs, "settings": SpeedSettings(**{**FAST, "device": kwargs["settings"].device})})

    monkeypatch.setattr(pipeline, "speed", small)
    out = ok(capsys, "--threads", 1, "run", "--model", world / "base", "--data", world / "data.jsonl",
             "--validation-size", 2, "--test-size", 3, "--adapter", world / "adapter", "--boundary", 1,
             "--max-new-tokens", 2, "--bootstrap", 20, "--speed", "--out", tmp_path / "run")
    assert "| pruned (b=1), merged |" in out
    assert json.loads((tmp_path / "run" / "speed.json").read_text())["boundary"] == 1
    assert "## Inference speed (measured)" in (tmp_path / "run" / "report.md").read_text()
