"""Greedy drop: remove LoRA one layer at a time, the layer whose LoRA matters least on validation.

"Matters least" is the single-layer ablation re-measured after every removal: with LoRA kept on the set S, for
each layer l in S the mean ground-truth probability with LoRA on S without l (teacher-forced, every validation
example); the layer whose removal leaves the highest probability goes (ties: the higher layer). The result is a
path of nested layer sets from the full adapter down to no LoRA layer, each with its curve values, which the
search (search/modules.py) reads like the truncation curve.

Work is shared as in the truncation sweep: one pass with LoRA on S records every layer's input, and removing l
reruns only layers l..L-1. A step with S kept costs L + sum over l in S of (L - l) layer passes per batch. The
whole path costs between about L^3 / 6 (the lowest layers removed first) and L^3 / 3 (the highest first), against
L + L(L + 1) / 2 for the truncation sweep: 12 to 21 times the sweep for L = 30 (bench/joint.py measures it); a
--keep-fraction budget stops the path early.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..data import Encoded, batches
from ..errors import LoraboundError
from ..lora.selection import Selection
from ..lora.masking import adapter_layers, keep_selection
from ..model import find_layer_stack
from .curves import TokenScores, Targets, head_logits, run_layers, trace_layers


def params_kept(layers, params_per_layer: dict[int, int]) -> int:
    return sum(params_per_layer.get(layer, 0) for layer in layers)


def params_budget(params_per_layer: dict[int, int], keep_fraction: float) -> int:
    """The most LoRA parameters a selection may keep under --keep-fraction, refusing a budget nothing meets."""
    total = sum(params_per_layer.values())
    budget = keep_fraction * total
    if not any(n <= budget for n in params_per_layer.values()) and keep_fraction < 1:
        smallest = min(params_per_layer.values()) / total
        raise LoraboundError(f"--keep-fraction {keep_fraction:g} keeps fewer LoRA parameters than any one layer "
                             f"holds (the smallest layer is {smallest:.3g} of them), so only no LoRA at all would "
                             f"meet it; pass at least {smallest:.3g}, or use the base model")
    return math.floor(budget + 1e-9)  # 0.3 * 1000 is 299.99999999999994


@torch.inference_mode()
def greedy_path(model, encoded: Encoded, *, batch_size: int, pad_token_id: int, params_per_layer: dict[int, int],
                stop_at_params: int | None = None, progress: bool = True) -> dict:
    """The greedy removal path; with `stop_at_params`, it stops at the first set keeping at most that many
    LoRA parameters (a parameter budget needs no more steps)."""
    model.eval()
    stack = find_layer_stack(model)
    kept = adapter_layers(model)
    device = next(model.parameters()).device
    all_batches = [b.to(device) for b in batches(encoded, batch_size, pad_token_id)]
    if not any((b.labels[:, 1:] != -100).any() for b in all_batches):
        raise LoraboundError("no validation target tokens to measure the layers on; raise --validation-size")
    steps, passes, current = [], 0, None
    bar = tqdm(total=len(kept), desc="greedy drop", unit="layer", disable=not progress)
    while kept:
        scores = TokenScores(len(kept) + 1)  # index 0: LoRA on `kept`; i + 1: `kept` without kept[i]
        for batch in all_batches:
            passes += _score_removals(model, stack, batch, kept, scores)
        means = scores.means()
        if current is None:
            current = _point(kept, means, 0, params_per_layer, None)
            steps.append(current)
            if stop_at_params is not None and current["params_kept"] <= stop_at_params:
                break
        best = max(range(len(kept)), key=lambda i: (means["mean_prob"][i + 1], kept[i]))
        removed = kept[best]
        kept = [layer for layer in kept if layer != removed]
        current = _point(kept, means, best + 1, params_per_layer, removed)
        steps.append(current)
        bar.update(1)
        if stop_at_params is not None and current["params_kept"] <= stop_at_params:
            break
    bar.close()
    return {"what": "LoRA removed one layer at a time, the layer whose removal leaves the highest mean ground-truth "
                    "probability on validation (single-layer ablation re-measured after each removal; exact, every "
                    "validation example); LoRA outside the layers stays on",
            "steps": steps, "layer_passes_per_batch": passes / len(all_batches),
            "num_layers": stack.num_layers, "params_total": sum(params_per_layer.values())}


def _point(kept: list[int], means: dict, index: int, params_per_layer: dict[int, int], removed: int | None) -> dict:
    return {"removed": removed, "kept": list(kept), "params_kept": params_kept(kept, params_per_layer),
            **{key: values[index] for key, values in means.items()}}


def _score_removals(model, stack, batch, kept: list[int], scores: TokenScores) -> int:
    """Score LoRA on `kept` and each `kept` minus one layer on one batch; returns the layer passes it ran."""
    targets = Targets.from_labels(batch.labels)
    if targets.tokens.numel() == 0:
        return 0
    scores.tokens += targets.tokens.numel()
    with keep_selection(model, Selection.layers(kept)):
        trace = trace_layers(model, stack, batch.input_ids, batch.attention_mask)
    scores.add(0, head_logits(stack, trace.outputs[-1], targets), targets)
    passes = stack.num_layers
    for i, layer in enumerate(kept):
        # Layers below `layer` run as with LoRA on `kept`: start from that pass's input of `layer`.
        with keep_selection(model, Selection.layers([other for other in kept if other != layer])):
            hidden = run_layers(stack, trace, trace.inputs[layer], layer)
        scores.add(i + 1, head_logits(stack, hidden, targets), targets)
        passes += stack.num_layers - layer
    return passes

