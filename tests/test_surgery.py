"""In-memory dropping and exported adapters give the same model, exactly where they should."""

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from lorabound.errors import LoraboundError
from lorabound.runtime.files import folder_hashes
from lorabound.model import load_model
from lorabound.lora.masking import adapter_layers, keep_lora, keep_up_to, lora_modules
from lorabound.lora.export import AdapterFiles, exported_bytes, prune_adapter

from tiny import tiny_llama, tiny_lora, tiny_tokenizer

INPUT = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 12]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def restricted_copy(peft_model, layers, **config):
    """A fresh PeftModel whose adapter only ever had `layers`, with the same LoRA weights there."""
    base = tiny_llama()
    cfg = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
           "gate_proj", "up_proj", "down_proj"], "layers_to_transform": list(layers), "layers_pattern": "layers",
           **config}
    other = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **cfg)).eval()
    source = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "lora_" in name:
                p.copy_(source[name])
    return other


@pytest.fixture
def peft_model():
    return tiny_lora()


@pytest.fixture
def saved(tmp_path, peft_model):
    """The tiny base model saved as a model folder, and its adapter saved by PEFT."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def test_keep_lora_equals_adapter_without_those_layers(peft_model):
    with keep_lora(peft_model, [0, 1]):
        dropped = logits(peft_model)
    assert torch.equal(dropped, logits(restricted_copy(peft_model, [0, 1])))
    assert not torch.allclose(dropped, logits(peft_model))  # the upper layers' LoRA mattered


def test_keep_lora_restores_model_on_exit_and_on_error(peft_model):
    before = logits(peft_model)
    grads = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    with pytest.raises(RuntimeError):
        with keep_up_to(peft_model, 0):
            assert not torch.equal(logits(peft_model), before)
            raise RuntimeError("boom")
    assert torch.equal(logits(peft_model), before)
    assert grads == {n: p.requires_grad for n, p in peft_model.named_parameters()}


def test_keep_lora_by_module_type(peft_model):
    with keep_lora(peft_model, range(4), module_types=["attention"]):
        attention_only = logits(peft_model)
    reference = restricted_copy(peft_model, range(4))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name and "mlp" in name:
                p.zero_()
    assert torch.allclose(attention_only, logits(reference), atol=1e-6)
    assert {m.group for m in lora_modules(peft_model)} == {"attention", "mlp"}


def test_boundary_extremes_in_memory(peft_model):
    full = logits(peft_model)  # no context: every LoRA layer on
    with peft_model.disable_adapter():
        base = logits(peft_model)
    assert not torch.allclose(full, base, atol=1e-4)  # the adapter changes the output, so the checks below can fail
    with keep_up_to(peft_model, 3):
        assert torch.equal(logits(peft_model), full)
    with keep_up_to(peft_model, -1):
        assert torch.equal(logits(peft_model), base)
    assert torch.equal(logits(peft_model), full)  # restored on exit
    with pytest.raises(LoraboundError, match="outside -1..3"):
        keep_up_to(peft_model, 4)


def load_exported(folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()
    problems = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not problems, problems
    return model


@pytest.mark.parametrize("boundary", [0, 2, 3])
def test_peft_export_matches_in_memory_drop(tmp_path, peft_model, saved, boundary):
    _, adapter_dir = saved
    result = prune_adapter(adapter_dir, boundary, tmp_path / "out", num_layers=4)
    exported = load_exported(tmp_path / "out")
    with keep_up_to(peft_model, boundary):
        expected = logits(peft_model)
    assert torch.allclose(logits(exported), expected, atol=1e-6)
    assert adapter_layers(exported) == list(range(boundary + 1))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == list(range(boundary + 1))
    assert isinstance(config["target_modules"], list)  # all-linear became an explicit list
    per_layer = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n) // 4
    assert result.lora_params_after == per_layer * (boundary + 1)


def test_full_boundary_reproduces_original(tmp_path, peft_model, saved):
    _, adapter_dir = saved
    prune_adapter(adapter_dir, 3, tmp_path / "out", num_layers=4)
    assert torch.allclose(logits(load_exported(tmp_path / "out")), logits(peft_model), atol=1e-6)


@pytest.mark.parametrize("boundary", [-1, 1])
def test_zero_fill_export(tmp_path, peft_model, saved, boundary):
    _, adapter_dir = saved
    prune_adapter(adapter_dir, boundary, tmp_path / "out", format="zero-fill", num_layers=4)
    exported = load_exported(tmp_path / "out")
    assert adapter_layers(exported) == [0, 1, 2, 3]  # every tensor name is still there
    with keep_up_to(peft_model, boundary):
        expected = logits(peft_model)
    assert torch.allclose(logits(exported), expected, atol=1e-6)


@pytest.mark.parametrize("boundary", [-1, 2])
def test_merged_export(tmp_path, peft_model, saved, boundary):
    base_dir, adapter_dir = saved
    prune_adapter(adapter_dir, boundary, tmp_path / "merged", format="merged", model_spec=str(base_dir))
    merged, _ = load_model(str(tmp_path / "merged"))
    with keep_up_to(peft_model, boundary):
        expected = logits(peft_model)
    assert torch.allclose(logits(merged), expected, atol=1e-5)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_input_adapter_is_never_written(tmp_path, saved):
    base_dir, adapter_dir = saved
    before = folder_hashes(adapter_dir)
    prune_adapter(adapter_dir, 1, tmp_path / "a", num_layers=4)
    prune_adapter(adapter_dir, 1, tmp_path / "b", format="zero-fill")
    prune_adapter(adapter_dir, 1, tmp_path / "c", format="merged", model_spec=str(base_dir))
    with pytest.raises(LoraboundError, match="never writes into its inputs"):
        prune_adapter(adapter_dir, 1, adapter_dir, overwrite=True)
    assert folder_hashes(adapter_dir) == before


def test_export_refusals(tmp_path, saved):
    _, adapter_dir = saved
    with pytest.raises(LoraboundError, match="outside -1..3"):
        prune_adapter(adapter_dir, 7, tmp_path / "x", num_layers=4)
    with pytest.raises(LoraboundError, match="keeps no LoRA layer"):
        prune_adapter(adapter_dir, -1, tmp_path / "x")
    with pytest.raises(LoraboundError, match="needs the base model"):
        prune_adapter(adapter_dir, 1, tmp_path / "x", format="merged")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(LoraboundError, match="--overwrite"):
        prune_adapter(adapter_dir, 1, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()


def with_distinct_saved_modules(model, seed: int = 5):
    """Give the modules_to_save copies weights of their own, so an export that lost them would show it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def saved_copy(adapter_dir, module: str) -> torch.Tensor:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))[f"base_model.model.{module}.weight"]


