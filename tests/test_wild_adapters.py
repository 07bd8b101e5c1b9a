"""Adapters and models from the wild: every architecture x adapter variant is exact, or refused up front.

For each tiny model (built from a config, no downloads) and each adapter variant PEFT can write for it
(init_lora_weights=False, so an export that re-creates a dropped module shows in the logits):
- the truncation curve equals PEFT's own per-module switch (each LoRA module's enable_adapters, the layer read
  here from the module's path, not from lorabound's code; b = -1: PEFT's disable_adapter);
- a peft export at a boundary, of a layer set and of a per-group selection reloads with PeftModel.from_pretrained
  without a PEFT warning, with LoRA on exactly the kept modules, and gives the in-memory logits;
or lorabound refuses the adapter with one line before loading any model.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import (BloomConfig, BloomForCausalLM, CodeGenConfig, CodeGenForCausalLM, FalconConfig,
                          FalconForCausalLM, GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM,
                          GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MptConfig,
                          MptForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from lorabound.analysis.curves import analyze
from lorabound.errors import LoraboundError
from lorabound.model import check_adapter_files, load_adapter, load_model
from lorabound.lora.selection import Selection
from lorabound.lora.masking import keep_selection
from lorabound.lora.export import prune_adapter

from test_architectures import mean_prob
from test_selection_export import logits
from tiny import tiny_encoded, tiny_tokenizer

VOCAB = 320
LAYERS = 3
_LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
              bos_token_id=None, eos_token_id=1)
_OPT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, ffn_dim=64, num_attention_heads=4,
            max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=1, word_embed_proj_dim=32,
            enable_bias=True)
_FALCON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, bias=True,
               pad_token_id=0, eos_token_id=1, bos_token_id=1)

# name: (model class, config, its layer stack's path, attention and MLP modules to target)
ARCHITECTURES = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**_LLAMA), "model.layers", ["q_proj", "v_proj", "down_proj"]),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**{**_LLAMA, "vocab_size": VOCAB + 16}), "model.layers", ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (GPT2LMHeadModel, lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4,
                                                 n_positions=128, eos_token_id=1), "transformer.h",
             ["c_attn", "c_fc"]),
    "gpt-neox": (GPTNeoXForCausalLM, lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                           num_hidden_layers=LAYERS, num_attention_heads=4,
                                                           max_position_embeddings=128, use_parallel_residual=True),
                 "gpt_neox.layers", ["query_key_value", "dense_4h_to_h"]),
    "gpt-neox-sequential": (GPTNeoXForCausalLM,
                            lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=LAYERS, num_attention_heads=4,
                                                  max_position_embeddings=128, use_parallel_residual=False),
                            "gpt_neox.layers", ["query_key_value", "dense_4h_to_h"]),
    "falcon": (FalconForCausalLM, lambda: FalconConfig(**_FALCON, new_decoder_architecture=True, num_kv_heads=2),
               "transformer.h", ["query_key_value", "dense_4h_to_h"]),
    "falcon-7b-style": (FalconForCausalLM, lambda: FalconConfig(**_FALCON, multi_query=True, parallel_attn=True),
                        "transformer.h", ["query_key_value", "dense_4h_to_h"]),
    "falcon-rw-style": (FalconForCausalLM, lambda: FalconConfig(**_FALCON, multi_query=False, parallel_attn=False,
                                                                alibi=True),
                        "transformer.h", ["query_key_value", "dense_4h_to_h"]),
    "bloom": (BloomForCausalLM, lambda: BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=LAYERS, n_head=4,
                                                    initializer_range=0.5,  # default: logits nearly uniform
                                                    pad_token_id=0, eos_token_id=1, bos_token_id=1),
              "transformer.h", ["query_key_value", "dense_4h_to_h"]),
    "codegen": (CodeGenForCausalLM, lambda: CodeGenConfig(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4,
                                                          rotary_dim=4, n_positions=128, n_ctx=128,
                                                          bos_token_id=1, eos_token_id=1),
                "transformer.h", ["qkv_proj", "fc_out"]),
    "gptj": (GPTJForCausalLM, lambda: GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, rotary_dim=4,
                                                 n_positions=128, bos_token_id=1, eos_token_id=1),
             "transformer.h", ["q_proj", "v_proj", "fc_out"]),
    "mpt": (MptForCausalLM, lambda: MptConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=LAYERS,
                                              max_seq_len=128, expansion_ratio=2, pad_token_id=0, eos_token_id=1),
            "transformer.blocks", ["Wqkv", "down_proj"]),
    "opt": (OPTForCausalLM, lambda: OPTConfig(**_OPT), "model.decoder.layers", ["q_proj", "v_proj", "fc2"]),
    "opt-projected": (OPTForCausalLM, lambda: OPTConfig(**{**_OPT, "word_embed_proj_dim": 16}),
                      "model.decoder.layers", ["q_proj", "v_proj", "fc2"]),
    "opt-post-norm": (OPTForCausalLM, lambda: OPTConfig(**{**_OPT, "do_layer_norm_before": False,
                                                           "word_embed_proj_dim": 16, "init_std": 0.3}),
                      "model.decoder.layers", ["q_proj", "v_proj", "fc2"]),
}


# Variants also exported merged (a whole model each: the others' LoRA merges the same way).
MERGED_VARIANTS = ("exact-paths", "all-linear", "dora", "modules-to-save", "patterns")


def exact_paths(arch: str) -> list[str]:
    _, _, stack, names = ARCHITECTURES[arch]
    model = tiny_model(arch)
    return sorted(name for name, _ in model.named_modules()
                  if name.startswith(f"{stack}.") and name.rpartition(".")[2] in names)


# variant: LoraConfig arguments (a callable of the architecture for those that depend on it)
VARIANTS = {
    "subset": {},
    "all-linear": {"target_modules": "all-linear"},
    "exact-paths": lambda arch: {"target_modules": exact_paths(arch)},
    "patterns": lambda arch: {"rank_pattern": {ARCHITECTURES[arch][3][0]: 2, exact_paths(arch)[-1]: 6},
                              "alpha_pattern": {ARCHITECTURES[arch][3][-1]: 16}},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "dropout": {"lora_dropout": 0.2},
    "lora-bias": {"lora_bias": True},
    "bias-lora-only": {"bias": "lora_only"},
    "bias-all": {"bias": "all"},
    "layers-to-transform": {"layers_to_transform": [0, 2]},
    "modules-to-save": {"modules_to_save": ["lm_head"]},
    "bf16-storage": {},
}


def tiny_model(arch: str):
    model_class, config, _, _ = ARCHITECTURES[arch]
    torch.manual_seed(0)
    return model_class(config()).eval()


def lora_config(arch: str, variant: str) -> LoraConfig:
    extra = VARIANTS[variant]
    extra = extra(arch) if callable(extra) else extra
    extra = {"target_modules": ARCHITECTURES[arch][3], **extra}
    return LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, fan_in_fan_out=arch == "gpt2", **extra)


def write_case(root, arch: str, variant: str):
    """The base model's folder and the adapter PEFT writes for it; both as a user would have them."""
    base = tiny_model(arch)
    base.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), lora_config(arch, variant))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name or "base_layer.bias" in name or (variant == "bias-all" and "bias" in name):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)  # trained copies differ from the base
            if variant == "bf16-storage" and ("lora_" in name or "modules_to_save" in name):
                p.data = p.data.to(torch.bfloat16)
    peft_model.save_pretrained(root / "adapter")
    return base, root / "adapter"


