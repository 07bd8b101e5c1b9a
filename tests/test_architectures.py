"""The analysis is right on every supported architecture, with every kind of adapter.

- the head (model.apply_head) reproduces each architecture's own logits, extra steps included (Granite's
  logits_scaling, Cohere's logit_scale, Gemma-2/3's soft-capping);
- the sweep equals the plain loop, and the self-check that runs on every analysis passes, or refuses a head
  that does not reproduce the model;
- b = -1 is the model with no adapter at all, also when the adapter has modules_to_save or LoRA outside the
  layer stack; the "LoRA-layers-only" baseline is reported beside it;
- export and in-memory dropping agree on which layers are the text decoder's, on a multimodal model.

Tiny random models built from configs (no downloads).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3Config,
                          Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig, GPT2Config,
                          GPT2LMHeadModel, GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, SiglipVisionConfig)

from lorabound.analysis import curves as analysis
from lorabound import cli
from lorabound.report import document as report
from lorabound.analysis.curves import analyze, truncation_curve_plain
from lorabound.data import batches
from lorabound.errors import LoraboundError
from lorabound.model import apply_head, find_layer_stack
from lorabound.training import target_loss
from lorabound.lora.masking import keep_lora, keep_up_to, lora_modules
from lorabound.lora.export import AdapterFiles, prune_adapter

from tiny import randomize_lora, tiny_encoded, tiny_tokenizer

VOCAB = 320


def _decoder(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=None,
                eos_token_id=1, **extra)


# name: (model class, config, LoRA target modules). The extra steps after the blocks use values far from 1,
# so a head that misses them is visibly wrong.
ARCHITECTURES = {
    "granite": (GraniteForCausalLM, lambda: GraniteConfig(**_decoder(logits_scaling=8.0, embedding_multiplier=4.0,
                                                                     residual_multiplier=0.5)),
                ["q_proj", "v_proj", "down_proj"]),
    "cohere": (CohereForCausalLM, lambda: CohereConfig(**_decoder(logit_scale=0.125)), ["q_proj", "v_proj", "down_proj"]),
    "gemma2": (Gemma2ForCausalLM, lambda: Gemma2Config(**_decoder(head_dim=8, final_logit_softcapping=0.5)),
               ["q_proj", "v_proj", "down_proj"]),
    "gemma3": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(**_decoder(head_dim=8, sliding_window=4,
                                                                      final_logit_softcapping=0.5)),
               ["q_proj", "v_proj", "down_proj"]),
    "phi3": (Phi3ForCausalLM, lambda: Phi3Config(**_decoder()), ["qkv_proj", "o_proj", "down_proj"]),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**_decoder()), ["q_proj", "v_proj", "down_proj"]),
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**_decoder()), ["q_proj", "v_proj", "down_proj"]),
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**_decoder()), ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (GPT2LMHeadModel, lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                                                 eos_token_id=1), ["c_attn", "c_proj", "c_fc"]),
}


def tiny_model(arch: str):
    model_class, config, _ = ARCHITECTURES[arch]
    torch.manual_seed(0)
    return model_class(config()).eval()


def tiny_adapter(arch: str, **config):
    model = tiny_model(arch)
    config = {"target_modules": ARCHITECTURES[arch][2], **config}
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, fan_in_fan_out=arch == "gpt2", **config)
    peft_model = get_peft_model(model, lora)
    randomize_lora(peft_model, scale=0.3)
    return peft_model.eval()


def close(a, b, tol=1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


def old_head(stack, hidden):
    """The head before issue 8: final norm, LM head, Gemma's soft-cap; nothing else."""
    logits = stack.lm_head(stack.final_norm(hidden))
    if stack.logit_softcap is not None:
        logits = torch.tanh(logits / stack.logit_softcap) * stack.logit_softcap
    return logits


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _last_block_output_and_logits(model, ids):
    stack = find_layer_stack(model)
    seen = {}
    handle = stack.layers[-1].register_forward_hook(
        lambda module, args, output: seen.update(hidden=output[0] if isinstance(output, tuple) else output))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        handle.remove()
    return stack, seen["hidden"], logits


