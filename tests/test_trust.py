"""Trust: bad inputs, interrupted runs and untrusted files.

Every path gives either a correct result or a one-line `error: ...` naming the problem and the fix,
and never loses or corrupts anything. Most tests drive the CLI (`lorabound.cli.main`) on tiny random
models saved as model folders, with a tiny JSONL task; the kill tests run real subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import IA3Config, PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lorabound.analysis.curves as analysis
from lorabound.cli import main
from lorabound.data import load_task, split_task
from lorabound.errors import LoraboundError
from lorabound.runtime.files import folder_hashes
from lorabound.model import load_adapter, load_model
from lorabound.pipeline import DataOptions, ModelOptions
from lorabound.pipeline import analyze as pipeline_analyze
from lorabound.lora.masking import adapter_layers, keep_up_to
from lorabound.lora.export import prune_adapter

from clitools import cli, refused
from tiny import tiny_llama, tiny_lora, tiny_tokenizer

TEMPLATE = "Describe: {input}\nText:"
MAX_LENGTH = 80  # short rows fit (~60 tokens); long inputs (~150) are skipped, long targets (~105) cut
SEED = 3
N_ROWS = 40
INPUT = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 12]])


def row(i: int) -> dict:
    """Row i of the tiny task: every 7th has an input too long for MAX_LENGTH, every 5th a too long target."""
    text = f"name: Place {i}, area: riverside, food: French"
    target = f"Place {i} is a French place by the riverside."
    if i % 7 == 3:
        text += ", near: " + "the old stone bridge " * 6
    if i % 5 == 1:
        target = " ".join([f"Place {i} serves French food by the riverside."] * 4)
    return {"input": text, "target": target}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def save_model(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def llama(hidden: int = 32, layers: int = 4):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=None, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 4-layer tiny model folder, a LoRA adapter on all its layers, and a 40-row JSONL task."""
    root = tmp_path_factory.mktemp("world")
    save_model(tiny_llama(), root / "base")
    tiny_lora().save_pretrained(root / "adapter")
    write_jsonl(root / "data.jsonl", [row(i) for i in range(N_ROWS)])
    w = SimpleNamespace(root=root, base=root / "base", adapter=root / "adapter", data=root / "data.jsonl")
    w.data_args = ["--data", w.data, "--template", TEMPLATE, "--max-length", MAX_LENGTH, "--seed", SEED]
    w.small = ["--model", w.base, *w.data_args, "--validation-size", 4, "--test-size", 3]
    w.hashes = folder_hashes(w.adapter)
    return w


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def load_exported(folder) -> PeftModel:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()
    problems = [str(w.message) for w in caught if "missing" in str(w.message).lower()]
    assert not problems, problems
    return model


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(out.parent.glob(f".{out.name}.old-*"))


# ---------------------------------------------------------------------------
# 1. Adapters
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def non_lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("non-lora")
    get_peft_model(tiny_llama(), IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"],
                                           feedforward_modules=["down_proj"])).save_pretrained(root / "ia3")
    get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
                   ).save_pretrained(root / "prefix")
    return root


@pytest.mark.parametrize("kind,peft_type", [("ia3", "IA3"), ("prefix", "PREFIX_TUNING")])
def test_non_lora_adapter_is_refused_by_prune_and_analyze(capsys, tmp_path, world, non_lora, kind, peft_type):
    adapter = non_lora / kind
    before = folder_hashes(adapter)
    line = refused(capsys, "prune", "--adapter", adapter, "--boundary", 1, "--out", tmp_path / "x")
    assert f"{adapter} is a {peft_type} adapter; lorabound works on LoRA adapters only" in line
    assert "pass a LoRA" in line
    line = refused(capsys, "analyze", *world.small, "--adapter", adapter, "--out", tmp_path / "y")
    assert f"is a {peft_type} adapter" in line and "pass a LoRA" in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert folder_hashes(adapter) == before


@pytest.mark.parametrize("boundary", [0, 2])
def test_rslora_export_equals_in_memory_drop(tmp_path, boundary):
    model = tiny_lora(use_rslora=True)
    model.save_pretrained(tmp_path / "adapter")
    prune_adapter(tmp_path / "adapter", boundary, tmp_path / "peft", num_layers=4)
    prune_adapter(tmp_path / "adapter", boundary, tmp_path / "zero", format="zero-fill", num_layers=4)
    with keep_up_to(model, boundary):
        expected = logits(model)
    for folder in ("peft", "zero"):
        assert json.loads((tmp_path / folder / "adapter_config.json").read_text())["use_rslora"] is True
        assert torch.allclose(logits(load_exported(tmp_path / folder)), expected, atol=1e-6)
    # rsLoRA scales by alpha / sqrt(r), not alpha / r: an export that lost the flag would differ.
    plain = load_exported(tmp_path / "peft")
    for module in plain.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict) and "default" in module.scaling:
            module.scaling["default"] = 8 / 4
    assert not torch.allclose(logits(plain), expected, atol=1e-4)


