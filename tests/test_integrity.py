"""Integrity: adapters whose config and tensors disagree, non-finite weights, training that diverges,
and models that are not causal language models (issue 13, items 3, 4 and 8).

Each case takes a good tiny adapter or model saved to a temporary folder, alters one thing (an edited
config, a deleted, renamed or extra tensor, a NaN written into a tensor, a missing head) and expects a
one-line refusal naming the problem, through the Python API and through the CLI, with the input files
unchanged and no output left behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorabound.errors import LoraboundError
from lorabound.runtime.files import folder_hashes
from lorabound.model import load_adapter, load_model
from lorabound.lora.export import AdapterFiles, prune_adapter

from clitools import refused_alone
from tiny import tiny_llama, tiny_lora, tiny_tokenizer, save_tiny_base

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model.model.layers"
TEMPLATE = "Describe: {input}\nText:"


def write_rows(path: Path, n: int = 12) -> Path:
    path.write_text("".join(json.dumps({"input": f"name: Place {i}, food: French",
                                        "target": f"Place {i} is French."}) + "\n" for i in range(n)))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 4-layer tiny model folder; adapters on q,v (plain and DoRA) and on every linear module; a JSONL task."""
    root = tmp_path_factory.mktemp("integrity")
    save_tiny_base(root)
    tiny_lora(target_modules=["q_proj", "v_proj"]).save_pretrained(root / "qv")
    tiny_lora().save_pretrained(root / "all")
    tiny_lora(target_modules=["q_proj", "v_proj"], use_dora=True).save_pretrained(root / "dora")
    w = SimpleNamespace(root=root, base=root / "base", data=write_rows(root / "data.jsonl"))
    w.small = ["--model", w.base, "--data", w.data, "--template", TEMPLATE, "--max-length", 64,
               "--validation-size", 3, "--test-size", 3]
    return w


def altered(world, tmp_path, source: str, *, config=None, tensors=None) -> Path:
    """A copy of adapter `source` with config keys set (None deletes) and tensors changed by `tensors(dict)`."""
    folder = tmp_path / f"{source}-altered"
    shutil.copytree(world.root / source, folder)
    if config:
        data = json.loads((folder / CONFIG).read_text())
        for key, value in config.items():
            data[key] = value
        (folder / CONFIG).write_text(json.dumps(data))
    if tensors:
        state = load_file(str(folder / WEIGHTS))
        tensors(state)
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    return folder


def no_lora_left(model) -> bool:
    return not any("lora_" in name for name, _ in model.named_parameters())


# ---------------------------------------------------------------------------
# Item 3: the config against the tensors
# ---------------------------------------------------------------------------

def drop(*names):
    def change(state):
        for name in names:
            del state[name]
    return change


def rename(old, new):
    def change(state):
        state[new] = state.pop(old)
    return change


def add(name, like):
    def change(state):
        state[name] = torch.randn_like(state[like])
    return change


Q0 = f"{PREFIX}.0.self_attn.q_proj"
K0 = f"{PREFIX}.0.self_attn.k_proj"