# ---- the head -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_head_reproduces_the_models_own_logits(arch):
    model = tiny_model(arch)
    stack, hidden, expected = _last_block_output_and_logits(model, torch.tensor([[2, 5, 9, 17, 33, 65, 3, 7]]))
    with torch.no_grad():
        got = apply_head(stack, hidden)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["granite", "cohere"])
def test_old_norm_then_head_missed_the_logit_scaling(arch):
    """Why apply_head runs the model's own code: norm -> head is off by Granite's / Cohere's scale factor."""
    model = tiny_model(arch)
    stack, hidden, expected = _last_block_output_and_logits(model, torch.tensor([[2, 5, 9, 17, 33, 65, 3, 7]]))
    with torch.no_grad():
        old = old_head(stack, hidden)
    factor = 8.0 if arch == "granite" else 1 / 0.125
    torch.testing.assert_close(old, expected * factor, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_training_loss_with_the_head_at_targets_only_equals_the_models_own(tok, arch):
    """training.target_loss runs the head only where a target is predicted: same loss and LoRA gradients as
    model(labels=...).loss, also where the model scales or soft-caps its logits after the head."""
    model = tiny_adapter(arch).train()
    encoded = tiny_encoded(tok)
    encoded.input_ids[1], encoded.labels[1] = encoded.input_ids[1][:-3], encoded.labels[1][:-3]
    batch = next(batches(encoded, 4, 0))
    assert (batch.attention_mask == 0).any()  # rows of different lengths: padding is not predicted either
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    losses, grads = [], []
    for compute in (lambda: model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  labels=batch.labels).loss,
                    lambda: target_loss(model, batch)):
        model.zero_grad()
        torch.manual_seed(0)  # GPT-2's own dropout: the same masks both times
        loss = compute()
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in lora])
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads[0])


# ---- the sweep and its self-check ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_sweep_equals_plain_loop_and_passes_the_self_check(tok, arch):
    model = tiny_adapter(arch)
    encoded = tiny_encoded(tok)
    fast = analyze(model, encoded, batch_size=4, pad_token_id=tok.pad_token_id, progress=False,
                   curves=("truncation",))["truncation"]  # the self-check runs inside and would raise
    plain = truncation_curve_plain(model, encoded, batch_size=4, pad_token_id=tok.pad_token_id)
    assert fast["boundary"] == plain["boundary"] == [-1, 0, 1, 2]
    for key in ("mean_prob", "nll", "accuracy"):
        assert close(fast[key], plain[key]), (key, fast[key], plain[key])
    assert len({round(p, 6) for p in plain["mean_prob"]}) > 1  # the adapter changes the curve
    assert "layers_only_baseline" not in fast  # every part of this adapter is in the layers


def test_self_check_refuses_the_old_head_on_granite(tok, monkeypatch):
    """The head that ignored logits_scaling: the analysis stops instead of writing wrong curves."""
    model = tiny_adapter("granite")
    monkeypatch.setattr(analysis, "apply_head", old_head)
    with pytest.raises(LoraboundError) as err:
        analyze(model, tiny_encoded(tok), batch_size=4, pad_token_id=tok.pad_token_id, progress=False)
    message = str(err.value)
    assert "GraniteForCausalLM" in message and "open an issue" in message and "\n" not in message


def test_self_check_refuses_a_slightly_wrong_head(tok, monkeypatch):
    """A 1% error in every logit is far beyond float tolerance: refused, on a plain Llama too."""
    model = tiny_adapter("llama")
    monkeypatch.setattr(analysis, "apply_head", lambda stack, hidden: apply_head(stack, hidden) * 1.01)
    with pytest.raises(LoraboundError, match=r"LlamaForCausalLM's own logits for the full adapter.*open an issue"):
        analyze(model, tiny_encoded(tok), batch_size=4, pad_token_id=tok.pad_token_id, progress=False,
                curves=("truncation",))


