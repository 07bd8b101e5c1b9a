"""Ordinary LoRA fine-tuning on all layers: the adapter the rest of the pipeline analyses.

Loss is on target tokens only. Training checkpoints into a hidden folder beside the output after every
`checkpoint_every` steps, so an interrupted run continues where it stopped; the adapter folder itself
is written atomically at the end, in PEFT's own format.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import (Encoded, Splits, Task, batches, by_length, encode_pairs, input_fingerprints, require_nonempty,
                   training_pairs)
from .errors import LoraboundError
from .model import head_only_at
from .options import TrainSettings
from .runtime.files import atomic_dir, check_output_dir, write_json_atomic


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    train_loss_first: float
    train_loss_last: float
    validation_loss_before: float | None
    validation_loss_after: float | None  # with --early-stopping: the lowest, whose adapter was saved
    trainable_params: int
    seconds: float
    n_truncated: int
    n_skipped: int
    validation_history: list[dict] = field(default_factory=list)  # --early-stopping: {"step", "loss"} per check
    best_step: int | None = None  # --early-stopping: the step whose adapter was saved


def lora_config(settings: TrainSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=settings.target_modules, use_rslora=settings.use_rslora, use_dora=settings.use_dora,
        task_type="CAUSAL_LM",
    )


def target_loss(model, batch, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the target tokens (labels != -100), what transformers' loss gives for `labels`.

    The output head runs only at the positions that predict a target (model.head_only_at): the same logits for
    those rows, and the other rows never had a gradient. tests/test_training.py checks that the trained adapter
    equals the one trained on the model's own loss.
    """
    predicts = torch.zeros_like(batch.labels, dtype=torch.bool)
    predicts[:, :-1] = batch.labels[:, 1:] != -100  # the hidden state at t predicts token t + 1
    with head_only_at(model, predicts) as gathered:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits[0] if gathered[0] else logits[predicts]
    return torch.nn.functional.cross_entropy(logits.float(), batch.labels[:, 1:][predicts[:, :-1]],
                                             reduction=reduction)


@torch.no_grad()
def mean_loss(model, encoded: Encoded, batch_size: int, pad_token_id: int) -> float:
    """Token-weighted mean cross-entropy on target tokens (batched by length: less padding, same value)."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in batches(encoded, batch_size, pad_token_id, order=by_length(encoded)):
        batch = batch.to(device)
        total += target_loss(model, batch, reduction="sum").item()
        count += int((batch.labels[:, 1:] != -100).sum())
    return total / max(count, 1)


def train(model, tokenizer, task: Task, splits: Splits, out_dir: str | Path, settings: TrainSettings | None = None,
          *, model_spec: str = "", overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Fine-tune LoRA on every layer and save a PEFT adapter to `out_dir`."""
    settings = settings or TrainSettings()
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite, "--out")
    require_nonempty(splits.train, "train")
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)

    train_set = encode_pairs(tokenizer, task, training_pairs(splits.train), settings.max_length)
    valid_set = (encode_pairs(tokenizer, task, training_pairs(splits.validation), settings.max_length)
                 if splits.validation else None)
    pad = tokenizer.pad_token_id
    if settings.early_stopping and not valid_set:
        raise LoraboundError("--early-stopping needs validation examples to measure the loss on; raise "
                             "--validation-size above 0, or drop --early-stopping")

    peft_model = get_peft_model(model, lora_config(settings))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    steps_per_epoch = math.ceil(len(train_set.input_ids) / settings.batch_size)
    total_steps = max(1, math.ceil(steps_per_epoch * settings.epochs))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=settings.learning_rate)
    warmup = max(1, int(settings.warmup * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))))

    checkpoint = out_dir.parent / f".{out_dir.name}.train-checkpoint"
    fingerprint = json.dumps([asdict(settings), model_spec, task.name, train_set.input_ids[:50]], default=str)
    step, losses, validation_before = _resume(checkpoint, fingerprint, peft_model, optimizer, scheduler)
    stopper = _EarlyStopping(settings, steps_per_epoch, peft_model, checkpoint)
    guard = _DivergenceGuard(total_steps, settings, checkpoint, peft_model)
    if step == 0 and valid_set is not None:
        validation_before = mean_loss(peft_model, valid_set, settings.batch_size, pad)
        guard.check_validation(validation_before, before=True)

    device = next(peft_model.parameters()).device
    started = time.time()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress)
    peft_model.train()
    for epoch in range(math.ceil(settings.epochs)):
        for index, batch in enumerate(batches(train_set, settings.batch_size, pad, shuffle_seed=settings.seed + epoch)):
            global_step = epoch * steps_per_epoch + index
            if global_step < step:
                continue  # done before an interruption
            if global_step >= total_steps:
                break
            torch.manual_seed(settings.seed * 1_000_003 + global_step)  # dropout masks independent of resumes
            batch = batch.to(device)
            loss = target_loss(peft_model, batch)
            guard.step, guard.fresh = global_step + 1, not losses
            guard.check(loss, "the loss")
            loss.backward()
            guard.check(torch.nn.utils.clip_grad_norm_(peft_model.parameters(), 1.0), "the gradient norm")
            optimizer.step()
            guard.check_weights()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step = global_step + 1
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
            if stopper.due(step, total_steps):
                measured = mean_loss(peft_model, valid_set, settings.batch_size, pad)
                guard.check_validation(measured)
                stopper.record(step, measured)
                peft_model.train()
            if step % settings.checkpoint_every == 0 and step < total_steps:
                _save_checkpoint(checkpoint, fingerprint, peft_model, optimizer, scheduler, step, losses,
                                 validation_before)
                stopper.save()
            if stopper.stopped:
                break
        if stopper.stopped:
            break
    bar.close()

    if stopper.active:
        stopper.restore_best()
        if progress:
            bar.write(stopper.summary())
    validation_after = (stopper.best_loss if stopper.active
                        else mean_loss(peft_model, valid_set, settings.batch_size, pad) if valid_set else None)
    guard.step = step
    guard.check_validation(validation_after)
    result = TrainResult(
        adapter_dir=out_dir, steps=step, train_loss_first=losses[0], train_loss_last=sum(losses[-5:]) / len(losses[-5:]),
        validation_loss_before=validation_before, validation_loss_after=validation_after,
        trainable_params=trainable, seconds=time.time() - started,
        n_truncated=train_set.n_truncated, n_skipped=train_set.n_skipped,
        validation_history=stopper.history, best_step=stopper.best_step if stopper.active else None,
    )
    with atomic_dir(out_dir, overwrite=overwrite, what="--out") as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        write_json_atomic(tmp / "lorabound_train.json", {
            "settings": asdict(settings), "model": model_spec, "task": task.name, "task_source": task.source,
            "template": task.template, "sizes": {"train": len(splits.train), "validation": len(splits.validation)},
            "seed": splits.seed, "train_pairs": len(train_set.input_ids), "losses": losses,
            "train_input_hashes": input_fingerprints(splits.train),
            **{k: v for k, v in asdict(result).items() if k != "adapter_dir"},
        })
    shutil.rmtree(checkpoint, ignore_errors=True)
    peft_model.eval()
    return result


