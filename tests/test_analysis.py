"""The shared-work sweep gives the same curves as the obvious loop, on several architectures."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from lorabound.analysis import curves as analysis
from lorabound.analysis.curves import analyze, truncation_curve_plain
from lorabound.data import batches

from tiny import randomize_lora, real_sparse_lora, tiny_encoded, tiny_lora, tiny_tokenizer


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
    r = analyze(model, tiny_encoded(tok), batch_size=4, pad_token_id=tok.pad_token_id, progress=False, exact=True)
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
    r = analyze(model, encoded, batch_size=7, pad_token_id=tok.pad_token_id, progress=False, curves=("logit_lens",),
                exact=True)
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
    from lorabound.lora.masking import adapter_layers

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


# ---------------------------------------------------------------------------
# The cheaper default analysis (issue 11): float32 normaliser, lens and ablation on the first batches
# ---------------------------------------------------------------------------

def _encoded_rows(encoded, n):
    from lorabound.data import Encoded

    return Encoded(input_ids=encoded.input_ids[:n], labels=encoded.labels[:n], n_truncated=0, n_skipped=0)


def test_float32_normaliser_is_within_1e6_of_float64():
    logits = torch.randn(64, 5000, generator=torch.Generator().manual_seed(0)) * 6
    tokens = torch.randint(0, 5000, (64,), generator=torch.Generator().manual_seed(1))
    fast = analysis.target_log_probs(logits, tokens)
    exact = analysis.target_log_probs(logits, tokens, float64=True)
    assert fast.dtype == exact.dtype == torch.float64
    assert (fast - exact).abs().max().item() < 1e-5  # per token
    assert abs(fast.mean().item() - exact.mean().item()) < 1e-6
    assert (fast - exact).abs().max().item() > 0, "the two paths should really differ in rounding"


def test_default_truncation_curve_is_within_1e6_of_the_exact_one(tok):
    model = tiny_lora()
    encoded = tiny_encoded(tok)
    fast = analyze(model, encoded, batch_size=3, pad_token_id=tok.pad_token_id, progress=False)
    exact = analyze(model, encoded, batch_size=3, pad_token_id=tok.pad_token_id, progress=False, exact=True)
    for key in ("mean_prob", "nll", "accuracy"):
        assert all(abs(a - b) < 1e-6 for a, b in zip(fast["truncation"][key], exact["truncation"][key])), key
    assert fast["meta"]["n_target_tokens"] == exact["meta"]["n_target_tokens"]
    assert "approximated" not in fast["truncation"]
    assert fast["meta"]["exact_curves"] is False and exact["meta"]["exact_curves"] is True


def test_approximated_lens_and_ablation_are_the_exact_curves_of_the_first_batches(tok):
    model = tiny_lora()
    encoded = tiny_encoded(tok)  # 7 examples: 4 batches of 2, the first one (2 examples) approximates
    fast = analyze(model, encoded, batch_size=2, pad_token_id=tok.pad_token_id, progress=False)
    subset = analyze(model, _encoded_rows(encoded, 2), batch_size=2, pad_token_id=tok.pad_token_id,
                     progress=False, exact=True)
    for curve, keys in (("logit_lens", ("base_prob", "full_prob", "base_nll", "full_nll")),
                        ("ablation", ("nll", "delta_nll"))):
        for key in keys:
            assert all(abs(a - b) < 1e-6 for a, b in zip(fast[curve][key], subset[curve][key])), (curve, key)
        assert fast[curve]["approximated"]["examples"] == 2 and fast[curve]["approximated"]["of"] == 7
        assert "exact-curves" in fast[curve]["approximated"]["how"]
    assert abs(fast["ablation"]["full_nll"] - subset["truncation"]["nll"][-1]) < 1e-6
    whole = analyze(model, encoded, batch_size=2, pad_token_id=tok.pad_token_id, progress=False, exact=True)
    assert whole["logit_lens"]["full_prob"] != fast["logit_lens"]["full_prob"]  # really a subset


def test_analysis_batches_by_length_within_the_approximated_group_and_the_rest(tok):
    """Sorting by length cuts padding, but the approximated curves still cover the first examples in input order."""
    encoded = tiny_encoded(tok)  # 7 examples
    for row, cut in ((0, 6), (2, 1), (5, 4), (6, 2)):  # lengths that differ, so that order matters
        encoded.input_ids[row], encoded.labels[row] = encoded.input_ids[row][:-cut], encoded.labels[row][:-cut]
    sorted_batches, subset = analysis.analysis_batches(encoded, 2, tok.pad_token_id, exact=False)
    assert subset == 1
    assert sorted(sorted_batches[0].indices) == [0, 1]  # the approximated group: the first batch's examples
    assert sorted(i for b in sorted_batches for i in b.indices) == list(range(7))
    lengths = [len(ids) for ids in encoded.input_ids]
    assert all(lengths[b.indices[0]] == max(lengths[i] for i in b.indices) for b in sorted_batches)

    def padded(batches):
        return sum(b.attention_mask.numel() for b in batches)
    assert padded(sorted_batches) < padded(list(batches(encoded, 2, tok.pad_token_id)))
    exact, _ = analysis.analysis_batches(encoded, 2, tok.pad_token_id, exact=True)
    assert [len(b.indices) for b in exact] == [2, 2, 2, 1]
    assert [lengths[b.indices[0]] for b in exact] == sorted(lengths, reverse=True)[::2]


def test_approximated_plots_say_so(tok, tmp_path):
    from lorabound.report.document import _approximated

    model = tiny_lora()
    fast = analyze(model, tiny_encoded(tok), batch_size=2, pad_token_id=tok.pad_token_id, progress=False)
    assert _approximated(fast["logit_lens"]) == "\n(approximated: first 2 of 7 examples)"
    assert _approximated(fast["truncation"]) == ""


@pytest.mark.real
def test_real_model_float32_normaliser_within_1e6(real_model):
    """With SmolLM2's 49,152-token vocabulary the truncation curve moves by less than 1e-6."""
    import copy

    from lorabound.data import encode_pairs, first_reference_pairs, load_task, split_task

    base, tokenizer = real_model
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, scale=0.02)
    model.eval()
    task = load_task("e2e")
    examples = split_task(task, train=0, validation=4, test=0, seed=0).validation
    encoded = encode_pairs(tokenizer, task, first_reference_pairs(examples), 128)
    kwargs = dict(batch_size=4, pad_token_id=tokenizer.pad_token_id, progress=False, curves=("truncation",))
    fast = analyze(model, encoded, **kwargs)["truncation"]
    exact = analyze(model, encoded, exact=True, **kwargs)["truncation"]
    for key in ("mean_prob", "nll"):
        assert max(abs(a - b) for a, b in zip(fast[key], exact[key])) < 1e-6, key


