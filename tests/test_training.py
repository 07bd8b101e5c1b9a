"""LoRA fine-tuning: tiny models for the mechanics, the real embedded model for the claim."""

import json
import math
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from lorabound.data import Splits, load_task, split_task
from lorabound.errors import LoraboundError
from lorabound.model import load_adapter, load_model
from lorabound.lora.masking import adapter_layers
from lorabound.options import TrainSettings
from lorabound.training import train

from tiny import tiny_llama, tiny_task, tiny_tokenizer


def tiny_splits():
    task = tiny_task()
    return task, split_task(task, train=5, validation=2, test=0, seed=0)


def test_tiny_training_saves_a_peft_adapter_and_lowers_loss(tmp_path):
    task, splits = tiny_splits()
    tok = tiny_tokenizer()
    settings = TrainSettings(rank=4, alpha=8, epochs=8, batch_size=4, learning_rate=5e-3, max_length=64,
                             checkpoint_every=3)
    result = train(tiny_llama(), tok, task, splits, tmp_path / "adapter", settings, progress=False)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob(".adapter.train-checkpoint*"))  # checkpoint removed at the end
    assert result.validation_loss_after < result.validation_loss_before
    assert result.train_loss_last < result.train_loss_first
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    assert adapter_layers(loaded) == [0, 1, 2, 3]
    log = json.loads((tmp_path / "adapter" / "lorabound_train.json").read_text())
    assert log["steps"] == result.steps == len(log["losses"])


def test_interrupted_training_resumes_from_checkpoint(tmp_path, monkeypatch):
    task, splits = tiny_splits()
    tok = tiny_tokenizer()
    settings = TrainSettings(rank=4, epochs=6, batch_size=2, learning_rate=5e-3, max_length=64, checkpoint_every=2,
                             dropout=0.0)
    whole = train(tiny_llama(), tok, task, splits, tmp_path / "whole", settings, progress=False)

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def dies(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dies)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_llama(), tok, task, splits, tmp_path / "resumed", settings, progress=False)
    assert not (tmp_path / "resumed").exists()  # no half-written adapter
    assert (tmp_path / ".resumed.train-checkpoint" / "state.json").is_file()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = train(tiny_llama(), tok, task, splits, tmp_path / "resumed", settings, progress=False)
    assert resumed.steps == whole.steps
    a = load_adapter(tiny_llama(), tmp_path / "whole")
    b = load_adapter(tiny_llama(), tmp_path / "resumed")
    x = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(a(input_ids=x).logits, b(input_ids=x).logits, atol=1e-5)


def test_early_stopping_keeps_the_adapter_of_the_lowest_validation_loss(tmp_path):
    # A learning rate high enough that the validation loss rises again: training stops after two evaluations
    # without a new low, and the saved adapter gives that lowest loss (measured again here, independently).
    from lorabound.data import encode_pairs, training_pairs
    from lorabound.training import mean_loss

    task, splits = tiny_splits()
    tok = tiny_tokenizer()
    settings = TrainSettings(rank=4, alpha=8, epochs=30, batch_size=2, learning_rate=8e-2, max_length=64,
                             dropout=0.0, early_stopping=2, eval_every=2, checkpoint_every=100)
    result = train(tiny_llama(), tok, task, splits, tmp_path / "adapter", settings, progress=False)
    losses = [h["loss"] for h in result.validation_history]
    best = min(losses)
    assert result.best_step == result.validation_history[losses.index(best)]["step"]
    assert result.steps < 30 * 3 and result.steps == result.validation_history[-1]["step"]  # stopped early
    assert [h["step"] for h in result.validation_history if h["step"] > result.best_step] == \
        [result.best_step + 2, result.best_step + 4]
    assert result.validation_loss_after == best
    saved = load_adapter(tiny_llama(), tmp_path / "adapter")
    valid = encode_pairs(tok, task, training_pairs(splits.validation), 64)
    assert mean_loss(saved, valid, 2, tok.pad_token_id) == pytest.approx(best, rel=1e-5)
    log = json.loads((tmp_path / "adapter" / "lorabound_train.json").read_text())
    assert log["best_step"] == result.best_step and log["validation_history"] == result.validation_history