# (adapter, config edits, tensor edits, what the one-line refusal must say)
MISMATCHES = {
    "target_modules null": ("all", {"target_modules": None}, None,
                            r"holds tensor .*\.(k|o|gate|up|down)_proj\.lora_[AB]\.weight \(and \d+ more\), which its "
                            r"adapter_config\.json \(target_modules null\) does not select on this model"),
    "target_modules narrower": ("all", {"target_modules": ["q_proj"]}, None,
                                r"holds LoRA tensors for model\.layers\.\d\.(self_attn|mlp)\.\w+, which its "
                                r"adapter_config\.json .* does not select, so PEFT would ignore them"),
    "layers_to_transform beyond the model": ("qv", {"layers_to_transform": [0, 1, 2, 3, 7]}, None,
                                             r"layers_to_transform names layer 7 but the model has layers 0\.\.3"),
    "layers_to_transform narrower": ("qv", {"layers_to_transform": [0, 1]}, None,
                                     r"holds LoRA tensors for model\.layers\.2\.self_attn\.[qv]_proj, which .* "
                                     r"layers_to_transform \[0, 1\]\) does not select"),
    "r differs": ("qv", {"r": 8}, None,
                  r"lora_A of model\.layers\.0\.self_attn\.[qv]_proj has rank 4 but adapter_config\.json gives it r 8"),
    "rank_pattern": ("qv", {"rank_pattern": {"v_proj": 2}}, None,
                     r"lora_A of model\.layers\.0\.self_attn\.v_proj has rank 4 but adapter_config\.json gives it "
                     r"rank_pattern\['v_proj'\] 2"),
    "alpha_pattern NaN": ("qv", {"alpha_pattern": {"v_proj": float("nan")}}, None,
                          r"alpha_pattern gives v_proj the value nan; each value must be a finite number"),
    "lora_alpha infinite": ("qv", {"lora_alpha": float("inf")}, None, r"has lora_alpha inf; set it to a finite number"),
    "use_dora without magnitudes": ("qv", {"use_dora": True}, None,
                                    r"sets use_dora but the adapter has no lora_magnitude_vector for "
                                    r"model\.layers\.0\.self_attn\.q_proj"),
    "magnitudes without use_dora": ("dora", {"use_dora": False}, None,
                                    r"holds a DoRA lora_magnitude_vector for model\.layers\.0\.self_attn\.q_proj but "
                                    r"adapter_config\.json does not set use_dora"),
    "lora_A deleted": ("qv", None, drop(f"{Q0}.lora_A.weight"),
                       r"holds lora_B of model\.layers\.0\.self_attn\.q_proj but not its lora_A"),
    "lora_B deleted": ("qv", None, drop(f"{Q0}.lora_B.weight"),
                       r"holds lora_A of model\.layers\.0\.self_attn\.q_proj but not its lora_B"),
    "lora_A renamed": ("qv", None, rename(f"{Q0}.lora_A.weight", f"{Q0}.lora_a.weight"),
                       r"holds lora_B of model\.layers\.0\.self_attn\.q_proj but not its lora_A"),
    "module renamed": ("qv", None,
                       lambda s: (rename(f"{Q0}.lora_A.weight", f"{PREFIX}.0.self_attn.qq_proj.lora_A.weight")(s),
                                  rename(f"{Q0}.lora_B.weight", f"{PREFIX}.0.self_attn.qq_proj.lora_B.weight")(s)),
                       r"holds LoRA tensors for model\.layers\.0\.self_attn\.qq_proj, which"),
    "extra module": ("qv", None,
                     lambda s: (add(f"{K0}.lora_A.weight", f"{Q0}.lora_A.weight")(s),
                                add(f"{K0}.lora_B.weight", f"{PREFIX}.0.self_attn.v_proj.lora_B.weight")(s)),
                     r"holds LoRA tensors for model\.layers\.0\.self_attn\.k_proj, which"),
    "DoRA magnitude deleted": ("dora", None, drop(f"{Q0}.lora_magnitude_vector"),
                               r"sets use_dora but the adapter has no lora_magnitude_vector for "
                               r"model\.layers\.0\.self_attn\.q_proj"),
}
# Only a model can tell these: which modules all-linear / null select, and an unknown extra tensor name.
NEEDS_MODEL = {
    "module pair deleted": ("qv", None, drop(f"{Q0}.lora_A.weight", f"{Q0}.lora_B.weight"),
                            rf"lacks tensor {Q0}\.lora_A\.weight \(and 1 more\), which its adapter_config\.json "
                            r"\(target_modules .*\) implies for this model: PEFT would leave it at a random initial"),
    "unknown extra tensor": ("qv", None, add(f"{Q0}.lora_C.weight", f"{Q0}.lora_A.weight"),
                             rf"holds tensor {Q0}\.lora_C\.weight, which its adapter_config\.json .* does not select "
                             r"on this model, so PEFT would ignore it"),
}