def test_dora_zero_fill_is_refused_by_the_cli(capsys, tmp_path):
    tiny_lora(use_dora=True).save_pretrained(tmp_path / "dora")
    out = tmp_path / "zf"
    line = refused(capsys, "prune", "--adapter", tmp_path / "dora", "--boundary", 1, "--format", "zero-fill",
                   "--out", out)
    assert "zero-fill cannot drop a DoRA layer" in line and "use --format peft or --format merged" in line
    assert not out.exists() and not leftovers(out)
    code, stdout, _ = cli(capsys, "prune", "--adapter", tmp_path / "dora", "--boundary", 1, "--out", out)
    assert code == 0 and "layers 0..1" in stdout
    assert adapter_layers(load_exported(out)) == [0, 1]


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("other-models")
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=256, n_embd=32, n_layer=4, n_head=4,
                                      bos_token_id=1, eos_token_id=1)).eval()
    return {"wide": save_model(llama(hidden=48), root / "wide"),
            "shallow": save_model(llama(layers=2), root / "shallow"),
            "gpt2": save_model(gpt2, root / "gpt2")}


@pytest.mark.parametrize("which,detail", [
    ("wide", r"lora_[AB] of model\.layers\.0\.\S+ expects (in|out)_features 32, the model has 48"),
    ("shallow", r"module model\.layers\.2\.\S+ not found \(this model has 2 layers\)"),
    ("gpt2", r"module model\.layers\.0\.\S+ not found"),
])
def test_adapter_for_another_base_model_names_both(capsys, tmp_path, world, other_models, which, detail):
    model_dir = other_models[which]
    line = refused(capsys, "analyze", "--model", model_dir, "--adapter", world.adapter, *world.data_args,
                   "--validation-size", 4, "--test-size", 0, "--out", tmp_path / "run")
    assert f"adapter {world.adapter} was trained for a different base model than {model_dir}" in line
    assert re.search(detail, line), line
    assert line.endswith("pass the --model it was trained on")
    assert not (tmp_path / "run").exists()


@pytest.mark.real
def test_tiny_adapter_on_the_real_model_is_refused(capsys, tmp_path, world, real_model):
    line = refused(capsys, "analyze", "--model", "smollm2-135m", "--adapter", world.adapter, *world.data_args,
                   "--validation-size", 4, "--test-size", 0, "--out", tmp_path / "run")
    assert "was trained for a different base model than smollm2-135m" in line
    assert re.search(r"expects (in|out)_features (32|64), the model has (576|1536)", line), line


def test_modules_to_save_are_kept_whole_and_reported(capsys, tmp_path):
    model = tiny_lora(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head", "embed_tokens"])
    with torch.no_grad():  # make the saved copies differ from the base weights, so losing them would show
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.2)
    model.save_pretrained(tmp_path / "adapter")
    code, stdout, _ = cli(capsys, "prune", "--adapter", tmp_path / "adapter", "--boundary", 1, "--out",
                          tmp_path / "out")
    assert code == 0
    assert "modules_to_save kept whole: lm_head, embed_tokens" in stdout
    source = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    exported = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    whole = [n for n in source if "lm_head" in n or "embed_tokens" in n]
    assert len(whole) == 2
    for name in whole:
        assert torch.equal(exported[name], source[name])
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["modules_to_save"] == \
        ["lm_head", "embed_tokens"]
    with keep_up_to(model, 1):
        expected = logits(model)
    assert torch.allclose(logits(load_exported(tmp_path / "out")), expected, atol=1e-6)


def test_restricted_adapter_curves_cover_its_own_layers(capsys, tmp_path, world):
    tiny_lora(target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2], layers_pattern="layers"
              ).save_pretrained(tmp_path / "adapter")
    curves = pipeline_analyze(
        str(world.base), tmp_path / "adapter", str(world.data), tmp_path / "run",
        data_options=DataOptions(data=str(world.data), template=TEMPLATE, validation_size=6, test_size=0, seed=SEED,
                                 max_length=MAX_LENGTH),
        model_options=ModelOptions(model=str(world.base)), progress=False)
    assert curves["meta"]["adapter_layers"] == [1, 2]
    assert curves["truncation"]["boundary"] == [-1, 1, 2]
    assert curves["ablation"]["layer"] == [1, 2]
    assert curves["logit_lens"]["layer"] == [0, 1, 2, 3]
    saved = json.loads((tmp_path / "run" / "curves.json").read_text())
    assert saved["truncation"] == curves["truncation"]
    # b = 0 keeps none of this adapter's layers: a peft export would be empty, and says so.
    line = refused(capsys, "prune", "--adapter", tmp_path / "adapter", "--boundary", 0, "--out", tmp_path / "x")
    assert "boundary 0 keeps no LoRA layer" in line


def test_rank_and_alpha_patterns_survive_a_cli_export(capsys, tmp_path):
    model = tiny_lora(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2},
                      alpha_pattern={"v_proj": 16})
    model.save_pretrained(tmp_path / "adapter")
    for fmt in ("peft", "zero-fill"):
        code, _, err = cli(capsys, "prune", "--adapter", tmp_path / "adapter", "--boundary", 2, "--format", fmt,
                           "--out", tmp_path / fmt)
        assert code == 0, err
        config = json.loads((tmp_path / fmt / "adapter_config.json").read_text())
        assert config["rank_pattern"] == {"down_proj": 2}
        assert config["alpha_pattern"] == {"v_proj": 16}
        with keep_up_to(model, 2):
            assert torch.allclose(logits(load_exported(tmp_path / fmt)), logits(model), atol=1e-6)