def test_self_check_refuses_a_wrong_base(tok, monkeypatch):
    """b = -1 is checked against the model with its adapter disabled, separately from the full adapter."""
    model = tiny_adapter("llama")
    monkeypatch.setattr(analysis, "no_adapter", lambda m: keep_lora(m, [0]))
    with pytest.raises(LoraboundError, match=r"for the base model \(b = -1\)"):
        analyze(model, tiny_encoded(tok), batch_size=4, pad_token_id=tok.pad_token_id, progress=False,
                curves=("truncation",))


def test_on_granite_the_old_head_gave_a_different_curve(tok, monkeypatch):
    """The sweep with the old head (self-check bypassed) disagrees with the model's own loop: what issue 8 saw."""
    model = tiny_adapter("granite")
    encoded = tiny_encoded(tok)
    plain = truncation_curve_plain(model, encoded, batch_size=4, pad_token_id=tok.pad_token_id)
    monkeypatch.setattr(analysis, "apply_head", old_head)
    monkeypatch.setattr(analysis, "check_reproduces_model", lambda *args: None)
    old = analyze(model, encoded, batch_size=4, pad_token_id=tok.pad_token_id, progress=False,
                  curves=("truncation",))["truncation"]
    assert not close(old["nll"], plain["nll"], tol=1e-3)


# ---- "base" is the model with no adapter at all ----------------------------------------------------------