def test_early_stopping_without_validation_is_refused_before_training(tmp_path):
    task = tiny_task()
    splits = split_task(task, train=5, validation=0, test=0, seed=0)
    with pytest.raises(LoraboundError, match="--early-stopping needs validation examples"):
        train(tiny_llama(), tiny_tokenizer(), task, splits, tmp_path / "a", TrainSettings(early_stopping=2),
              progress=False)
    assert not (tmp_path / "a").exists()


def _own_loss(model, batch, reduction="mean"):
    """The loss before the head ran at targets only: transformers' own, from the logits of every position."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    return out.loss * (batch.labels[:, 1:] != -100).sum() if reduction == "sum" else out.loss


def _trained_both_ways(monkeypatch, tmp_path, model_factory, tok, task, splits, settings):
    """Adapter tensors trained with training.target_loss, then with the model's own loss (same seed)."""
    import lorabound.training

    adapters = []
    for name in ("targets-only", "own-loss"):
        if name == "own-loss":
            monkeypatch.setattr(lorabound.training, "target_loss", _own_loss)
        train(model_factory(), tok, task, splits, tmp_path / name, settings, progress=False)
        adapters.append(load_file(str(tmp_path / name / "adapter_model.safetensors")))
    return adapters


def test_training_with_the_head_at_targets_only_equals_training_on_the_models_own_loss(tmp_path, monkeypatch):
    task, splits = tiny_splits()
    settings = TrainSettings(rank=4, alpha=8, epochs=4, batch_size=4, learning_rate=5e-3, max_length=64)
    fast, own = _trained_both_ways(monkeypatch, tmp_path, tiny_llama, tiny_tokenizer(), task, splits, settings)
    assert fast.keys() == own.keys()
    for name in own:
        torch.testing.assert_close(fast[name], own[name], atol=1e-6, rtol=1e-5)
    assert any(own[name].abs().sum() > 0 for name in own if "lora_B" in name)  # training moved B off zero


def test_training_refuses_existing_adapter_and_empty_split(tmp_path):
    task, splits = tiny_splits()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(LoraboundError, match="--overwrite"):
        train(tiny_llama(), tiny_tokenizer(), task, splits, tmp_path / "adapter", progress=False)
    empty = Splits(train=[], validation=splits.validation, test=[], seed=0)
    with pytest.raises(LoraboundError, match="train split is empty"):
        train(tiny_llama(), tiny_tokenizer(), task, empty, tmp_path / "new", progress=False)
    with pytest.raises(LoraboundError, match="--rank"):
        TrainSettings(rank=0)