# ---------------------------------------------------------------------------
# The joint (per-module-group) curve
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_joint_curve_every_cell_equals_a_direct_forward(tok, arch):
    model = tiny_lora() if arch == "llama" else tiny_arch(arch)
    encoded = tiny_encoded(tok)
    fast = analyze(model, encoded, batch_size=3, pad_token_id=tok.pad_token_id, curves=("truncation", "joint"),
                   progress=False)
    plain = analysis.joint_curve_plain(model, encoded, batch_size=3, pad_token_id=tok.pad_token_id)
    joint = fast["joint"]
    n = len(fast["truncation"]["boundary"])
    assert joint["attention_boundary"] == plain["attention_boundary"] == fast["truncation"]["boundary"]
    for key in ("mean_prob", "nll", "accuracy"):
        assert len(joint[key]) == n and all(len(row) == n for row in joint[key])
        for row, expected in zip(joint[key], plain[key]):
            assert close(row, expected), key
    # No LoRA outside attention and MLP here: the diagonal (Ba = Bm) is the truncation curve.
    assert close([joint["mean_prob"][i][i] for i in range(n)], fast["truncation"]["mean_prob"])
    # The groups matter separately: some off-diagonal cells differ from both neighbours on the diagonal.
    cells = {round(p, 6) for row in plain["mean_prob"] for p in row}
    assert len(cells) > n


def test_joint_curve_cell_is_keep_selection_with_per_group_boundaries(tok):
    """One cell against a forward with Selection.per_group built by hand (not via joint_selection)."""
    from lorabound.lora.selection import Selection
    from lorabound.lora.masking import keep_selection

    model = tiny_lora()
    encoded = tiny_encoded(tok)
    joint = analyze(model, encoded, batch_size=8, pad_token_id=tok.pad_token_id, curves=("joint",),
                    progress=False, exact=True)["joint"]
    batch = next(iter(analysis.batches(encoded, 8, tok.pad_token_id)))
    targets = analysis.Targets.from_labels(batch.labels)
    with keep_selection(model, Selection.per_group({"attention": 2, "mlp": 0})):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1][targets.rows, targets.positions].double(), -1)
    expected = logp.gather(1, targets.tokens[:, None]).exp().mean().item()
    assert close([joint["mean_prob"][3][1]], [expected])  # rows and columns are indexed from b = -1


def test_joint_curve_refuses_an_adapter_without_mlp_lora(tok):
    from lorabound.errors import LoraboundError

    model = tiny_lora(target_modules=["q_proj", "v_proj"])
    with pytest.raises(LoraboundError, match="no LoRA on mlp modules"):
        analyze(model, tiny_encoded(tok), batch_size=8, pad_token_id=tok.pad_token_id, curves=("joint",),
                progress=False)


@pytest.mark.real
def test_real_model_joint_curve_equals_direct_forwards(real_model):
    """On SmolLM2-135M (30 layers), LoRA on 4 of them: every (Ba, Bm) cell equals a whole-model forward with
    keep_selection, and the diagonal is the truncation curve."""
    model, tokenizer, encoded = real_sparse_lora(real_model, validation=2)
    result = analyze(model, encoded, batch_size=2, pad_token_id=tokenizer.pad_token_id, progress=False,
                     curves=("truncation", "joint"))
    plain = analysis.joint_curve_plain(model, encoded, batch_size=2, pad_token_id=tokenizer.pad_token_id)
    joint = result["joint"]
    assert joint["attention_boundary"] == [-1, 0, 5, 17, 29]
    for key in ("mean_prob", "nll"):
        for row, expected in zip(joint[key], plain[key]):
            assert close(row, expected, tol=1e-4), key
    assert close([joint["nll"][i][i] for i in range(5)], result["truncation"]["nll"], tol=1e-6)