def test_patterns_and_modules_to_save_are_preserved(tmp_path):
    model = with_distinct_saved_modules(tiny_lora(target_modules=["q_proj", "v_proj", "down_proj"],
                                                  rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 16},
                                                  modules_to_save=["lm_head"]))
    model.save_pretrained(tmp_path / "adapter")
    lm_head = saved_copy(tmp_path / "adapter", "lm_head")
    assert not torch.equal(lm_head, tiny_llama().lm_head.weight)
    prune_adapter(tmp_path / "adapter", 1, tmp_path / "out", num_layers=4)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"down_proj": 2}
    assert config["alpha_pattern"] == {"v_proj": 16}
    assert config["modules_to_save"] == ["lm_head"]
    assert config["target_modules"] and set(config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    assert torch.equal(saved_copy(tmp_path / "out", "lm_head"), lm_head)
    exported = load_exported(tmp_path / "out")
    assert torch.equal(exported.base_model.model.lm_head.modules_to_save["default"].weight, lm_head)
    with keep_up_to(model, 1):
        assert torch.allclose(logits(exported), logits(model), atol=1e-6)


def tied_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=None, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
@pytest.mark.parametrize("boundary", [-1, 2])
def test_merged_export_keeps_modules_to_save(tmp_path, boundary, tied):
    """The merged model's lm_head is the adapter's saved copy at every b, b = -1 (no LoRA left) included;
    with tied embeddings the head gets its own weight and the embeddings stay the base model's."""
    base = tied_llama() if tied else tiny_llama()
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    embeddings = base.model.embed_tokens.weight.detach().clone()
    model = with_distinct_saved_modules(tiny_lora(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                                  target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    model.save_pretrained(tmp_path / "adapter")
    lm_head = saved_copy(tmp_path / "adapter", "lm_head")
    assert not torch.equal(lm_head, base.lm_head.weight)
    result = prune_adapter(tmp_path / "adapter", boundary, tmp_path / "merged", format="merged",
                           model_spec=str(tmp_path / "base"))
    assert "modules_to_save kept whole: lm_head" in result.summary()
    merged, _ = load_model(str(tmp_path / "merged"))
    assert torch.equal(merged.lm_head.weight, lm_head)
    assert torch.equal(merged.model.embed_tokens.weight, embeddings)
    with keep_up_to(model, boundary):
        expected = logits(model)
    assert torch.allclose(logits(merged), expected, atol=1e-5)


def test_merged_summary_compares_model_bytes_with_model_bytes(tmp_path, saved):
    base_dir, adapter_dir = saved
    result = prune_adapter(adapter_dir, 1, tmp_path / "merged", format="merged", model_spec=str(base_dir))
    base_bytes = sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))
    merged_bytes = sum(p.stat().st_size for p in (tmp_path / "merged").glob("*.safetensors"))
    assert (result.bytes_before, result.bytes_after) == (base_bytes, merged_bytes)
    assert f"base model {base_bytes / 1e6:.2f} MB -> merged model {merged_bytes / 1e6:.2f} MB" in result.summary()
    assert result.bytes_before != (adapter_dir / "adapter_model.safetensors").stat().st_size  # not the adapter's


def test_exported_bytes_is_the_size_a_peft_export_writes(tmp_path):
    """In bf16 storage too: the size comes from the stored tensors, not from a float32 model in memory."""
    model = tiny_lora(target_modules=["q_proj", "v_proj"])
    model.save_pretrained(tmp_path / "float32")
    model.save_pretrained(tmp_path / "adapter")
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()},
              str(tmp_path / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    source = AdapterFiles.read(tmp_path / "adapter")
    for boundary in (0, 2):
        prune_adapter(tmp_path / "adapter", boundary, tmp_path / f"b{boundary}", num_layers=4)
        written = (tmp_path / f"b{boundary}" / "adapter_model.safetensors").stat().st_size
        assert exported_bytes(source, boundary) == written
    # Two bytes a parameter fewer than the same tensors stored in float32 (headers differ by a few bytes).
    float32 = exported_bytes(AdapterFiles.read(tmp_path / "float32"), 2)
    assert abs(float32 - exported_bytes(source, 2) - 2 * source.lora_params(up_to=2)) < 64


def test_dora_drop_and_export(tmp_path):
    model = tiny_lora(use_dora=True)
    model.save_pretrained(tmp_path / "adapter")
    prune_adapter(tmp_path / "adapter", 1, tmp_path / "out", num_layers=4)
    exported = load_exported(tmp_path / "out")
    with keep_up_to(model, 1):
        assert torch.allclose(logits(exported), logits(model), atol=1e-5)
    with pytest.raises(LoraboundError, match="DoRA"):
        prune_adapter(tmp_path / "adapter", 1, tmp_path / "zf", format="zero-fill")


def test_restricted_adapter_keeps_its_own_layers(tmp_path):
    model = tiny_lora(target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2], layers_pattern="layers")
    assert adapter_layers(model) == [1, 2]
    model.save_pretrained(tmp_path / "adapter")
    result = prune_adapter(tmp_path / "adapter", 1, tmp_path / "out", num_layers=4)
    assert result.layers_kept == [1]
    exported = load_exported(tmp_path / "out")
    with keep_up_to(model, 1):
        assert torch.allclose(logits(exported), logits(model), atol=1e-6)