class _EarlyStopping:
    """--early-stopping: the validation loss every `eval_every` steps (default: each epoch's end); training stops
    after `early_stopping` evaluations without a new lowest loss, and the adapter of the lowest loss is kept.

    Its history and the best weights travel with the training checkpoint, so a resumed run decides as an
    uninterrupted one would."""

    def __init__(self, settings: TrainSettings, steps_per_epoch: int, model, checkpoint: Path):
        self.active = settings.early_stopping > 0
        self.patience = settings.early_stopping
        self.every = settings.eval_every or steps_per_epoch
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.folder = checkpoint
        self.history: list[dict] = []
        self.best_step, self.best_loss, self.best = None, math.inf, None
        self.stopped = False
        state = checkpoint / "early_stopping.json"
        if self.active and state.is_file():  # resumed: the checkpoint's state (written with it)
            saved = json.loads(state.read_text())
            self.history, self.best_step, self.best_loss = saved["history"], saved["best_step"], saved["best_loss"]
            self.best = load_file(str(checkpoint / "best.safetensors")) if self.best_step is not None else None

    def due(self, step: int, total: int) -> bool:
        return self.active and (step % self.every == 0 or step == total) and \
            not any(h["step"] == step for h in self.history)

    def record(self, step: int, loss: float) -> None:
        self.history.append({"step": step, "loss": loss})
        if loss < self.best_loss:
            self.best_step, self.best_loss = step, loss
            self.best = {n: p.detach().clone() for n, p in self.trainable.items()}
        since = sum(1 for h in self.history if h["step"] > self.best_step)
        self.stopped = since >= self.patience

    def save(self) -> None:
        """Beside the step checkpoint just written (its folder is replaced whole at every checkpoint)."""
        if not self.active:
            return
        if self.best is not None:
            save_file(self.best, str(self.folder / "best.safetensors"))
        write_json_atomic(self.folder / "early_stopping.json",
                          {"history": self.history, "best_step": self.best_step, "best_loss": self.best_loss})

    def restore_best(self) -> None:
        if self.best is None:
            return
        with torch.no_grad():
            for name, value in self.best.items():
                self.trainable[name].copy_(value)

    def summary(self) -> str:
        last = self.history[-1]["step"] if self.history else 0
        how = (f"stopped at step {last}: no lower validation loss in {self.patience} evaluations"
               if self.stopped else f"trained every step (to {last})")
        return f"early stopping: {how}; kept step {self.best_step} (validation loss {self.best_loss:.4f})"