def holds_trained_biases(adapter) -> bool:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        return any(name.endswith(".bias") and ".lora_" not in name and "lm_head" not in name for name in f.keys())


def peft_switch_curve(model, stack: str, boundaries, encoded, pad_token_id) -> list[float]:
    """Mean probability at each b with PEFT's own switches: disable_adapter for b = -1, else each module's
    enable_adapters by the layer index in its path."""
    curve = []
    modules = [(int(m[1]), module) for name, module in model.named_modules() if isinstance(module, LoraLayer)
               and (m := re.search(rf"{re.escape(stack)}\.(\d+)\.", name))]
    for b in boundaries:
        if b < 0:
            with model.disable_adapter():
                curve.append(mean_prob(model, encoded, pad_token_id))
            continue
        for layer, module in modules:
            module.enable_adapters(layer <= b)
        curve.append(mean_prob(model, encoded, pad_token_id))
    for _, module in modules:
        module.enable_adapters(True)
    return curve


def selections(model) -> list[Selection]:
    groups = sorted({g for g in ("attention", "mlp", "other") if any(
        (m := re.search(r"\.\d+\.([^.]+)\.", n)) and _group(m[1]) == g
        for n, mod in model.named_modules() if isinstance(mod, LoraLayer))})
    per_group = {g: (0 if i == 0 else 2) for i, g in enumerate(groups)}
    return [Selection.prefix(1), Selection.layers([0, 2]), Selection.per_group(per_group)]


