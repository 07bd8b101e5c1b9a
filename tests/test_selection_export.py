"""Any selection of (layer, module group) pairs exports as PEFT loads it: export == in memory == an adapter that
never had the dropped modules.

The reference is built independently of lorabound's export: PEFT initialises a fresh adapter whose target_modules
regex covers only the modules the test itself decides are kept (from the module paths, not from lorabound's
code), and the source adapter's weights are copied into it.
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
from safetensors.torch import load_file

from lorabound.errors import LoraboundError
from lorabound.model import load_model
from lorabound.lora.selection import Selection
from lorabound.lora.masking import keep_selection
from lorabound.lora.export import AdapterFiles, prune_adapter

from test_architectures import ARCHITECTURES, tiny_adapter, tiny_gemma3_vision, tiny_model
from tiny import randomize_lora, tiny_llama, tiny_lora, tiny_tokenizer

IDS = torch.tensor([[2, 5, 9, 17, 33, 65, 3, 7]])
STACKS = {"gpt2": "transformer.h", "gemma3-vision": "model.language_model.layers"}  # others: model.layers


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def oracle_kept(peft_model, stack: str, selection: Selection) -> set[str]:
    """The LoRA module paths the selection keeps, decided here from the paths: outside the stack always kept;
    inside, the group is read from the first name after the layer index."""
    kept = set()
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        path = name.removeprefix("base_model.model.")
        match = re.fullmatch(rf"{re.escape(stack)}\.(\d+)\.([^.]+)\..+", path)
        if match is None:
            kept.add(path)
            continue
        part = match[2].lower()
        group = "attention" if "attn" in part or "attention" in part else "mlp" if "mlp" in part else "other"
        if selection.keeps(int(match[1]), group):
            kept.add(path)
    return kept


def reference(peft_model, fresh_base, kept: set[str]):
    """A new PEFT adapter on `fresh_base` with LoRA only on `kept` (a regex target), weights copied over."""
    config = copy.deepcopy(peft_model.peft_config["default"])
    config.target_modules = "|".join(re.escape(path) for path in sorted(kept))
    config.layers_to_transform, config.layers_pattern = None, None
    other = get_peft_model(fresh_base, config).eval()
    source = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(source[name])
    assert {n.removeprefix("base_model.model.") for n, m in other.named_modules() if isinstance(m, LoraLayer)} == kept
    return other


def load_without_warnings(base, folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(folder)).eval()
    from_peft = [str(w.message) for w in caught if "/peft/" in w.filename]  # not transformers' deprecations
    assert not from_peft, from_peft
    return model


def check_every_format(tmp_path, peft_model, make_base, stack: str, selection: Selection, *, model_spec=None,
                       num_layers=None, formats=("peft", "zero-fill", "merged")):
    """Export `selection` in each format and compare with the in-memory selection and the reference."""
    peft_model.save_pretrained(tmp_path / "adapter")
    kept = oracle_kept(peft_model, stack, selection)
    with keep_selection(peft_model, selection):
        in_memory = logits(peft_model)
    assert torch.equal(in_memory, logits(reference(peft_model, make_base(), kept)))
    assert not torch.allclose(in_memory, logits(peft_model), atol=1e-4)  # something was dropped
    with peft_model.disable_adapter():
        assert not torch.allclose(in_memory, logits(peft_model), atol=1e-4)  # something was kept
    for fmt in formats:
        out = tmp_path / fmt
        result = prune_adapter(tmp_path / "adapter", selection, out, format=fmt, model_spec=model_spec,
                               num_layers=num_layers)
        if fmt == "merged":
            exported = load_model(str(out))[0]
            assert not any("lora" in n for n, _ in exported.named_parameters())
            assert torch.allclose(logits(exported), in_memory, atol=1e-5), fmt
        else:
            exported = load_without_warnings(make_base(), out)
            loaded = {n.removeprefix("base_model.model.") for n, m in exported.named_modules()
                      if isinstance(m, LoraLayer)}
            if fmt == "peft":
                assert loaded == kept  # LoRA exactly where the kept tensors are
            assert torch.allclose(logits(exported), in_memory, atol=1e-6), fmt
        recorded = json.loads((out / "lorabound.json").read_text())
        assert Selection.from_json(recorded["selection"]) == selection
        assert recorded["selection_description"] == selection.describe()
        kept_params = sum(p.numel() for n, p in peft_model.named_parameters()
                          if "lora_" in n and n.removeprefix("base_model.model.").split(".lora_")[0] in kept)
        assert result.lora_params_after == kept_params
        assert result.selection == selection and result.pairs_kept


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_per_group_selection_exports_equal_in_memory_and_reference(tmp_path, arch):
    """Attention LoRA up to layer 2, MLP LoRA on layer 0 only, on every tiny architecture (3 layers)."""
    tiny_model(arch).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    selection = Selection.per_group({"attention": 2, "mlp": 0})
    formats = ("peft", "zero-fill", "merged") if arch in ("llama", "gpt2", "gemma3") else ("peft",)
    check_every_format(tmp_path, tiny_adapter(arch), lambda: tiny_model(arch), STACKS.get(arch, "model.layers"),
                       selection, model_spec=str(tmp_path / "base"), formats=formats)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # Exact paths (no layer list can say "attention on 0..2, MLP on 0"); layers_to_transform names the kept layers.
    assert config["layers_to_transform"] == [0, 1, 2] and all(re.search(r"\.\d+\.", target)
                                                              for target in config["target_modules"])


@pytest.mark.parametrize("layers", [[0, 2], [1, 3], [2]])
def test_layer_set_exports_equal_in_memory_and_reference(tmp_path, layers):
    """A non-contiguous layer set keeps whole layers: layers_to_transform says it."""
    tiny_llama().save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    check_every_format(tmp_path, tiny_lora(), tiny_llama, "model.layers", Selection.layers(layers),
                       model_spec=str(tmp_path / "base"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == layers


def test_per_group_export_of_an_adapter_with_layers_to_transform(tmp_path):
    model = tiny_lora(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1, 2, 3],
                      layers_pattern="layers")
    check_every_format(tmp_path, model, tiny_llama, "model.layers", Selection.per_group({"attention": 3, "mlp": 1}),
                       num_layers=4, formats=("peft", "zero-fill"))
    assert AdapterFiles.read(tmp_path / "peft").layers() == [1, 2, 3]


@pytest.mark.parametrize("extra", [{"modules_to_save": ["lm_head"]}, {"target_modules": ["q_proj", "v_proj",
                                                                                          "gate_proj", "embed_tokens"]}],
                         ids=["modules_to_save", "lora-on-embeddings"])
def test_per_group_export_keeps_what_lies_outside_the_stack(tmp_path, extra):
    tiny_llama().save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    model = tiny_lora(**{"target_modules": ["q_proj", "v_proj", "gate_proj"], **extra})
    check_every_format(tmp_path, model, tiny_llama, "model.layers", Selection.per_group({"attention": 1, "mlp": 2}),
                       model_spec=str(tmp_path / "base"), formats=("peft", "merged"))


def test_per_group_export_on_a_multimodal_model_keeps_the_vision_tower(tmp_path):
    base = tiny_gemma3_vision()
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8,
                                                                target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora(peft_model, scale=0.3)
    peft_model.eval()
    check_every_format(tmp_path, peft_model, lambda: copy.deepcopy(base), "model.language_model.layers",
                       Selection.per_group({"attention": 0, "mlp": 2}), model_spec=str(tmp_path / "base"),
                       formats=("peft",))
    exported = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert any("vision_tower.encoder.layers.1." in name for name in exported)


def test_selection_refusals(tmp_path):
    model = tiny_lora(target_modules=["q_proj", "v_proj"])
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(LoraboundError, match="no LoRA on mlp modules"):
        prune_adapter(tmp_path / "adapter", Selection.per_group({"attention": 1, "mlp": 1}), tmp_path / "x")
    with pytest.raises(LoraboundError, match="layer 4 is outside 0..3"):
        prune_adapter(tmp_path / "adapter", Selection.layers([0, 4]), tmp_path / "x", num_layers=4)
    with pytest.raises(LoraboundError, match="keeps no LoRA layer"):
        prune_adapter(tmp_path / "adapter", Selection.layers([]), tmp_path / "x", num_layers=4)
    assert not (tmp_path / "x").exists()


@pytest.mark.real
def test_real_model_per_group_export_loads_without_warnings_and_matches_in_memory(tmp_path, real_model):
    """SmolLM2-135M, LoRA on every linear module: attention LoRA on layers 0..20, MLP LoRA on 0..9 (per-group, so
    the export names its modules exactly). PEFT loads it with no warning and gives the in-memory logits."""
    model, tokenizer = real_model
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(peft_model, scale=0.02)
    peft_model.eval().save_pretrained(tmp_path / "adapter")
    selection = Selection.per_group({"attention": 20, "mlp": 9})
    result = prune_adapter(tmp_path / "adapter", selection, tmp_path / "out", model_spec="smollm2-135m")
    assert result.pairs_kept == sorted([(layer, "attention") for layer in range(21)] +
                                       [(layer, "mlp") for layer in range(10)])
    exported = load_without_warnings(copy.deepcopy(model), tmp_path / "out")
    prompts = ["Describe the restaurant.\nData: name: The Eagle, food: French\nText:", "The capital of France is"]
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            with keep_selection(peft_model, selection):
                expected = peft_model(input_ids=ids).logits
            full = peft_model(input_ids=ids).logits
            got = exported(input_ids=ids).logits
        assert torch.allclose(got, expected, atol=1e-4)
        assert not torch.allclose(got, full, atol=1e-3)


def test_vllm_engine_runs_a_selection_as_its_peft_export(tmp_path, monkeypatch):
    """Without vllm: a fake LLM shows that a per-group variant is requested as the peft export of its selection,
    and a selection equal to the full adapter as the adapter itself."""

    from lorabound.generation import engines
    from lorabound.lora.variants import Variant

    from test_engines import install_fake_vllm

    install_fake_vllm(monkeypatch)
    tiny_lora(tiny_llama()).save_pretrained(tmp_path / "adapter")
    engine = engines.VLLMEngine(str(tmp_path / "base"), tmp_path / "adapter", tiny_tokenizer(), num_layers=4,
                                max_new_tokens=8, stop_at_newline=True, eos_ids=[1], scratch=tmp_path / "scratch")
    selection = Selection.per_group({"attention": 3, "mlp": 0})
    variants = [Variant("per group", selection), Variant("all", Selection.per_group({"attention": 3, "mlp": 3}))]
    engine.generate(variants, ["a"], progress=False)
    requested = engine._llm.calls[0][1]
    folder = next((tmp_path / "scratch").iterdir())
    assert requested == [str(folder.resolve()), str((tmp_path / "adapter").resolve())]
    assert Selection.from_json(json.loads((folder / "lorabound.json").read_text())["selection"]) == selection
    engine.close()