class Touch:
    """Unpickling this would create a file: the stand-in for code hidden in a pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickled_adapter_needs_allow_pickle_and_loads_weights_only(capsys, tmp_path, world, monkeypatch):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(world.adapter / "adapter_config.json", pickled)
    torch.save(load_file(str(world.adapter / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    args = ["analyze", *world.small, "--curves", "truncation", "--batch-size", 4]

    line = refused(capsys, *args, "--adapter", pickled, "--out", tmp_path / "no")
    assert "holds only a pickled adapter_model.bin" in line and "--allow-pickle" in line
    assert not (tmp_path / "no").exists()
    line = refused(capsys, "prune", "--adapter", pickled, "--boundary", 1, "--out", tmp_path / "no")
    assert "has no adapter_model.safetensors" in line and "convert" in line
    assert not (tmp_path / "no").exists()

    loads = []
    real_load = torch.load

    def spy(*a, **k):
        loads.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    code, _, err = cli(capsys, *args, "--adapter", pickled, "--allow-pickle", "--out", tmp_path / "bin")
    assert code == 0, err
    assert loads and all(w is True for w in loads)
    monkeypatch.setattr(torch, "load", real_load)
    code, _, err = cli(capsys, *args, "--adapter", world.adapter, "--out", tmp_path / "st")
    assert code == 0, err
    from_bin = json.loads((tmp_path / "bin" / "curves.json").read_text())
    from_st = json.loads((tmp_path / "st" / "curves.json").read_text())
    assert from_bin["truncation"] == from_st["truncation"]

    # A pickle that would run code is refused even with --allow-pickle, and its code never runs.
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(world.adapter / "adapter_config.json", evil)
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": Touch(marker)},
               evil / "adapter_model.bin")
    line = refused(capsys, *args, "--adapter", evil, "--allow-pickle", "--out", tmp_path / "evil-run")
    assert "cannot read adapter weights" in line and "restore the file" in line
    assert not marker.exists()


def test_damaged_adapter_files_give_one_line_errors(capsys, tmp_path, world):
    broken = tmp_path / "broken"
    shutil.copytree(world.adapter, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = refused(capsys, "prune", "--adapter", broken, "--boundary", 1, "--out", tmp_path / "x")
    assert "cannot read adapter weights" in line and "restore the file" in line
    line = refused(capsys, "analyze", *world.small, "--adapter", broken, "--out", tmp_path / "y")
    assert "adapter" in line and str(broken) in line
    (broken / "adapter_config.json").write_text("{not json")
    line = refused(capsys, "prune", "--adapter", broken, "--boundary", 1, "--out", tmp_path / "x")
    assert "cannot parse" in line and "adapter_config.json" in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---------------------------------------------------------------------------
# 2. Arguments and data
# ---------------------------------------------------------------------------

def test_boundary_outside_the_model_is_refused(capsys, tmp_path, world):
    line = refused(capsys, "prune", "--adapter", world.adapter, "--model", world.base, "--boundary", 4,
                   "--out", tmp_path / "p")
    assert "boundary 4 is outside -1..3 for this 4-layer model" in line and "pass --boundary" in line
    for model in ([], ["--model", world.base]):  # below -1 is refused before the model is read
        line = refused(capsys, "prune", "--adapter", world.adapter, *model, "--boundary", -2, "--out", tmp_path / "p")
        assert "--boundary -2 is out of range; pass a whole number in [-1, 2147483647]" in line
    assert not (tmp_path / "p").exists()

    line = refused(capsys, "search", "--adapter", world.adapter, *world.small, "--boundary", 9)
    assert "boundary 9 is outside -1..3" in line

    line = refused(capsys, "evaluate", "--adapter", world.adapter, *world.small, "--boundaries", 9,
                   "--out", tmp_path / "e")
    assert "boundary 9 is outside -1..3" in line

    for flag in ("--boundary", "--boundaries"):
        run_dir = tmp_path / f"run{flag}"
        line = refused(capsys, "run", "--adapter", world.adapter, *world.small, flag, 9, "--out", run_dir)
        assert "boundary 9 is outside -1..3" in line
        # refused before any analysis: only the settings, the marker and the lock
        assert sorted(p.name for p in run_dir.iterdir()) == [".lorabound", ".lorabound.lock", "run.json"]


@pytest.mark.parametrize("command,flag,split", [
    ("analyze", "--validation-size", "validation"),
    ("search", "--validation-size", "validation"),
    ("evaluate", "--test-size", "test"),
    ("run", "--test-size", "test"),
    ("run", "--validation-size", "validation"),
])
def test_empty_split_is_refused(capsys, tmp_path, world, command, flag, split):
    sizes = {"--validation-size": 4, "--test-size": 3, flag: 0}
    args = [command, "--model", world.base, "--adapter", world.adapter, *world.data_args,
            *[x for kv in sizes.items() for x in kv], "--out", tmp_path / "out"]
    line = refused(capsys, *args)
    assert f"the {split} split is empty; pass {flag} N with N >= 1" in line
    out = tmp_path / "out"
    # only what the corrected rerun reuses: its settings and lorabound's own marker and lock files
    assert not out.exists() or sorted(p.name for p in out.iterdir() if not p.name.startswith(".lorabound")) == \
        ["run.json"]


def test_split_sizes_larger_than_the_data(capsys, tmp_path, world):
    line = refused(capsys, "analyze", "--model", world.base, "--adapter", world.adapter, *world.data_args,
                   "--validation-size", 30, "--test-size", 20, "--out", tmp_path / "out")
    assert f"has {N_ROWS} examples but train 0 + validation 30 + test 20 = 50 were asked for" in line
    assert "pass smaller" in line
    line = refused(capsys, "analyze", *world.small, "--adapter", world.adapter, "--validation-size", -1,
                   "--out", tmp_path / "out")
    assert "--validation-size -1 is out of range" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content,expected", [
    (b'{"input": "a", "target": "b"}\n{"input": "c", "target": "d"}\n\xff\xfe broken\n', "line 3 is not valid UTF-8"),
    (b'{"input": "a", "target": "b"}\n{"input": "c", "target": }\n', "line 2 is not valid JSON"),
    (b'{"input": "a", "target": "b"}\n["c", "d"]\n', "line 2 is a JSON list, not an object"),
    (b'{"input": "a", "target": "b"}\n{"input": "c", "tgt": "d"}\n', "line 2 has no field 'target'"),
    (b'{"input": "a", "target": "b"}\n{"input": "c", "target": ""}\n', "line 2: field 'target' has an empty reference"),
])
def test_bad_jsonl_lines_are_named(capsys, tmp_path, world, content, expected):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    line = refused(capsys, "analyze", "--model", world.base, "--adapter", world.adapter, "--data", data,
                   "--validation-size", 1, "--test-size", 0, "--out", tmp_path / "out")
    assert f"{data} {expected}" in line
    assert not (tmp_path / "out").exists()


def test_non_utf8_csv_row_is_named(capsys, tmp_path, world):
    data = tmp_path / "bad.csv"
    data.write_bytes(b"input,target\na,b\nc,d\xff\n")
    line = refused(capsys, "analyze", "--model", world.base, "--adapter", world.adapter, "--data", data,
                   "--validation-size", 1, "--test-size", 0, "--out", tmp_path / "out")
    assert f"{data} line 3 is not valid UTF-8; save the file as UTF-8" in line


def test_template_longer_than_max_length_is_refused_and_a_fixed_rerun_works(capsys, tmp_path, world):
    long_template = "Read this very long preamble before you describe anything at all. " * 6 + "{input}\nText:"
    args = ["--model", world.base, "--adapter", world.adapter, "--data", world.data, "--max-length", 64,
            "--validation-size", 3, "--test-size", 2, "--seed", SEED]
    line = refused(capsys, "analyze", *args, "--template", long_template, "--out", tmp_path / "a")
    assert "every prompt is longer than --max-length 64 tokens" in line and "raise --max-length" in line
    longest = int(line.split("(longest: ")[1].split(")")[0])
    assert longest > 64
    assert not (tmp_path / "a").exists()

    run_dir = tmp_path / "run"
    run_args = ["run", *args, "--boundary", 1, "--max-new-tokens", 3, "--bootstrap", 20, "--out", run_dir]
    line = refused(capsys, *run_args, "--template", long_template)
    assert "every prompt is longer than --max-length 64" in line
    # The folder holds only what the refused run claimed: the same folder takes the corrected command.
    code, _, err = cli(capsys, *run_args, "--template", TEMPLATE)
    assert code == 0, err
    assert json.loads((run_dir / "report.json").read_text())["search"]["boundary"] == 1


# ---------------------------------------------------------------------------
# Shared runs: one uninterrupted run with the network blocked, a second for determinism
# ---------------------------------------------------------------------------

def run_args(world, out) -> list:
    return ["run", "--model", world.base, "--adapter", world.adapter, *world.data_args, "--validation-size", 10,
            "--test-size", 5, "--batch-size", 1, "--max-new-tokens", 5, "--bootstrap", 40,
            "--generation-batch-size", 8, "--out", out]


@pytest.fixture(scope="module")
def run_a(world):
    """`lorabound run` on the tiny model with every socket blocked and from_pretrained watched."""
    out = world.root / "run-a"
    attempts, loads = [], []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by test_trust")

    def watch(real):
        def spy(*args, **kwargs):
            loads.append(kwargs.get("trust_remote_code", "absent"))
            return real(*args, **kwargs)
        return spy

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket.socket, "connect_ex", no_network)
        mp.setattr(socket, "getaddrinfo", no_network)
        mp.setattr(AutoModelForCausalLM, "from_pretrained", watch(AutoModelForCausalLM.from_pretrained))
        mp.setattr(AutoTokenizer, "from_pretrained", watch(AutoTokenizer.from_pretrained))
        code = main(["--quiet", *map(str, run_args(world, out))])
    return SimpleNamespace(out=out, code=code, attempts=attempts, loads=loads, hashes=folder_hashes(world.adapter))


def comparable(value, out: Path):
    """A report with what legitimately differs between two run folders (paths, timestamps, wall times) taken out."""
    if isinstance(value, dict):
        return {k: comparable(v, out) for k, v in value.items()
                if k not in ("created", "exported_to", "stage_seconds", "torch_threads")}
    if isinstance(value, list):
        return [comparable(v, out) for v in value]
    if isinstance(value, str):
        return value.replace(str(out), "<out>")
    return value


def figures(out: Path) -> dict:
    return {name: comparable(json.loads((out / name).read_text()), out)
            for name in ("curves.json", "search.json", "report.json")}


def test_run_makes_no_network_connection_and_trusts_no_remote_code(run_a):
    assert run_a.code == 0
    assert run_a.attempts == []
    assert (run_a.out / "report.json").is_file()
    assert run_a.loads and all(flag is False for flag in run_a.loads)  # passed explicitly, and False


def test_truncated_and_skipped_examples_are_counted_and_reported(run_a, world):
    task = load_task(str(world.data), template=TEMPLATE)
    validation = split_task(task, train=0, validation=10, test=5, seed=SEED).validation
    index = {row(i)["input"]: i for i in range(N_ROWS)}
    skipped = sum(index[e.input] % 7 == 3 for e in validation)
    truncated = sum(index[e.input] % 5 == 1 and index[e.input] % 7 != 3 for e in validation)
    assert skipped > 0 and truncated > 0  # the data and seed exercise both
    meta = json.loads((run_a.out / "curves.json").read_text())["meta"]
    assert (meta["n_skipped"], meta["n_truncated"], meta["n_examples"]) == (skipped, truncated, 10 - skipped)
    notes = json.loads((run_a.out / "report.json").read_text())["notes"]
    assert f"{truncated} validation targets were cut to --max-length for the curves." in notes
    assert f"{skipped} validation examples were skipped: their prompt alone exceeds --max-length." in notes
    markdown = (run_a.out / "report.md").read_text()
    assert f"- {truncated} validation targets were cut" in markdown
    assert f"- {skipped} validation examples were skipped" in markdown


def test_same_seed_gives_identical_curves_boundary_and_report(run_a, world):
    out_b = world.root / "run-b"
    assert main(["--quiet", *map(str, run_args(world, out_b))]) == 0
    a, b = figures(run_a.out), figures(out_b)
    assert a["curves.json"]["truncation"]["mean_prob"]  # not vacuous
    assert a == b
    assert a["report.json"]["search"]["boundary"] == b["search.json"]["boundary"]


def test_verdict_says_what_the_chosen_boundary_does_and_why():
    from lorabound.pipeline import verdict

    evaluation = {"significance": [], "variants": [{"name": "base model"}, {"name": "full adapter"}]}
    base = verdict({"boundary": -1, "kept_fraction": 0.0, "reason": "b = -1 was given with --boundary"},
                   evaluation, 3)
    assert base.startswith("Every LoRA layer was dropped: the base model") and "--boundary" in base
    assert "kept on every layer" not in base
    full = verdict({"boundary": 3, "kept_fraction": 1.0, "reason": "smallest b by validation rougeL"}, evaluation, 3)
    assert full.startswith("LoRA was kept on every layer") and "validation rougeL" in full
    # An adapter on layers 0..1 of a 4-layer model: b = 1 is its full adapter, not a pruned one.
    assert verdict({"boundary": 1, "kept_fraction": 1.0, "reason": "knee"}, evaluation, 1).startswith(
        "LoRA was kept on every layer")


# ---------------------------------------------------------------------------
# 3. Files
# ---------------------------------------------------------------------------

def command(world, name: str, out: Path) -> list:
    adapter = ["--adapter", world.adapter]
    return {
        "train": ["train", *world.small, "--epochs", 1, "--batch-size", 8, "--rank", 2, "--out", out],
        "analyze": ["analyze", *world.small, *adapter, "--curves", "truncation", "--out", out],
        "search": ["search", *world.small, *adapter, "--criterion", "knee", "--out", out],
        "prune": ["prune", *adapter, "--boundary", 1, "--out", out],
        "evaluate": ["evaluate", *world.small, *adapter, "--max-new-tokens", 3, "--bootstrap", 20, "--out", out],
        "run": ["run", *world.small, *adapter, "--boundary", 1, "--max-new-tokens", 3, "--bootstrap", 20,
                "--out", out],
        "demo": ["demo", "--out", out],
    }[name]


PRODUCT = {"train": "adapter_model.safetensors", "analyze": "curves.json", "search": "search.json",
           "prune": "adapter_model.safetensors", "evaluate": "evaluation.json", "run": "report.json"}


@pytest.mark.parametrize("name", ["train", "analyze", "search", "prune", "evaluate", "run", "demo"])
def test_non_empty_output_folder_needs_overwrite(capsys, tmp_path, world, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    line = refused(capsys, *command(world, name, out))
    assert str(out) in line and "not empty" in line and "--overwrite" in line
    # --overwrite replaces only a folder lorabound wrote: the user's own folder stays as it was
    line = refused(capsys, *command(world, name, out), "--overwrite")
    assert str(out) in line and "was not written by lorabound" in line
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "precious"
    if name == "demo":
        return  # demo trains the real model; its refusal is what is tested here
    own = tmp_path / "own"
    for extra in ([], ["--overwrite"]):
        code, _, err = cli(capsys, *command(world, name, own), *extra)
        assert code == 0, err
        assert (own / PRODUCT[name]).is_file() and (own / ".lorabound").is_file()


def test_input_adapter_is_never_written(capsys, tmp_path, world, run_a):
    assert run_a.hashes == world.hashes  # after `run`
    steps = [command(world, "analyze", tmp_path / "analyze"), command(world, "search", tmp_path / "search"),
             ["search", *world.small, "--adapter", world.adapter, "--candidates", 0, 3, "--out", tmp_path / "s2"]]
    for fmt in ("peft", "zero-fill", "merged"):
        steps.append(["prune", "--adapter", world.adapter, "--boundary", 1, "--format", fmt, "--model", world.base,
                      "--out", tmp_path / fmt])
    steps.append([*command(world, "evaluate", tmp_path / "evaluate"), "--boundaries", 1,
                  "--adapters", tmp_path / "peft"])
    for args in steps:
        code, _, err = cli(capsys, *args)
        assert code == 0, (args, err)
        assert folder_hashes(world.adapter) == world.hashes, args
    assert len(json.loads((tmp_path / "evaluate" / "evaluation.json").read_text())["variants"]) == 4


def test_output_folder_overlapping_the_input_is_refused_even_with_overwrite(capsys, tmp_path, world):
    project = tmp_path / "project"
    shutil.copytree(world.adapter, project / "adapter")
    adapter = project / "adapter"
    before = folder_hashes(project)
    for args in (["prune", "--adapter", adapter, "--boundary", 1, "--out", project],
                 ["prune", "--adapter", adapter, "--boundary", 1, "--out", adapter],
                 ["run", *world.small, "--adapter", adapter, "--boundary", 1, "--out", project],
                 ["analyze", *world.small, "--adapter", adapter, "--out", adapter / "curves"],
                 ["evaluate", *world.small, "--adapter", world.adapter, "--adapters", adapter, "--out", project]):
        line = refused(capsys, *args, "--overwrite")
        assert f"inside the input {adapter}" in line and "never writes into its inputs" in line
        assert folder_hashes(project) == before, args


def test_output_folder_holding_the_data_or_the_model_is_refused_even_with_overwrite(capsys, tmp_path, world):
    """--overwrite must never empty a folder that holds the user's data file or model."""
    project = tmp_path / "project"
    project.mkdir()
    data = project / "data.jsonl"
    shutil.copyfile(world.data, data)
    before = folder_hashes(project)
    small = [str(data) if a == str(world.data) else a for a in map(str, world.small)]
    for name in ("run", "analyze", "evaluate", "train"):
        args = [name, *small, "--out", project] + ([] if name == "train" else ["--adapter", world.adapter])
        line = refused(capsys, *args, "--overwrite")
        assert f"inside the input {data}" in line, (name, line)
        assert folder_hashes(project) == before, name
    model_copy = tmp_path / "model"
    shutil.copytree(world.base, model_copy)
    line = refused(capsys, "analyze", *world.small, "--model", model_copy, "--adapter", world.adapter,
                   "--out", model_copy, "--overwrite")
    assert f"inside the input {model_copy}" in line


