"""The shared-work sweep gives the same curves as the obvious loop, on several architectures."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from lorabound import analysis
from lorabound.analysis import analyze, truncation_curve_plain

from tiny import randomize_lora, tiny_encoded, tiny_lora, tiny_tokenizer


def tiny_arch(name: str):
    torch.manual_seed(0)
    if name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=32, n_layer=3, n_head=4, n_positions=128))
        targets = ["c_attn", "c_proj", "c_fc"]
    elif name == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2))
        targets = ["q_proj", "v_proj", "down_proj"]
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=8, sliding_window=4, final_logit_softcapping=30.0))
        targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(model.eval(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                         fan_in_fan_out=name == "gpt2"))
    randomize_lora(peft_model, scale=0.3)
    return peft_model.eval()


def close(a, b, tol=1e-5):
    return all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b)) and len(a) == len(b)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2"])
def test_sweep_equals_plain_loop(tok, arch):
    model = tiny_lora() if arch == "llama" else tiny_arch(arch)
    encoded = tiny_encoded(tok)
    fast = analyze(model, encoded, batch_size=3, pad_token_id=tok.pad_token_id, progress=False)
    plain = truncation_curve_plain(model, encoded, batch_size=3, pad_token_id=tok.pad_token_id)
    assert fast["truncation"]["boundary"] == plain["boundary"]
    for key in ("mean_prob", "nll", "accuracy"):
        assert close(fast["truncation"][key], plain[key]), key
    assert len(set(round(p, 6) for p in plain["mean_prob"])) > 1  # LoRA changes the curve


def test_curves_agree_with_each_other(tok):
    model = tiny_lora()
    r = analyze(model, tiny_encoded(tok), batch_size=4, pad_token_id=tok.pad_token_id, progress=False)
    t, lens, abl = r["truncation"], r["logit_lens"], r["ablation"]
    # The last layer's lens reading is the model's own output: full adapter and base model.
    assert close([lens["full_prob"][-1]], [t["mean_prob"][-1]])
    assert close([lens["base_prob"][-1]], [t["mean_prob"][0]])
    # Dropping LoRA on the top layer alone is the boundary just below it.
    assert close([abl["nll"][-1]], [t["nll"][-2]])
    assert close([abl["delta_nll"][-1]], [t["nll"][-2] - t["nll"][-1]])
    assert r["meta"]["n_examples"] == 7 and r["meta"]["num_layers"] == 4


def test_logit_lens_applies_final_norm_once(tok):
    """Reading the base model's last layer through norm + head must give the model's real probabilities."""
    model = tiny_lora()
    encoded = tiny_encoded(tok)
    r = analyze(model, encoded, batch_size=7, pad_token_id=tok.pad_token_id, progress=False, curves=("logit_lens",))
    from lorabound.data import batches
    batch = next(batches(encoded, 7, tok.pad_token_id))
    with model.disable_adapter(), torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = batch.labels[:, 1:] != -100
    probs = torch.softmax(logits[:, :-1][mask].double(), -1).gather(1, batch.labels[:, 1:][mask][:, None])
    assert abs(r["logit_lens"]["base_prob"][-1] - probs.mean().item()) < 1e-6


def test_restricted_adapter_curves_cover_its_own_layers(tok):
    model = tiny_lora(target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2], layers_pattern="layers")
    encoded = tiny_encoded(tok)
    r = analyze(model, encoded, batch_size=4, pad_token_id=tok.pad_token_id, progress=False)
    assert r["truncation"]["boundary"] == [-1, 1, 2]
    assert r["ablation"]["layer"] == [1, 2]
    plain = truncation_curve_plain(model, encoded, batch_size=4, pad_token_id=tok.pad_token_id)
    assert close(r["truncation"]["nll"], plain["nll"])


def test_interrupted_analysis_resumes_with_identical_numbers(tmp_path, tok, monkeypatch):
    model = tiny_lora()
    encoded = tiny_encoded(tok)
    whole = analyze(model, encoded, batch_size=2, pad_token_id=tok.pad_token_id, progress=False)

    real_score = analysis.score_batch
    calls = {"n": 0}

    def dies_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the self-check scores the first batch once, then batches 1, 2, and 3 dies
            raise KeyboardInterrupt
        return real_score(*args, **kwargs)

    checkpoint = tmp_path / "analysis.partial.json"
    monkeypatch.setattr(analysis, "score_batch", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        analyze(model, encoded, batch_size=2, pad_token_id=tok.pad_token_id, progress=False, checkpoint=checkpoint)
    assert json.loads(checkpoint.read_text())["batches_done"] == 2
    monkeypatch.setattr(analysis, "score_batch", real_score)
    resumed = analyze(model, encoded, batch_size=2, pad_token_id=tok.pad_token_id, progress=False,
                      checkpoint=checkpoint)
    assert resumed["truncation"] == whole["truncation"]
    assert resumed["ablation"] == whole["ablation"]
    assert resumed["logit_lens"] == whole["logit_lens"]


@pytest.mark.real
def test_real_model_sweep_equals_plain_loop():
    """On SmolLM2-135M (30 layers) and real E2E examples, the shared sweep is the plain loop's curve."""
    from lorabound.data import encode_pairs, first_reference_pairs, load_task, split_task
    from lorabound.model import load_model

    model, tokenizer = load_model("smollm2-135m")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora(model, scale=0.02)
    model.eval()
    task = load_task("e2e")
    examples = split_task(task, train=0, validation=2, test=0, seed=0).validation
    encoded = encode_pairs(tokenizer, task, first_reference_pairs(examples), 128)
    fast = analyze(model, encoded, batch_size=2, pad_token_id=tokenizer.pad_token_id, progress=False,
                   curves=("truncation",))["truncation"]
    plain = truncation_curve_plain(model, encoded, batch_size=2, pad_token_id=tokenizer.pad_token_id)
    assert fast["boundary"] == plain["boundary"] == list(range(-1, 30))
    assert close(fast["nll"], plain["nll"], tol=1e-4) and close(fast["mean_prob"], plain["mean_prob"], tol=1e-4)


@pytest.mark.real
def test_real_model_self_check_passes(real_model, monkeypatch):
    """On SmolLM2-135M the sweep reproduces the model's own logits (full adapter and base); a 1% head error is refused."""
    import copy

    from lorabound.data import batches, encode_pairs, first_reference_pairs, load_task, split_task
    from lorabound.errors import LoraboundError
    from lorabound.model import apply_head, find_layer_stack
    from lorabound.surgery import adapter_layers

    base, tokenizer = real_model
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, scale=0.02)
    model.eval()
    task = load_task("e2e")
    examples = split_task(task, train=0, validation=2, test=0, seed=0).validation
    encoded = encode_pairs(tokenizer, task, first_reference_pairs(examples), 128)
    all_batches = list(batches(encoded, 2, tokenizer.pad_token_id))
    stack = find_layer_stack(model)
    analysis.check_reproduces_model(model, stack, all_batches, adapter_layers(model))  # raises if not reproduced
    monkeypatch.setattr(analysis, "apply_head", lambda stack, hidden: apply_head(stack, hidden) * 1.01)
    with pytest.raises(LoraboundError, match="LlamaForCausalLM's own logits"):
        analysis.check_reproduces_model(model, stack, all_batches, adapter_layers(model))