@pytest.mark.parametrize("case", list(MISMATCHES) + list(NEEDS_MODEL))
def test_load_adapter_refuses_config_tensor_mismatch(tmp_path, world, case):
    source, config, tensors, message = {**MISMATCHES, **NEEDS_MODEL}[case]
    folder = altered(world, tmp_path, source, config=config, tensors=tensors)
    before = folder_hashes(folder)
    base = tiny_llama()
    with pytest.raises(LoraboundError, match=message) as err:
        load_adapter(base, folder)
    assert "\n" not in str(err.value) and "; " in str(err.value)  # one line: what is wrong; how to fix it
    assert no_lora_left(base)  # the caller's model is given back without half-loaded LoRA layers
    assert folder_hashes(folder) == before


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_prune_refuses_config_tensor_mismatch_without_a_model(tmp_path, world, case):
    source, config, tensors, message = MISMATCHES[case]
    if case == "target_modules null":
        pytest.skip("which modules null selects depends on the model type: checked when a model is loaded")
    folder = altered(world, tmp_path, source, config=config, tensors=tensors)
    before = folder_hashes(folder)
    if case == "layers_to_transform beyond the model":
        with pytest.raises(LoraboundError, match="names layer 7 but the adapter has no LoRA tensors there"):
            AdapterFiles.read(folder)  # without the model: the listed layer carries no tensors
    else:
        with pytest.raises(LoraboundError, match=message):
            prune_adapter(folder, 1, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert folder_hashes(folder) == before


def test_prune_with_model_refuses_layers_the_model_lacks(tmp_path, world):
    folder = altered(world, tmp_path, "qv", config={"layers_to_transform": [0, 1, 2, 3, 7]})
    with pytest.raises(LoraboundError, match=r"names layer 7 but the model has layers 0\.\.3"):
        prune_adapter(folder, 1, tmp_path / "out", model_spec=str(world.base))


def test_consistent_adapters_load_every_tensor(world):
    """The good adapters (plain, DoRA, all-linear) load; every file tensor equals the weight PEFT holds."""
    for name in ("qv", "all", "dora"):
        model = load_adapter(tiny_llama(), world.root / name)
        state = load_file(str(world.root / name / WEIGHTS))
        params = {n.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector").replace(".default", ""): p
                  for n, p in model.named_parameters()}
        for tensor_name, tensor in state.items():
            torch.testing.assert_close(params[tensor_name], tensor, rtol=0, atol=0)
        assert AdapterFiles.read(world.root / name).lora_params() == sum(t.numel() for t in state.values())


def test_restricted_adapter_with_matching_layers_to_transform_loads(tmp_path, world):
    """An adapter trained on some layers only (layers_to_transform) agrees with its tensors."""
    folder = tmp_path / "some-layers"
    tiny_lora(target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2]).save_pretrained(folder)
    model = load_adapter(tiny_llama(), folder)
    assert sorted({int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n}) \
        == [1, 2]
    assert AdapterFiles.read(folder, num_layers=4).layers() == [1, 2]


@pytest.mark.parametrize("command", ["analyze", "evaluate", "run", "prune"])
def test_cli_refuses_target_modules_mismatch(capsys, tmp_path, world, command):
    folder = altered(world, tmp_path, "all", config={"target_modules": ["q_proj", "v_proj"]})
    before = folder_hashes(folder)
    out = tmp_path / "out"
    args = (["prune", "--adapter", folder, "--boundary", 1, "--out", out] if command == "prune"
            else [command, *world.small, "--adapter", folder, "--out", out])
    line = refused_alone(capsys, *args)
    assert "does not select, so PEFT would ignore them" in line and str(folder) in line
    assert folder_hashes(folder) == before
    # Nothing that blocks the corrected rerun: no folder, an empty one, or a run folder holding only run.json.
    assert not out.exists() or [p.name for p in out.iterdir() if not p.name.startswith(".lorabound")] in \
        ([], ["run.json"])


# ---------------------------------------------------------------------------
# Item 4: non-finite weights
# ---------------------------------------------------------------------------

def poison(value: float, name: str = f"{PREFIX}.2.self_attn.v_proj.lora_B.weight"):
    def change(state):
        state[name][0, 0] = value
    return change