@pytest.mark.real
def test_real_model_export_equals_in_memory_drop(tmp_path):
    """SmolLM2-135M with a LoRA on every layer: the exported b=14 adapter is the in-memory drop at b=14."""
    from tiny import randomize_lora

    model = get_peft_model(load_model("smollm2-135m")[0], LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(model, scale=0.02)
    model.eval().save_pretrained(tmp_path / "adapter")
    result = prune_adapter(tmp_path / "adapter", 14, tmp_path / "b14", num_layers=30)
    assert result.layers_kept == list(range(15))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exported = PeftModel.from_pretrained(load_model("smollm2-135m")[0], str(tmp_path / "b14")).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    ids = torch.tensor([[504, 2389, 314, 253, 1345, 30, 198, 11624, 42]])
    with torch.no_grad():
        with keep_up_to(model, 14):
            expected = model(input_ids=ids).logits
        full = model(input_ids=ids).logits
        got = exported(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, full, atol=1e-3)


def test_lora_outside_the_layer_stack_survives_export(tmp_path):
    """LoRA on the embeddings has no layer index: every export keeps it, as the in-memory drop does."""
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = tiny_lora(target_modules=["q_proj", "v_proj", "embed_tokens"])
    model.save_pretrained(tmp_path / "adapter")
    with keep_up_to(model, 1):
        expected = logits(model)
    prune_adapter(tmp_path / "adapter", 1, tmp_path / "peft", num_layers=4)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "model.embed_tokens" in config["target_modules"]
    assert torch.allclose(logits(load_exported(tmp_path / "peft")), expected, atol=1e-6)
    prune_adapter(tmp_path / "adapter", 1, tmp_path / "merged", format="merged", model_spec=str(base_dir))
    assert torch.allclose(logits(load_model(str(tmp_path / "merged"))[0]), expected, atol=1e-5)