def _with_modules_to_save(model):
    """An adapter whose lm_head copy differs from the base head (PEFT starts it as an exact copy)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def mean_prob(model, encoded, pad_token_id) -> float:
    total, count = 0.0, 0
    for batch in batches(encoded, 4, pad_token_id):
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        mask = batch.labels[:, 1:] != -100
        logp = torch.log_softmax(logits[:, :-1][mask].double(), -1)
        total += logp.gather(1, batch.labels[:, 1:][mask][:, None]).exp().sum().item()
        count += int(mask.sum())
    return total / count


@pytest.mark.parametrize("outside", ["modules_to_save_lm_head", "lora_on_embed_tokens"])
def test_base_is_the_model_without_any_adapter(tok, outside, capsys):
    if outside == "modules_to_save_lm_head":
        model = _with_modules_to_save(tiny_adapter("llama", modules_to_save=["lm_head"]))
        part = "lm_head"
    else:
        model = tiny_adapter("llama", target_modules=["q_proj", "v_proj", "embed_tokens"])
        part = "model.embed_tokens"
    encoded = tiny_encoded(tok)
    result = analyze(model, encoded, batch_size=4, pad_token_id=tok.pad_token_id, progress=False)
    curve = result["truncation"]

    with model.disable_adapter():
        base = mean_prob(model, encoded, tok.pad_token_id)
    with keep_lora(model, []):
        layers_only = mean_prob(model, encoded, tok.pad_token_id)
    assert abs(base - layers_only) > 0.02 * base  # the part outside the layers matters on this adapter
    assert close([curve["mean_prob"][0]], [base], tol=1e-7)  # b = -1: evaluation's base model
    baseline = curve["layers_only_baseline"]
    assert close([baseline["mean_prob"]], [layers_only], tol=1e-7) and baseline["parts_on"] == [part]
    # The logit lens reads the same base model, and the plain loop agrees with the sweep.
    assert close([result["logit_lens"]["base_prob"][-1]], [base], tol=1e-7)
    plain = truncation_curve_plain(model, encoded, batch_size=4, pad_token_id=tok.pad_token_id)
    assert close(curve["nll"], plain["nll"]) and close(curve["mean_prob"], plain["mean_prob"])

    # Shown beside the curve: in the terminal and in the truncation plot.
    cli._print_truncation(result)
    assert f"LoRA off on every layer with {part} on: mean p {layers_only:.4f}" in capsys.readouterr().out
    assert report._plot_truncation(curve, None).startswith(b"\x89PNG")


# ---- export and in-memory dropping agree on the text decoder's layers (multimodal) -----------------------

def tiny_gemma3_vision():
    """Gemma-3 with a SigLIP vision tower: model.vision_tower.encoder.layers (2) besides the text decoder's
    model.language_model.layers (3); both have q_proj / v_proj."""
    text = Gemma3TextConfig(**_decoder(head_dim=8, sliding_window=4))
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                image_size=16, patch_size=8)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_index=300, boi_token_index=301, eoi_token_index=302)
    torch.manual_seed(0)
    return Gemma3ForConditionalGeneration(config).eval()


def _lora_state(model, names) -> dict[str, torch.Tensor]:
    """LoRA tensors of the given modules, keyed like an adapter file."""
    wanted = {f"base_model.model.{n}" for n in names}
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k and k.rsplit(".lora_", 1)[0] in wanted}


@pytest.mark.parametrize("with_model", [True, False], ids=["with-model", "names-only"])
def test_export_keeps_the_layers_in_memory_dropping_keeps_on_a_multimodal_model(tmp_path, with_model):
    base = tiny_gemma3_vision()
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(peft_model, scale=0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    all_lora = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                if isinstance(m, LoraLayer)}
    assert any("vision_tower" in n for n in all_lora) and find_layer_stack(peft_model).num_layers == 3

    boundary = 0
    # In memory: LoRA on the decoder's layers above b is off; the vision tower's LoRA is not in the decoder.
    dropped = {f"model.language_model.layers.{m.layer}.{m.name}" for m in lora_modules(peft_model) if m.layer > boundary}
    assert dropped and not any("vision" in n for n in dropped)
    kept = all_lora - dropped
    assert any("vision_tower.encoder.layers.1." in n for n in kept)  # vision layer 1 > b stays

    prune_adapter(tmp_path / "adapter", boundary, tmp_path / "out", model_spec=str(tmp_path / "base") if with_model
                  else None, num_layers=None if with_model else 3)
    exported = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in exported} == kept
    source = _lora_state(peft_model, kept)
    for key, tensor in source.items():
        assert torch.equal(exported[key.replace(".default", "")], tensor)

    # PEFT loads the export with LoRA exactly where in-memory dropping keeps it.
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    loaded_lora = {n.removeprefix("base_model.model.") for n, m in loaded.named_modules()
                   if isinstance(m, LoraLayer)}
    assert loaded_lora == kept
    ids = torch.tensor([[2, 5, 9, 17, 33, 65, 3, 7]])
    with torch.no_grad(), keep_up_to(peft_model, boundary):
        expected = peft_model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_names_only_rule_picks_the_known_decoder_path():
    files = AdapterFiles(path=None, config={}, tensors={}, layers_path="model.language_model.layers")
    assert files.layer_of("base_model.model.model.language_model.layers.2.self_attn.q_proj.lora_A.weight") == ("layers", 2)
    assert files.layer_of("base_model.model.model.vision_tower.encoder.layers.2.self_attn.q_proj.lora_A.weight") is None
    from lorabound.model import layers_path_of_names
    assert layers_path_of_names(["model.vision_tower.encoder.layers.0.q", "model.language_model.layers.1.q"]) \
        == "model.language_model.layers"
    assert layers_path_of_names(["transformer.h.0.attn.c_attn", "lm_head"]) == "transformer.h"
    assert layers_path_of_names(["a.blocks.0.q", "b.blocks.0.q"]) is None  # ambiguous: --model needed
    assert layers_path_of_names(["lm_head"]) == ""


def test_export_without_model_refuses_ambiguous_layer_stacks(tmp_path):
    """Two numbered stacks, neither a known decoder path: which is the text decoder's is not guessed."""
    import json

    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["q"]}))
    tensors = {f"base_model.model.{tower}.blocks.{i}.q.lora_{ab}.weight": torch.zeros(2, 2)
               for tower in ("text", "image") for i in range(2) for ab in "AB"}
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(LoraboundError, match="several numbered layer stacks.*pass --model"):
        prune_adapter(adapter, 0, tmp_path / "out", num_layers=2)
    assert not (tmp_path / "out").exists()