class _DivergenceGuard:
    """Stops training at the first non-finite loss, gradient norm, LoRA weight or validation loss: no adapter is
    written.

    The last checkpoint stays, marked as diverged, so a rerun with the same settings stops at the same
    step and a rerun with other settings (a lower --lr) starts afresh instead of being refused.
    """

    def __init__(self, total: int, settings: TrainSettings, checkpoint: Path, model):
        self.total, self.settings, self.checkpoint = total, settings, checkpoint
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.step, self.fresh = 0, True  # set before each step; fresh: no update made yet in this process

    def check(self, value: torch.Tensor, what: str) -> None:
        if not bool(torch.isfinite(value.detach()).all()):
            self.stop(f"{what} is {value.item():g}")

    def check_validation(self, loss: float | None, before: bool = False) -> None:
        """Weights can stay finite and still overflow the forward pass: the validation loss says so."""
        if loss is None or math.isfinite(loss):
            return
        if before:
            raise LoraboundError(_cannot_start(f"the validation loss is {loss:g}"))
        self.stop(f"the validation loss after it is {loss:g}")

    def check_weights(self) -> None:
        if bool(torch.stack([torch.isfinite(p.detach()).all() for _, p in self.trainable]).all()):
            return  # one device sync per step; the name is looked up only on failure
        name = next(n for n, p in self.trainable if not bool(torch.isfinite(p.detach()).all()))
        self.stop(f"the update made LoRA weight {name.replace('.default', '')} non-finite")

    def stop(self, what: str) -> None:
        if self.fresh and self.step == 1 and what.startswith("the loss"):
            raise LoraboundError(_cannot_start(what))
        kept = ""
        state_file = self.checkpoint / "state.json"
        if state_file.is_file():
            state = json.loads(state_file.read_text())
            write_json_atomic(state_file, {**state, "diverged_at": self.step})
            kept = f" (the last good checkpoint, step {state['step']}, stays in {self.checkpoint})"
        s = self.settings
        raise LoraboundError(
            f"training diverged at step {self.step} of {self.total}: {what}, so no adapter was written{kept}; "
            f"lower --lr (now {s.learning_rate:g}, default {TrainSettings.learning_rate:g}) or --alpha "
            f"(now {s.alpha:g}), or raise --warmup (now {s.warmup:g}), and rerun")


def _cannot_start(what: str) -> str:
    return (f"training cannot start: {what} before any update, so no adapter was written; the model gives "
            "non-finite outputs on this data: load it in --dtype float32, or check the model files")


def _save_checkpoint(folder: Path, fingerprint, model, optimizer, scheduler, step, losses, validation_before):
    """Adapter weights, AdamW moments and counters, pickle-free; the folder is replaced atomically."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    opt = optimizer.state_dict()
    moments = {f"{key}/{name}": value.detach().clone().reshape(-1) if value.dim() == 0 else value
               for i, name in enumerate(names) for key, value in opt["state"].get(i, {}).items()}
    with atomic_dir(folder, overwrite=True, what="training checkpoint") as tmp:
        save_file({n: params[n].detach().clone() for n in names}, str(tmp / "trainable.safetensors"))
        save_file(moments, str(tmp / "optimizer.safetensors"))
        write_json_atomic(tmp / "state.json", {"fingerprint": fingerprint, "step": step, "losses": losses,
                                               "validation_before": validation_before,
                                               "scheduler": scheduler.state_dict()})


def _resume(folder: Path, fingerprint, model, optimizer, scheduler):
    """Load a matching checkpoint (pickle-free); returns (step, losses, validation_before)."""
    state_file = folder / "state.json"
    if not state_file.is_file():
        return 0, [], None
    state = json.loads(state_file.read_text())
    if state["fingerprint"] != fingerprint and state.get("diverged_at"):
        print(f"replacing the checkpoint of a run that diverged at step {state['diverged_at']} ({folder})")
        shutil.rmtree(folder)
        return 0, [], None
    if state["fingerprint"] != fingerprint:
        raise LoraboundError(f"{folder} holds a checkpoint of a different training run; delete it to start afresh")
    params = dict(model.named_parameters())
    for name, value in load_file(str(folder / "trainable.safetensors")).items():
        params[name].data.copy_(value)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    moments = load_file(str(folder / "optimizer.safetensors"))
    opt = optimizer.state_dict()
    for i, name in enumerate(names):
        entry = {key.split("/", 1)[0]: value for key, value in moments.items() if key.split("/", 1)[1] == name}
        if entry:
            entry["step"] = entry["step"].reshape(())
            opt["state"][i] = entry
    optimizer.load_state_dict(opt)
    scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # the scheduler sets it only at its next step
    print(f"resuming training from step {state['step']} ({folder})")
    return state["step"], state["losses"], state["validation_before"]