@pytest.mark.real
def test_real_model_trains_saves_and_reloads(tmp_path):
    """SmolLM2-135M on real E2E data: a few steps lower the loss; the saved adapter reloads exactly."""
    model, tok = load_model("smollm2-135m")
    task = load_task("e2e")
    splits = split_task(task, train=4, validation=4, test=0, seed=0)
    settings = TrainSettings(epochs=2, batch_size=8, learning_rate=1e-3, max_length=96)
    result = train(model, tok, task, splits, tmp_path / "adapter", settings, model_spec="smollm2-135m",
                   progress=False)
    assert result.train_loss_last < result.train_loss_first
    assert result.validation_loss_after < result.validation_loss_before
    reloaded = load_adapter(load_model("smollm2-135m")[0], tmp_path / "adapter")
    ids = tok("Describe the restaurant.\nData: name: The Eagle\nText:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    assert adapter_layers(reloaded) == list(range(30))


@pytest.mark.real
def test_real_model_training_with_the_head_at_targets_only_equals_the_models_own_loss(tmp_path, monkeypatch):
    """Two steps on SmolLM2-135M and E2E (dropout on): the same adapter as training on model(labels=...).loss."""
    task = load_task("e2e")
    splits = split_task(task, train=3, validation=0, test=0, seed=0)
    settings = TrainSettings(epochs=1, batch_size=8, max_length=256)
    model_factory = lambda: load_model("smollm2-135m")[0]  # noqa: E731
    tok = load_model("smollm2-135m")[1]
    fast, own = _trained_both_ways(monkeypatch, tmp_path, model_factory, tok, task, splits, settings)
    for name in own:
        torch.testing.assert_close(fast[name], own[name], atol=1e-6, rtol=1e-5)
    assert any(own[name].abs().sum() > 0 for name in own if "lora_B" in name)


def test_diverging_training_stops_writes_nothing_and_a_lower_lr_reruns(tmp_path, capsys):
    """--lr 1000 is a valid flag but the run diverges: stop at the first non-finite value, keep the last
    good checkpoint, write no adapter; the rerun with a sane --lr replaces that checkpoint and succeeds."""
    task, splits = tiny_splits()
    wild = TrainSettings(rank=4, epochs=8, batch_size=2, learning_rate=1e3, max_length=64, checkpoint_every=2)
    with pytest.raises(LoraboundError) as err:
        train(tiny_llama(), tiny_tokenizer(), task, splits, tmp_path / "adapter", wild, progress=False)
    message = str(err.value)
    assert re.fullmatch(r"training diverged at step (\d+) of 40: the (loss|gradient norm) is nan, so no adapter was "
                        r"written \(the last good checkpoint, step \d+, stays in .*\.adapter\.train-checkpoint\); "
                        r"lower --lr \(now 1000, default 0\.0003\) or --alpha \(now 32\), or raise --warmup "
                        r"\(now 0\.1\), and rerun", message), message
    assert not (tmp_path / "adapter").exists()
    state = json.loads((tmp_path / ".adapter.train-checkpoint" / "state.json").read_text())
    assert state["diverged_at"] > state["step"] >= 2
    kept = load_file(str(tmp_path / ".adapter.train-checkpoint" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in kept.values())  # the kept checkpoint is a good one

    sane = TrainSettings(rank=4, epochs=8, batch_size=2, learning_rate=5e-3, max_length=64, checkpoint_every=2)
    result = train(tiny_llama(), tiny_tokenizer(), task, splits, tmp_path / "adapter", sane, progress=False)
    assert "replacing the checkpoint of a run that diverged" in capsys.readouterr().out
    assert result.steps == 40 and math.isfinite(result.train_loss_last)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


@pytest.mark.parametrize("validation,what", [(2, "the validation loss"), (0, "the loss")])
def test_training_refuses_a_model_with_non_finite_outputs(tmp_path, validation, what):
    """Found by the validation loss before training, or without a validation split by the first step's loss."""
    task = tiny_task()
    splits = split_task(task, train=5, validation=validation, test=0, seed=0)
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    with pytest.raises(LoraboundError, match=rf"training cannot start: {what} is nan before any update"):
        train(model, tiny_tokenizer(), task, splits, tmp_path / "adapter",
              TrainSettings(rank=4, epochs=1, batch_size=2, max_length=64), progress=False)
    assert not (tmp_path / "adapter").exists()


def test_an_update_that_makes_weights_non_finite_stops_training(tmp_path, monkeypatch):
    """Loss and gradients finite, but the step overflows a weight (as float16/bfloat16 weights can)."""
    task, splits = tiny_splits()
    real_step = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data[0, 0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    with pytest.raises(LoraboundError, match=r"training diverged at step 1 of 5: the update made LoRA weight "
                                             r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight "
                                             r"non-finite, so no adapter was written; lower --lr \(now 0\.0003"):
        train(tiny_llama(), tiny_tokenizer(), task, splits, tmp_path / "adapter",
              TrainSettings(rank=4, epochs=1, batch_size=2, max_length=64), progress=False)
    assert not (tmp_path / "adapter").exists()


def _overflowing_lora_b(monkeypatch) -> None:
    """After the real update, every LoRA B weight is huge but finite: the per-step checks pass, the forward
    overflows."""
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() == 2 and p.shape[1] == 4:  # lora_B: (out, r)
                    p.data.fill_(1e30)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def _validation_losses(monkeypatch, values) -> None:
    """mean_loss gives `values` in turn (before training, after it)."""
    import lorabound.training as training

    given = iter(values)
    monkeypatch.setattr(training, "mean_loss", lambda *a, **k: next(given))


@pytest.mark.parametrize("case,expected", [
    ("overflowing weights", r"training diverged at step 1 of 1: the validation loss after it is (nan|inf), so no "
                            r"adapter was written; lower --lr"),
    ("nan after", r"training diverged at step 1 of 1: the validation loss after it is nan, so no adapter was "
                  r"written; lower --lr \(now 0\.0003"),
    ("inf after", r"training diverged at step 1 of 1: the validation loss after it is inf, so no adapter"),
    ("-inf after", r"training diverged at step 1 of 1: the validation loss after it is -inf, so no adapter"),
    ("nan before", r"training cannot start: the validation loss is nan before any update, so no adapter was "
                   r"written; the model gives non-finite outputs"),
])
def test_a_non_finite_validation_loss_stops_training_and_writes_no_adapter(tmp_path, monkeypatch, case, expected):
    """Loss, gradients and weights finite at every step, yet the validation loss is not: no adapter either."""
    task, splits = tiny_splits()
    if case == "overflowing weights":
        _overflowing_lora_b(monkeypatch)
    else:
        value, when = case.split(" ")
        _validation_losses(monkeypatch, [float(value)] if when == "before" else [5.0, float(value)])
    settings = TrainSettings(rank=4, epochs=1, batch_size=16, max_length=64)  # one step
    with pytest.raises(LoraboundError) as err:
        train(tiny_llama(), tiny_tokenizer(), task, splits, tmp_path / "adapter", settings, progress=False)
    assert re.match(expected, str(err.value)), str(err.value)
    assert not (tmp_path / "adapter").exists()


def test_the_cli_exits_2_on_a_non_finite_validation_loss(tmp_path, monkeypatch, capsys):
    from lorabound.cli import main
    from tiny import save_tiny_base

    base = save_tiny_base(tmp_path)
    capsys.readouterr()  # the save's progress bar
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input": e.input, "target": e.references[0]}) + "\n"
                            for e in tiny_task().examples))
    _validation_losses(monkeypatch, [5.0, float("nan")])
    code = main(["--quiet", "train", "--model", str(base), "--data", str(data), "--validation-size", "2",
                 "--test-size", "1", "--max-length", "64", "--batch-size", "16", "--lr", "1e6",
                 "--out", str(tmp_path / "adapter")])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [
        "error: training diverged at step 1 of 1: the validation loss after it is nan, so no adapter was written; "
        "lower --lr (now 1e+06, default 0.0003) or --alpha (now 32), or raise --warmup (now 0.1), and rerun"], err
    assert not (tmp_path / "adapter").exists()


@pytest.mark.real
def test_real_model_training_whose_validation_loss_overflows_writes_no_adapter(tmp_path, monkeypatch):
    """SmolLM2-135M on E2E, one step whose update leaves LoRA B huge but finite: the per-step checks pass, the
    validation loss after it does not, and no adapter is written."""
    model, tok = load_model("smollm2-135m")
    task = load_task("e2e")
    splits = split_task(task, train=4, validation=2, test=0, seed=0)
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() == 2 and p.shape[1] == 4:  # lora_B at rank 4
                    p.data.fill_(1e30)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    settings = TrainSettings(rank=4, epochs=1, batch_size=64, max_length=96)  # one step
    with pytest.raises(LoraboundError, match=r"training diverged at step 1 of 1: the validation loss after it is "
                                             r"(nan|inf), so no adapter was written"):
        train(model, tok, task, splits, tmp_path / "adapter", settings, progress=False)
    assert not (tmp_path / "adapter").exists()