def oracle_kept(model, stack: str, selection: Selection) -> set[str]:
    """The LoRA module paths `selection` keeps, decided from the paths: the layer index after the stack's path,
    the group from the name that follows it; modules outside the stack are always kept."""
    kept = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            path = name.removeprefix("base_model.model.")
            match = re.fullmatch(rf"{re.escape(stack)}\.(\d+)\.([^.]+).*", path)
            if match is None or selection.keeps(int(match[1]), _group(match[2])):
                kept.add(path)
    return kept


def _group(part: str) -> str:
    part = part.lower()
    return "attention" if "attn" in part or "attention" in part else "mlp" if "mlp" in part or "ffn" in part \
        else "other"


def peft_load(base, folder):
    """PEFT's own loading of the adapter in `folder` onto a copy of `base`: (the model, the warnings PEFT gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    return model, {str(w.message) for w in caught if "/peft/" in w.filename}


def peft_warnings(base, folder) -> set[str]:
    return peft_load(base, folder)[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster than several fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# Every architecture with these variants, every variant on these architectures; the rest of the product is
# marked `matrix` (a few minutes on 2 cores): `pytest -m "not matrix"` leaves it out.
CORE_ARCHITECTURES = ("llama", "gpt2", "falcon", "opt-post-norm")
CORE_VARIANTS = ("subset", "exact-paths", "all-linear")
CASES = [pytest.param(arch, variant, id=f"{arch}-{variant}",
                      marks=() if arch in CORE_ARCHITECTURES or variant in CORE_VARIANTS else pytest.mark.matrix)
         for arch in ARCHITECTURES for variant in VARIANTS]


@pytest.mark.parametrize("arch,variant", CASES)
def test_curve_and_exports_are_exact_or_refused(tmp_path, tok, arch, variant):
    base, adapter = write_case(tmp_path, arch, variant)
    stack = ARCHITECTURES[arch][2]
    if variant.startswith("bias-") and holds_trained_biases(adapter):
        with pytest.raises(LoraboundError, match="trains the base model's biases") as err:
            check_adapter_files(adapter)  # before any model is loaded
        assert "\n" not in str(err.value)
        return
    model = load_adapter(copy.deepcopy(base), adapter)

    encoded = tiny_encoded(tok, max_length=64)
    encoded.input_ids, encoded.labels, encoded.indices = encoded.input_ids[:3], encoded.labels[:3], encoded.indices[:3]
    curve = analyze(model, encoded, batch_size=4, pad_token_id=tok.pad_token_id, progress=False,
                    curves=("truncation",))["truncation"]
    expected = peft_switch_curve(model, stack, curve["boundary"], encoded, tok.pad_token_id)
    assert curve["boundary"][0] == -1
    torch.testing.assert_close(torch.tensor(curve["mean_prob"]), torch.tensor(expected), atol=2e-6, rtol=2e-6)
    assert max(expected) - min(expected) > 1e-6  # the adapter changes the curve

    source_warnings = peft_warnings(base, adapter)  # e.g. lora_bias on a layer without a bias: not the export's
    for i, selection in enumerate(selections(model)):
        out = tmp_path / f"export{i}"
        prune_adapter(adapter, selection, out, model_spec=str(tmp_path / "base"))
        loaded, caught = peft_load(base, out)
        assert caught <= source_warnings
        got = {n.removeprefix("base_model.model.") for n, m in loaded.named_modules() if isinstance(m, LoraLayer)}
        assert got == oracle_kept(model, stack, selection), (selection, json.loads((out / "adapter_config.json")
                                                                                   .read_text()))
        with keep_selection(model, selection):
            expected_logits = logits(model)
        torch.testing.assert_close(logits(loaded), expected_logits, atol=1e-5, rtol=1e-5)

    # The other formats at b = 1: zero-fill (every tensor name, dropped ones zero) and merged (a whole model).
    with keep_selection(model, Selection.prefix(1)):
        expected_logits = logits(model)
    if variant != "dora":  # zero-fill refuses DoRA: its magnitude vector rescales the base weight
        prune_adapter(adapter, 1, tmp_path / "zero-fill", format="zero-fill", model_spec=str(tmp_path / "base"))
        loaded, caught = peft_load(base, tmp_path / "zero-fill")
        assert caught <= source_warnings
        torch.testing.assert_close(logits(loaded), expected_logits, atol=1e-5, rtol=1e-5)
    if variant in MERGED_VARIANTS:
        prune_adapter(adapter, 1, tmp_path / "merged", format="merged", model_spec=str(tmp_path / "base"))
        merged = load_model(str(tmp_path / "merged"))[0]
        scale = float(expected_logits.abs().max())  # merging sums in another order: float error grows with it
        torch.testing.assert_close(logits(merged), expected_logits, atol=1e-5 * max(1.0, scale), rtol=1e-5)


# ---- the classes of hostile adapters and models, several members each ------------------------------------

def _adapter_with(root, name: str, num_layers: int = 3, **config_changes):
    """A tiny Llama adapter (q, v, down) saved by PEFT, its adapter_config.json then changed as a user might."""
    from tiny import tiny_lora

    folder = root / name
    tiny_lora(num_layers=num_layers, target_modules=["q_proj", "v_proj", "down_proj"]).save_pretrained(folder)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return folder


@pytest.mark.parametrize("field,value", [
    ("target_modules", 5), ("target_modules", {"q_proj": 1}), ("target_modules", [1, 2]),
    ("layers_pattern", 3), ("layers_pattern", ["layers", 0]), ("layers_pattern", {"x": "layers"}),
    ("layers_to_transform", "0,1"), ("layers_to_transform", [0.5, 1]), ("layers_to_transform", {"0": 1}),
    ("layers_to_transform", True), ("modules_to_save", "lm_head"), ("bias", "some"), ("use_dora", "yes"),
])
def test_adapter_config_fields_of_the_wrong_type_give_one_line(capsys, tmp_path, field, value):
    from clitools import refused_alone

    adapter = _adapter_with(tmp_path, "adapter", **{field: value})
    line = refused_alone(capsys, "prune", "--adapter", adapter, "--boundary", 0, "--out", tmp_path / "out")
    assert f": {field} is {json.dumps(value)}, but it must be" in line
    line = refused_alone(capsys, "prune", "--adapter", adapter, "--layers", "0,2", "--out", tmp_path / "out")
    assert f": {field} is " in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes,refused", [
    ({"lora_alpha": 0}, True),
    ({"lora_alpha": 0.0, "alpha_pattern": {"v_proj": 0}}, True),
    ({"lora_alpha": 0, "alpha_pattern": {"v_proj": 16}}, False),  # v_proj still changes the model
    ({"lora_alpha": 8}, False),
])
def test_an_adapter_that_changes_nothing_is_refused(tmp_path, changes, refused):
    adapter = _adapter_with(tmp_path, "adapter", **changes)
    if refused:
        with pytest.raises(LoraboundError, match=r"lora_alpha 0, which scales every LoRA update to zero"):
            check_adapter_files(adapter)
    else:
        check_adapter_files(adapter)


@pytest.mark.parametrize("task_type", ["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"])
def test_adapters_for_another_head_are_refused(tmp_path, task_type):
    from lorabound.model import check_lora_config

    adapter = _adapter_with(tmp_path, "adapter", task_type=task_type)
    with pytest.raises(LoraboundError, match=rf"task_type {task_type}\); lorabound analyses adapters of causal"):
        check_lora_config(json.loads((adapter / "adapter_config.json").read_text()), adapter)


def _exact_adapter(root, num_layers: int, layers=None):
    from tiny import tiny_lora

    layers = range(num_layers) if layers is None else layers
    folder = root / f"exact-{num_layers}-{len(layers)}"
    tiny_lora(num_layers=num_layers, target_modules=[f"model.layers.{i}.self_attn.{m}" for i in layers
                                                     for m in ("q_proj", "v_proj")]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("adapter_layers,model_layers", [(2, 3), (2, 4), (3, 4), (1, 4)])
def test_an_adapter_made_for_fewer_layers_is_refused_by_every_path(tmp_path, adapter_layers, model_layers):
    """Exact-path targets (PEFT writes them for all-linear under 20 modules) on layers 0..k-1 of a bigger model:
    analysis (load_adapter), peft and merged exports refuse it; the same adapter on its own model loads."""
    from tiny import tiny_llama, tiny_tokenizer

    adapter = _exact_adapter(tmp_path, adapter_layers)
    tiny_llama(model_layers).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    message = rf"exact module paths on layers 0\.\.{adapter_layers - 1} only and this model has {model_layers}"
    with pytest.raises(LoraboundError, match=message):
        load_adapter(tiny_llama(model_layers), adapter)
    for format in ("peft", "merged"):
        with pytest.raises(LoraboundError, match=message):
            prune_adapter(adapter, 0, tmp_path / format, model_spec=str(tmp_path / "base"), format=format)
        assert not (tmp_path / format).exists()
    load_adapter(tiny_llama(adapter_layers), adapter)


def test_exact_paths_on_chosen_layers_and_exports_of_a_prefix_are_accepted(tmp_path):
    """Not the neighbours of the class above: exact paths on layers 1 and 3 (not a prefix), and lorabound's own
    export at b = 1 of an exact-path adapter (its layers_to_transform says the subset is meant)."""
    from tiny import tiny_llama

    load_adapter(tiny_llama(4), _exact_adapter(tmp_path, 4, layers=[1, 3]))
    prune_adapter(_exact_adapter(tmp_path, 4), 1, tmp_path / "b1")
    config = json.loads((tmp_path / "b1" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [0, 1]
    assert sorted(config["target_modules"]) == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1)
                                                for m in ("q_proj", "v_proj")]
    load_adapter(tiny_llama(4), tmp_path / "b1")


@pytest.mark.parametrize("adapter_layers,model_layers", [(2, 4), (3, 4)])
def test_a_merged_export_onto_a_model_with_more_layers_is_refused(tmp_path, adapter_layers, model_layers):
    """Module-name targets: the pruned adapter alone (layers 0..b) would fit the bigger model; the whole one
    does not, and the merged export says so before writing anything."""
    from tiny import tiny_llama, tiny_lora, tiny_tokenizer

    tiny_lora(num_layers=adapter_layers, target_modules=["q_proj", "v_proj"]).save_pretrained(tmp_path / "adapter")
    tiny_llama(model_layers).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    with pytest.raises(LoraboundError, match=r"lacks tensor base_model\.model\.model\.layers\.\d\.self_attn"):
        prune_adapter(tmp_path / "adapter", 0, tmp_path / "merged", model_spec=str(tmp_path / "base"),
                      format="merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("format", ["peft", "merged"])
def test_an_adapter_made_for_more_layers_is_refused_before_any_work(tmp_path, format):
    from tiny import tiny_llama, tiny_lora, tiny_tokenizer

    tiny_lora(num_layers=4, target_modules=["q_proj", "v_proj"]).save_pretrained(tmp_path / "adapter")
    tiny_llama(2).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    with pytest.raises(LoraboundError, match=r"module model\.layers\.2\.\S+ not found \(this model has 2 layers\)"):
        prune_adapter(tmp_path / "adapter", 0, tmp_path / "out", model_spec=str(tmp_path / "base"), format=format)
    assert not (tmp_path / "out").exists()


def test_rank_and_alpha_pattern_keys_of_dropped_modules_leave_the_export(tmp_path):
    from tiny import tiny_llama, tiny_lora

    patterns = {"rank_pattern": {"model.layers.3.self_attn.q_proj": 2, "v_proj": 6, "down_proj": 3},
                "alpha_pattern": {"model.layers.2.self_attn.v_proj": 32, "q_proj": 16}}
    model = tiny_lora(target_modules=["q_proj", "v_proj"], **patterns)  # down_proj: a key that never matched
    model.save_pretrained(tmp_path / "adapter")
    prune_adapter(tmp_path / "adapter", 1, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"v_proj": 6}
    assert config["alpha_pattern"] == {"q_proj": 16}
    assert not peft_warnings(tiny_llama(), tmp_path / "out")
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out")).eval()
    assert loaded.base_model.model.model.layers[1].self_attn.v_proj.r["default"] == 6
    with keep_selection(model, Selection.prefix(1)):
        torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("format", ["peft", "zero-fill", "merged"])
@pytest.mark.parametrize("other", ["wider", "narrower-mlp", "other-names"])
def test_prune_with_another_model_of_the_same_depth_is_refused_before_any_work(tmp_path, format, other):
    """Shapes and module names against the --model's config (no weights): every export format."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tiny import tiny_lora

    tiny_lora(num_layers=3, target_modules=["q_proj", "v_proj", "down_proj"]).save_pretrained(tmp_path / "adapter")
    config = {**_LLAMA, "hidden_size": 48} if other == "wider" else {**_LLAMA, "intermediate_size": 96}
    model = (GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4))
             if other == "other-names" else LlamaForCausalLM(LlamaConfig(**config)))
    model.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    expected = {"wider": r"lora_[AB] of model\.layers\.0\.\S+ expects (in|out)_features 32, the model has 48",
                "narrower-mlp": r"lora_A of model\.layers\.0\.mlp\.down_proj expects in_features 64, the model has 96",
                "other-names": r"module model\.layers\.0\.\w+\.\w+ not found"}[other]
    with pytest.raises(LoraboundError, match=rf"was trained for a different base model than .*base: {expected}"):
        prune_adapter(tmp_path / "adapter", 0, tmp_path / "out", model_spec=str(tmp_path / "base"), format=format)
    assert not (tmp_path / "out").exists()