@pytest.mark.parametrize("value,word", [(float("nan"), "1 NaN, 0 infinite"), (float("inf"), "0 NaN, 1 infinite")])
def test_non_finite_weights_are_refused_at_load_and_by_prune(tmp_path, world, value, word):
    folder = altered(world, tmp_path, "qv", tensors=poison(value))
    before = folder_hashes(folder)
    message = rf"tensor {PREFIX}\.2\.self_attn\.v_proj\.lora_B\.weight holds non-finite weights \({word} of 64\)"
    # (v_proj writes 2 kv heads x 8 = 16 features; r 4: 64 weights)
    with pytest.raises(LoraboundError, match=message):
        load_adapter(tiny_llama(), folder)
    with pytest.raises(LoraboundError, match=message):
        prune_adapter(folder, 1, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert folder_hashes(folder) == before


@pytest.mark.parametrize("command", ["analyze", "evaluate", "run", "prune"])
def test_cli_refuses_nan_adapter_before_writing(capsys, tmp_path, world, command):
    folder = altered(world, tmp_path, "qv", tensors=poison(float("nan")))
    before = folder_hashes(folder)
    out = tmp_path / "out"
    args = (["prune", "--adapter", folder, "--boundary", 1, "--out", out] if command == "prune"
            else [command, *world.small, "--adapter", folder, "--out", out])
    line = refused_alone(capsys, *args)
    assert "holds non-finite weights" in line and "v_proj.lora_B.weight" in line
    assert folder_hashes(folder) == before
    assert not out.exists() or [p.name for p in out.iterdir() if not p.name.startswith(".lorabound")] in \
        ([], ["run.json"])


def test_nan_adapter_refused_by_a_real_process(tmp_path, world):
    """The installed command as a user runs it: exit 2, exactly one stderr line, no traceback, no output."""
    folder = altered(world, tmp_path, "qv", tensors=poison(float("nan")))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "lorabound.cli", "--quiet", "analyze", *map(str, world.small),
                           "--adapter", str(folder), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: adapter "), done.stderr
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------
# Item 8: the wrong kind of model
# ---------------------------------------------------------------------------

def save_with_tokenizer(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wrong_models(tmp_path_factory):
    """A model folder whose lm_head was deleted, sequence classifiers and a bare decoder (also with tied
    embeddings, which would load as a causal LM without a missing weight), a BERT encoder with an LM head, and a
    tied-head causal LM."""
    from transformers import BertConfig, BertLMHeadModel, LlamaForSequenceClassification, LlamaModel

    root = tmp_path_factory.mktemp("wrong-models")
    headless = save_with_tokenizer(tiny_llama(), root / "headless")
    state = load_file(str(headless / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(headless / "model.safetensors"), metadata={"format": "pt"})
    config = tiny_llama().config
    config.num_labels = 3
    torch.manual_seed(0)
    save_with_tokenizer(LlamaForSequenceClassification(config), root / "classifier")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    save_with_tokenizer(LlamaForSequenceClassification(config), root / "classifier-tied")
    torch.manual_seed(0)
    save_with_tokenizer(LlamaModel(config), root / "bare-tied")
    torch.manual_seed(0)
    save_with_tokenizer(BertLMHeadModel(BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64)), root / "bert")
    tied = tiny_llama().config
    tied.tie_word_embeddings = True
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM
    save_with_tokenizer(LlamaForCausalLM(tied), root / "tied")
    return root


@pytest.mark.parametrize("name,message", [
    ("headless", r"model '.*headless' has no output head \(lm_head\.weight is missing from its weights, so "
                 r"transformers would initialise it at random\): it is not a causal language model"),
    ("classifier", r"was saved as LlamaForSequenceClassification, not as a causal language model"),
    ("classifier-tied", r"was saved as LlamaForSequenceClassification, not as a causal language model"),
    ("bare-tied", r"was saved as LlamaModel, not as a causal language model"),
    ("bert", r"model '.*bert' \(BertLMHeadModel\) is not a causal language model: its prediction at a position "
             r"depends on later tokens"),
])
def test_wrong_kind_of_model_is_refused(wrong_models, name, message):
    before = folder_hashes(wrong_models / name)
    with pytest.raises(LoraboundError, match=message) as err:
        load_model(str(wrong_models / name))
    assert "\n" not in str(err.value)
    assert folder_hashes(wrong_models / name) == before


def test_tied_output_head_is_not_missing(wrong_models):
    """A head that shares the embedding matrix is absent from the files by design: accepted."""
    model, _ = load_model(str(wrong_models / "tied"))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("name", ["headless", "bert"])
def test_cli_train_and_analyze_refuse_the_wrong_kind_of_model(capsys, tmp_path, world, wrong_models, name):
    data = ["--data", world.data, "--template", TEMPLATE, "--max-length", 64, "--validation-size", 3,
            "--test-size", 3]
    line = refused_alone(capsys, "train", "--model", wrong_models / name, *data, "--out", tmp_path / "adapter",
                   "--epochs", 0.1)
    assert "causal language model" in line
    line = refused_alone(capsys, "analyze", "--model", wrong_models / name, *data, "--adapter", world.root / "qv",
                   "--out", tmp_path / "run")
    assert "causal language model" in line
    assert not (tmp_path / "adapter").exists()
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# ---------------------------------------------------------------------------
# Item 4: training that diverges with valid flags
# ---------------------------------------------------------------------------

def test_cli_train_with_a_huge_lr_exits_2_and_writes_no_adapter(capsys, tmp_path, world):
    out = tmp_path / "adapter"
    line = refused_alone(capsys, "train", "--model", world.base, "--data", world.data, "--template", TEMPLATE,
                   "--max-length", 64, "--validation-size", 2, "--test-size", 2, "--rank", 4, "--batch-size", 2,
                   "--lr", 1e6, "--out", out)
    assert line.startswith("error: training diverged at step ") and "lower --lr (now 1e+06" in line
    assert not out.exists()


# ---------------------------------------------------------------------------
# The embedded model
# ---------------------------------------------------------------------------

@pytest.mark.real
def test_real_demo_adapter_loads_every_tensor_and_null_targets_are_refused(tmp_path, real_model):
    """The demo's LoRA (r 16 on q,k,v,o,gate,up,down of all 30 layers, as `train` configures it) saved by PEFT
    loads with every tensor used; the same adapter with `target_modules: null` (PEFT would load only q_proj
    and v_proj: 921,600 of 4,884,480 parameters) is refused."""
    from peft import get_peft_model

    from lorabound.options import TrainSettings
    from lorabound.training import lora_config

    folder = tmp_path / "demo-like"
    model, _ = load_model("smollm2-135m")
    peft_model = get_peft_model(model, lora_config(TrainSettings()))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)  # trained-like: B is no longer zero
    peft_model.save_pretrained(folder)
    before = folder_hashes(folder)

    loaded = load_adapter(load_model("smollm2-135m")[0], folder, model_name="smollm2-135m")
    lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    per_layer = 16 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)  # q,o; k,v; gate,up,down
    assert sum(p.numel() for p in lora.values()) == 30 * per_layer == 4_884_480
    assert len(lora) == len(load_file(str(folder / WEIGHTS))) == 30 * 7 * 2

    null = altered(SimpleNamespace(root=tmp_path), tmp_path, "demo-like", config={"target_modules": None})
    with pytest.raises(LoraboundError, match=r"holds tensor .*_proj\.lora_[AB]\.weight \(and 299 more\), which its "
                                             r"adapter_config\.json \(target_modules null\) does not select"):
        load_adapter(load_model("smollm2-135m")[0], null)
    assert folder_hashes(folder) == before


@pytest.mark.parametrize("case", ["nan", "r differs"])
def test_adapter_files_are_checked_before_the_model_is_loaded(capsys, tmp_path, world, monkeypatch, case):
    """What needs no model is refused before one is loaded (a large model takes minutes)."""
    import lorabound.model as model  # ModelOptions.load imports load_model from here when it runs

    if case == "nan":
        folder = altered(world, tmp_path, "qv", tensors=poison(float("nan")))
    else:
        folder = altered(world, tmp_path, "qv", config={"r": 8})

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapter files were checked")

    monkeypatch.setattr(model, "load_model", no_model)
    line = refused_alone(capsys, "analyze", *world.small, "--adapter", folder, "--out", tmp_path / "out")
    assert ("holds non-finite weights" if case == "nan" else "has rank 4 but adapter_config.json gives it r 8") in line