def test_overwrite_replaces_only_what_lorabound_wrote(capsys, tmp_path, world, monkeypatch):
    """--overwrite: never the working folder (even one lorabound wrote), a link, or a folder without the marker."""
    work = tmp_path / "work"
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, *command(world, "analyze", work))  # a folder lorabound wrote...
    assert code == 0, err
    monkeypatch.chdir(work)  # ...that is now the working folder
    before = folder_hashes(work)
    line = refused(capsys, *command(world, "analyze", Path(".")), "--overwrite")
    assert "is the working folder or holds it; --overwrite never empties it" in line
    line = refused(capsys, *command(world, "run", Path("..")), "--overwrite")
    assert "is the working folder or holds it" in line
    assert folder_hashes(work) == before
    (tmp_path / "link").symlink_to(work)
    line = refused(capsys, *command(world, "evaluate", tmp_path / "link"), "--overwrite")
    assert "is a symbolic link to" in line and "pass the folder it points to" in line
    assert folder_hashes(work) == before


def test_refused_or_crashed_command_does_not_block_its_rerun(capsys, tmp_path, world, monkeypatch):
    out = tmp_path / "eval"
    line = refused(capsys, *command(world, "evaluate", out), "--bootstrap", 0)  # refused before any generation
    assert "--bootstrap 0 is out of range" in line and not out.exists()
    line = refused(capsys, *command(world, "evaluate", out), "--adapters", tmp_path / "missing")
    assert "does not exist" in line and not out.exists()

    import lorabound.evaluation as evaluation_table

    real = evaluation_table.score
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation_table, "score", crash_on_second)
    with pytest.raises(RuntimeError):
        main(["--quiet", *map(str, command(world, "evaluate", out))])
    capsys.readouterr()
    assert json.loads((out / ".lorabound").read_text())["finished"] is False
    monkeypatch.setattr(evaluation_table, "score", real)
    code, _, err = cli(capsys, *command(world, "evaluate", out))  # the same command, no --overwrite needed
    assert code == 0, err
    assert json.loads((out / ".lorabound").read_text())["finished"] is True
    line = refused(capsys, *command(world, "evaluate", out))  # a finished folder is kept
    assert "not empty" in line