@pytest.mark.real
def test_exact_path_export_on_the_real_model(real_model, tmp_path):
    """SmolLM2-135M with exact-path targets (q, v of every layer) and a rank_pattern key on a dropped layer,
    random init_lora_weights=False: the export at b = 9 reloads with LoRA on layers 0..9 only, no PEFT warning,
    and the in-memory logits."""
    base, _ = real_model
    paths = [f"model.layers.{i}.self_attn.{m}" for i in range(base.config.num_hidden_layers)
             for m in ("q_proj", "v_proj")]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=paths, init_lora_weights=False,
                        rank_pattern={"model.layers.20.self_attn.q_proj": 2})
    model = get_peft_model(copy.deepcopy(base), config).eval()
    model.save_pretrained(tmp_path / "adapter")
    prune_adapter(tmp_path / "adapter", 9, tmp_path / "out", num_layers=base.config.num_hidden_layers)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["rank_pattern"] == {}
    loaded, caught = peft_load(base, tmp_path / "out")
    assert not caught
    kept = {n.removeprefix("base_model.model.") for n, m in loaded.named_modules() if isinstance(m, LoraLayer)}
    assert kept == {p for p in paths if int(p.split(".")[2]) <= 9}
    with keep_selection(model, Selection.prefix(9)):
        expected = logits(model)
    assert not torch.allclose(expected, logits(model), atol=1e-3)  # the layers above 9 mattered
    torch.testing.assert_close(logits(loaded), expected, atol=1e-4, rtol=1e-4)