def test_unwritable_places_are_refused_before_the_work(capsys, tmp_path, world, monkeypatch):
    (tmp_path / "file").write_text("x")
    trained = []
    monkeypatch.setattr("lorabound.pipeline.train_adapter", lambda *a, **k: trained.append(1))
    for out, words in ((tmp_path / "file" / "adapter", "lies inside the file"),
                       ("/proc/lorabound-adapter", "cannot be written"),
                       (tmp_path / "file", "is a file, not a folder")):
        line = refused(capsys, *command(world, "train", out))
        assert f"--out {out} " in line and words in line
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        if not os.access(readonly, os.W_OK):  # root may write anywhere
            assert "cannot be written" in refused(capsys, *command(world, "train", readonly / "adapter"))
    finally:
        readonly.chmod(0o700)
    assert trained == []
    monkeypatch.setenv("LORABOUND_CACHE", "/proc/lorabound-cache")
    line = refused(capsys, "analyze", "--model", world.base, "--adapter", world.adapter, "--data", "e2e",
                   "--out", tmp_path / "a")
    assert "cannot create the cache folder /proc/lorabound-cache" in line and "set LORABOUND_CACHE" in line


def test_a_full_disk_during_the_work_is_one_line(capsys, tmp_path, world, monkeypatch):
    import errno

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("lorabound.runtime.files.write_bytes_atomic", full)
    line = refused(capsys, *command(world, "analyze", tmp_path / "a"))
    assert line.startswith("error: No space left on device (") and "free some space" in line


def test_damaged_files_in_a_run_folder_are_named_on_resume(capsys, tmp_path, world, run_a):
    generations = next((run_a.out / "generations").glob("test-full-adapter-*.jsonl")).name  # name-key.jsonl
    for name, words in (("curves.json", "curves.json is damaged"), ("run.json", "run.json is damaged"),
                        (f"generations/{generations}", f"{generations} line 1 is damaged")):
        out = tmp_path / name.replace("/", "-")
        shutil.copytree(run_a.out, out)
        (out / name).write_text('{"truncated": ')
        line = refused(capsys, *run_args(world, out))
        assert words in line and ("delete it" in line or "--overwrite" in line), line


def test_truncated_model_weights_are_one_line(capsys, tmp_path, world):
    model = tmp_path / "model"
    shutil.copytree(world.base, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    line = refused(capsys, *command(world, "analyze", tmp_path / "a"), "--model", model)
    assert f"could not load the model in {model}" in line
    assert not (tmp_path / "a").exists()


SLOW_EXPORT = """
import sys, time
from pathlib import Path
import lorabound.lora.export as surgery

real_save = surgery.save_file

def slow_save(tensors, filename, metadata=None):
    real_save(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)  # half a file: what a kill in the middle of the write leaves
    Path(sys.argv[4]).write_text("writing")
    time.sleep(300)

surgery.save_file = slow_save
surgery.prune_adapter(sys.argv[1], int(sys.argv[2]), sys.argv[3], num_layers=4, overwrite=True)
"""


def wait_for(condition, process, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the process ended early with status {process.returncode}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the process")
        time.sleep(0.05)


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "over-previous-export"])
def test_export_killed_mid_write_leaves_old_state_or_nothing(tmp_path, world, previous):
    out = tmp_path / "exported"
    if previous:
        prune_adapter(world.adapter, 1, out, num_layers=4)
        before = folder_hashes(out)
    script, marker = tmp_path / "slow_export.py", tmp_path / "writing"
    script.write_text(SLOW_EXPORT)
    process = subprocess.Popen([sys.executable, str(script), str(world.adapter), "2", str(out), str(marker)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(marker.exists, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    left = leftovers(out)
    assert len(left) == 1 and (left[0] / "adapter_model.safetensors").is_file()  # the kill hit mid-write
    if previous:
        assert folder_hashes(out) == before  # the old complete adapter, untouched
        assert adapter_layers(load_exported(out)) == [0, 1]
    else:
        assert not out.exists()

    prune_adapter(world.adapter, 2, out, num_layers=4, overwrite=True)
    assert leftovers(out) == []  # the next successful export cleaned up after the killed one
    model = load_adapter(tiny_llama(), world.adapter)
    with keep_up_to(model, 2):
        assert torch.allclose(logits(load_exported(out)), logits(model), atol=1e-6)
    assert folder_hashes(world.adapter) == world.hashes


SLOW_SWEEP = """
import sys, time
import lorabound.analysis.curves as analysis

real = analysis.score_batch
calls = [0]

def slow(*args, **kwargs):
    # the self-check and two batches go at normal speed; then the run waits long enough for a second process
    # to start and be refused while this one still holds the folder (the test kills it before it finishes)
    real(*args, **kwargs)
    calls[0] += 1
    time.sleep(0.3 if calls[0] <= 3 else 60)

analysis.score_batch = slow
from lorabound.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_run_killed_during_the_sweep_resumes_with_identical_numbers(tmp_path, world, run_a, monkeypatch):
    """Also: while the first process runs, a second `run` into its folder is refused (the folder lock);
    after the kill the kernel has dropped that lock, so the rerun needs no clean-up."""
    out = tmp_path / "run-killed"
    script = tmp_path / "slow_sweep.py"
    script.write_text(SLOW_SWEEP)
    partial = out / "analysis.partial.json"

    def two_batches_done() -> bool:
        try:
            return json.loads(partial.read_text())["batches_done"] >= 2
        except (OSError, ValueError, KeyError):
            return False

    process = subprocess.Popen([sys.executable, str(script), "--quiet", *map(str, run_args(world, out))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(two_batches_done, process)
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        second = subprocess.run([sys.executable, "-m", "lorabound.cli", "--quiet", *map(str, run_args(world, out))],
                                capture_output=True, text=True, timeout=300)
        assert process.poll() is None  # the first one was still running throughout
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert second.stderr.splitlines() == [f"error: --out {out} is in use by another lorabound process "
                                          f"(pid {process.pid}); wait for it to finish, or pass another folder"]
    assert before["run.json"] == (out / "run.json").read_bytes()  # the second process wrote nothing
    assert not (out / "curves.json").exists()
    done = json.loads(partial.read_text())["batches_done"]

    calls = []
    real = analysis.score_batch
    monkeypatch.setattr(analysis, "score_batch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert main(["--quiet", *map(str, run_args(world, out))]) == 0
    total = json.loads((out / "curves.json").read_text())["meta"]["n_examples"]
    assert 2 <= done < total and len(calls) == 1 + total - done  # the self-check, then only the batches left
    assert not partial.exists()
    assert figures(out) == figures(run_a.out)
    assert folder_hashes(world.adapter) == world.hashes


HOLDER = """
import sys
from pathlib import Path
from lorabound.runtime.files import holds_folder_locks, lock_output

@holds_folder_locks
def hold(out):
    lock_output(out)
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin

hold(Path(sys.argv[1]))
"""


def concurrent_command(world, name: str, out: Path) -> list:
    if name == "speed":
        return ["speed", "--model", world.base, "--adapter", world.adapter, "--boundary", 1, "--batch-sizes", 1,
                "--out", out]
    if name == "search-selection":
        return ["search", *world.small, "--adapter", world.adapter, "--criterion", "greedy-drop", "--out", out]
    return command(world, name, out)


@pytest.mark.parametrize("name", ["train", "analyze", "search", "search-selection", "prune", "evaluate", "speed",
                                  "run", "demo"])
def test_a_second_process_into_a_folder_in_use_is_refused_at_once(capsys, tmp_path, world, name, monkeypatch):
    """Every command that writes --out refuses a folder another lorabound process holds: one line naming that
    process, before any model is loaded, and nothing written there."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(lorabound_src())), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=env, text=True)
    loads = []
    monkeypatch.setattr(ModelOptions, "load", lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    try:
        assert holder.stdout.readline() == "held\n"
        for extra in ([], ["--overwrite"]):
            line = refused(capsys, *concurrent_command(world, name, out), *extra, alone=True)
            assert line == (f"error: --out {out} is in use by another lorabound process (pid {holder.pid}); "
                            "wait for it to finish, or pass another folder")
            assert [p.name for p in out.iterdir()] == [".lorabound.lock"]  # nothing written beside the holder's lock
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert loads == []


def lorabound_src() -> Path:
    import lorabound
    return Path(lorabound.__file__).parents[1]


def test_the_lock_of_a_one_shot_command_is_released_and_a_refusal_leaves_no_folder(capsys, tmp_path, world):
    """After a refusal (here: a boundary the model lacks, found after the lock was taken) the folder the command
    made is gone; after success the lock is free again for the next command."""
    out = tmp_path / "eval"
    line = refused(capsys, *command(world, "evaluate", out), "--boundaries", 9)
    assert "boundary 9 is outside -1..3" in line and not out.exists()
    out.mkdir()  # a folder the user made: left as it was, empty
    line = refused(capsys, *command(world, "analyze", out), "--validation-size", 0)  # refused once locked
    assert "the validation split is empty" in line and list(out.iterdir()) == []
    out = tmp_path / "adapter-b1"
    line = refused(capsys, "prune", "--adapter", world.adapter, "--boundary", 9, "--model", world.base, "--out", out)
    assert "boundary 9 is outside -1..3" in line and not out.exists()
    code, _, err = cli(capsys, "prune", "--adapter", world.adapter, "--boundary", 1, "--out", out)
    assert code == 0, err
    code, _, err = cli(capsys, "prune", "--adapter", world.adapter, "--boundary", 2, "--out", out, "--overwrite")
    assert code == 0, err  # the first prune's lock was released when it returned


# ---------------------------------------------------------------------------
# 5. Network and remote code
# ---------------------------------------------------------------------------

def test_trust_remote_code_only_when_asked(capsys, tmp_path, world, monkeypatch):
    seen = []

    def watch(real):
        def spy(*args, **kwargs):
            seen.append(kwargs.get("trust_remote_code", "absent"))
            return real(*args, **kwargs)
        return spy

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", watch(AutoModelForCausalLM.from_pretrained))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", watch(AutoTokenizer.from_pretrained))
    load_model(str(world.base))
    assert seen == [False, False]
    seen.clear()
    code, _, err = cli(capsys, "analyze", *world.small, "--adapter", world.adapter, "--curves", "truncation",
                       "--trust-remote-code", "--out", tmp_path / "a")
    assert code == 0, err
    assert seen == [True, True]
    seen.clear()
    code, _, err = cli(capsys, "prune", "--adapter", world.adapter, "--boundary", 1, "--format", "merged",
                       "--model", world.base, "--trust-remote-code", "--out", tmp_path / "m")
    assert code == 0, err
    assert seen == [True, True]


def test_hub_id_is_the_only_place_a_download_may_start(monkeypatch):
    """A hub id goes to from_pretrained as given (that is the download the user asked for); nothing else does."""
    asked = []

    def fake_model(source, **kwargs):
        asked.append(("model", source, kwargs["trust_remote_code"]))
        return tiny_llama(), {"missing_keys": set()}  # load_model asks for output_loading_info

    def fake_tokenizer(source, **kwargs):
        asked.append(("tokenizer", source, kwargs["trust_remote_code"]))
        return tiny_tokenizer()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_tokenizer)
    model, tokenizer = load_model("someone/some-model")
    assert asked == [("model", "someone/some-model", False), ("tokenizer", "someone/some-model", False)]
    assert tokenizer.pad_token_id is not None and not model.training
    with pytest.raises(LoraboundError, match="unknown model spec"):
        load_model("not a model spec")
    assert len(asked) == 2
