"""Teacher-forced, per-layer curves of how LoRA helps predict the ground truth.

- truncation curve (the paper's signal): LoRA kept on layers <= b, for b = -1 (base: no adapter at all) .. L-1
  (full); when the adapter has parts no boundary drops (LoRA on the head or embeddings, modules_to_save), the
  "LoRA-layers-only" baseline (every layer's LoRA off, those parts on) is reported beside it;
- logit lens: the ground-truth probability read from each layer's hidden state (base and full adapter);
- single-layer ablation: LoRA dropped on one layer alone, the change in NLL.

The sweep shares work between boundaries. One forward pass with the full adapter yields, at the
output of layer b, exactly the hidden state of "LoRA on 0..b"; each boundary then runs only its
remaining layers without LoRA, and the output head is applied only at target positions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .data import Encoded, batches
from .errors import LoraboundError
from .files import write_json_atomic
from .model import LayerStack, apply_head, find_layer_stack, unwrap_model
from .surgery import adapter_layers, keep_lora, no_adapter, parts_outside_layers

CURVES = ("truncation", "logit_lens", "ablation")


# ---------------------------------------------------------------------------
# Running the layer stack piece by piece
# ---------------------------------------------------------------------------

@dataclass
class LayerTrace:
    """What one forward pass recorded: each layer's input hidden state, its other arguments, its output."""
    inputs: list[torch.Tensor] = field(default_factory=list)
    call_args: list[tuple[tuple, dict]] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)


def _hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _backbone(model):
    """The decoder without its output head (LlamaModel inside LlamaForCausalLM, GPT2Model, ...)."""
    base = unwrap_model(model)
    return getattr(base, base.base_model_prefix, base)


@torch.inference_mode()
def trace_layers(model, stack: LayerStack, input_ids, attention_mask) -> LayerTrace:
    """Run the decoder once (no head) and record every layer's input, call arguments and output."""
    trace = LayerTrace()

    def before(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        trace.inputs.append(hidden)
        trace.call_args.append((args[1:] if args else (), {k: v for k, v in kwargs.items() if k != "hidden_states"}))

    def after(module, args, kwargs, output):
        trace.outputs.append(_hidden_of(output))

    handles = []
    for layer in stack.layers:
        handles.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(layer.register_forward_hook(after, with_kwargs=True))
    try:
        _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if len(trace.outputs) != stack.num_layers:
        raise LoraboundError(f"the model ran {len(trace.outputs)} of its {stack.num_layers} layers; "
                             "lorabound cannot trace this architecture, open an issue with its class name")
    return trace


@torch.inference_mode()
def run_layers(stack: LayerStack, trace: LayerTrace, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """Continue from `hidden` (the input of layer `start`) through the rest of the stack, as the model is now set."""
    for index in range(start, stack.num_layers):
        args, kwargs = trace.call_args[index]
        hidden = _hidden_of(stack.layers[index](hidden, *args, **kwargs))
    return hidden


@dataclass
class Targets:
    """Where the ground-truth tokens are: rows and positions whose hidden state predicts them."""
    rows: torch.Tensor
    positions: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def from_labels(cls, labels: torch.Tensor) -> "Targets":
        predicts = labels[:, 1:] != -100           # hidden state at t predicts token t+1
        rows, positions = predicts.nonzero(as_tuple=True)
        return cls(rows=rows, positions=positions, tokens=labels[:, 1:][rows, positions])


class TokenScores:
    """Running sums of ground-truth probability, NLL and argmax hits (float64, in a fixed order)."""

    def __init__(self, n: int):
        self.prob = [0.0] * n
        self.nll = [0.0] * n
        self.hits = [0.0] * n
        self.tokens = 0

    def add(self, index: int, logits: torch.Tensor, targets: Targets) -> None:
        logp = torch.log_softmax(logits.double(), dim=-1)
        target_logp = logp.gather(1, targets.tokens[:, None]).squeeze(1)
        self.prob[index] += target_logp.exp().sum().item()
        self.nll[index] += (-target_logp).sum().item()
        self.hits[index] += (logits.argmax(-1) == targets.tokens).sum().item()

    def means(self) -> dict[str, list[float]]:
        n = max(self.tokens, 1)
        return {"mean_prob": [p / n for p in self.prob], "nll": [x / n for x in self.nll],
                "accuracy": [h / n for h in self.hits]}

    def state(self) -> dict:
        return {"prob": self.prob, "nll": self.nll, "hits": self.hits, "tokens": self.tokens}

    @classmethod
    def from_state(cls, state: dict) -> "TokenScores":
        scores = cls(len(state["prob"]))
        scores.prob, scores.nll, scores.hits, scores.tokens = state["prob"], state["nll"], state["hits"], state["tokens"]
        return scores


def head_logits(stack: LayerStack, hidden: torch.Tensor, targets: Targets) -> torch.Tensor:
    """Final norm and output head at the target positions only (the norm is applied once, here)."""
    return apply_head(stack, hidden[targets.rows, targets.positions]).float()


# ---------------------------------------------------------------------------
# The three curves for one batch
# ---------------------------------------------------------------------------

@torch.inference_mode()
def score_batch(model, stack: LayerStack, batch, boundaries: list[int], lora_layers: list[int],
                curves: tuple[str, ...], scores: dict[str, TokenScores]) -> None:
    batch = batch.to(next(model.parameters()).device)
    targets = Targets.from_labels(batch.labels)
    if targets.tokens.numel() == 0:
        return
    for s in scores.values():
        s.tokens += targets.tokens.numel()
    every = range(stack.num_layers)

    with keep_lora(model, every):
        full = trace_layers(model, stack, batch.input_ids, batch.attention_mask)

    if "truncation" in curves:
        with keep_lora(model, []):
            for i, b in enumerate(boundaries):
                # Input of layer b+1 when LoRA is on 0..b: the embeddings (b = -1) or layer b's output.
                start = full.inputs[0] if b < 0 else full.outputs[b]
                hidden = run_layers(stack, full, start, b + 1)
                logits = head_logits(stack, hidden, targets)
                if b < 0 and "layers_only" in scores:
                    scores["layers_only"].add(0, logits, targets)  # every layer's LoRA off, the other parts on
                else:
                    scores["truncation"].add(i, logits, targets)
        if "layers_only" in scores:
            # The adapter has parts outside the layers: b = -1 is the model without any of it, as in evaluation.
            with no_adapter(model):
                base = trace_layers(model, stack, batch.input_ids, batch.attention_mask)
                scores["truncation"].add(0, head_logits(stack, base.outputs[-1], targets), targets)

    if "logit_lens" in curves:
        with no_adapter(model):
            base = trace_layers(model, stack, batch.input_ids, batch.attention_mask)
            for layer in every:
                scores["lens_base"].add(layer, head_logits(stack, base.outputs[layer], targets), targets)
        for layer in every:
            scores["lens_full"].add(layer, head_logits(stack, full.outputs[layer], targets), targets)

    if "ablation" in curves:
        for i, layer in enumerate(lora_layers):
            with keep_lora(model, [other for other in every if other != layer]):
                hidden = run_layers(stack, full, full.inputs[layer], layer)
            scores["ablation"].add(i, head_logits(stack, hidden, targets), targets)


# ---------------------------------------------------------------------------
# The self-check: the sweep must reproduce the model's own logits
# ---------------------------------------------------------------------------

# Largest |sweep - model| logit difference accepted, relative to the largest |logit| (at least 1).
CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
CHECK_TOLERANCE_LOW_PRECISION = 3e-2  # bfloat16 / float16


@torch.inference_mode()
def check_reproduces_model(model, stack: LayerStack, all_batches: list, lora_layers: list[int]) -> None:
    """On the first batch with targets, the sweep's full-adapter (b = top LoRA layer) and b = -1 logits must equal
    model(...).logits with the adapter on and with it disabled. Otherwise the curves would describe some other
    model (an architecture with a step after its blocks that apply_head misses, a layer stack run differently)."""
    device = next(model.parameters()).device
    batch = next((b for b in all_batches if (b.labels[:, 1:] != -100).any()), None)
    if batch is None:
        return
    batch = batch.to(device)
    targets = Targets.from_labels(batch.labels)
    boundaries = [-1, lora_layers[-1]]
    outside = parts_outside_layers(model)
    scores = {"truncation": TokenScores(2), **({"layers_only": TokenScores(1)} if outside else {})}
    sweep = _record_logits(scores["truncation"])
    score_batch(model, stack, batch, boundaries, lora_layers, ("truncation",), scores)
    with keep_lora(model, range(stack.num_layers)):
        full = _model_logits(model, batch, targets)
    with no_adapter(model):
        base = _model_logits(model, batch, targets)
    for name, index, expected in (("the full adapter", 1, full), ("the base model (b = -1)", 0, base)):
        worst = (sweep[index].double() - expected.double()).abs().max().item()
        scale = max(1.0, expected.abs().max().item())
        tolerance = CHECK_TOLERANCE.get(next(model.parameters()).dtype, CHECK_TOLERANCE_LOW_PRECISION)
        if not worst <= tolerance * scale:
            arch = type(unwrap_model(model)).__name__
            raise LoraboundError(
                f"lorabound's layer sweep does not reproduce {arch}'s own logits for {name} (largest difference "
                f"{worst:.3g}, allowed {tolerance * scale:.3g}), so its curves would be wrong; {arch} is not "
                "supported yet: open an issue with this message and the model's class name")


def _record_logits(scores: TokenScores) -> dict[int, torch.Tensor]:
    """Keep the logits `scores` receives, by boundary index, while still scoring them."""
    seen: dict[int, torch.Tensor] = {}
    add = scores.add

    def recording_add(index, logits, targets):
        seen[index] = logits
        add(index, logits, targets)

    scores.add = recording_add
    return seen


def _model_logits(model, batch, targets: Targets) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits[:, :-1][targets.rows, targets.positions].float()


# ---------------------------------------------------------------------------
# Whole split, resumable
# ---------------------------------------------------------------------------

def analyze(model, encoded: Encoded, *, batch_size: int = 8, pad_token_id: int, curves: tuple[str, ...] = CURVES,
            checkpoint: str | Path | None = None, progress: bool = True, meta: dict | None = None) -> dict:
    """Compute the curves over every encoded example. Returns the curves dict (see report.py for its shape).

    With `checkpoint`, the running sums are saved after every batch and a rerun continues from there,
    giving the same numbers as an uninterrupted run.
    """
    unknown = set(curves) - set(CURVES)
    if unknown:
        raise LoraboundError(f"unknown curve {sorted(unknown)}; choose from {', '.join(CURVES)}")
    model.eval()
    stack = find_layer_stack(model)
    lora_layers = adapter_layers(model)
    outside = parts_outside_layers(model)
    boundaries = [-1] + lora_layers  # b between two LoRA layers equals the lower one: no need to run it
    sizes = {"truncation": len(boundaries), "layers_only": 1, "lens_base": stack.num_layers,
             "lens_full": stack.num_layers, "ablation": len(lora_layers)}
    wanted = {"truncation": ["truncation"] + (["layers_only"] if outside else []),
              "logit_lens": ["lens_base", "lens_full"], "ablation": ["ablation"]}
    names = [n for c in curves for n in wanted[c]]
    all_batches = list(batches(encoded, batch_size, pad_token_id))
    check_reproduces_model(model, stack, all_batches, lora_layers)
    fingerprint = _fingerprint(encoded, batch_size, curves, lora_layers + outside)

    state = _load_checkpoint(checkpoint, fingerprint)
    done = state["batches_done"] if state else 0
    scores = ({n: TokenScores.from_state(state["scores"][n]) for n in names} if state
              else {n: TokenScores(sizes[n]) for n in names})

    bar = tqdm(total=len(all_batches), initial=done, desc="analyze", unit="batch", disable=not progress)
    for index in range(done, len(all_batches)):
        score_batch(model, stack, all_batches[index], boundaries, lora_layers, tuple(curves), scores)
        if checkpoint is not None:
            write_json_atomic(checkpoint, {"fingerprint": fingerprint, "batches_done": index + 1,
                                           "scores": {n: s.state() for n, s in scores.items()}})
        bar.update(1)
    bar.close()

    result = {"meta": {**(meta or {}), "num_layers": stack.num_layers, "adapter_layers": lora_layers,
                       "n_examples": len(encoded.input_ids), "n_target_tokens": next(iter(scores.values())).tokens,
                       "n_truncated": encoded.n_truncated, "n_skipped": encoded.n_skipped, "batch_size": batch_size}}
    if "truncation" in scores:
        result["truncation"] = {"boundary": boundaries, **scores["truncation"].means()}
    if "layers_only" in scores:
        scores["layers_only"].tokens = scores["truncation"].tokens  # scored on the same tokens as the curve
        only = scores["layers_only"].means()
        result["truncation"]["layers_only_baseline"] = {
            "what": "LoRA off on every layer, the adapter's parts outside the layers on; b = -1 is the base model "
                    "with no adapter at all",
            "parts_on": outside, **{key: values[0] for key, values in only.items()}}
    if "lens_base" in scores:
        base, full = scores["lens_base"].means(), scores["lens_full"].means()
        result["logit_lens"] = {"layer": list(range(stack.num_layers)), "base_prob": base["mean_prob"],
                                "full_prob": full["mean_prob"], "base_nll": base["nll"], "full_nll": full["nll"]}
    if "ablation" in scores:
        ablated = scores["ablation"].means()
        full_nll = _full_nll(result, scores)
        result["ablation"] = {"layer": lora_layers, "nll": ablated["nll"], "full_nll": full_nll,
                              "delta_nll": [x - full_nll for x in ablated["nll"]] if full_nll is not None else None}
    return result


def _full_nll(result: dict, scores: dict[str, TokenScores]) -> float | None:
    if "truncation" in result:
        return result["truncation"]["nll"][-1]
    if "lens_full" in scores:
        return scores["lens_full"].means()["nll"][-1]
    return None


def _fingerprint(encoded: Encoded, batch_size: int, curves, lora_layers) -> str:
    blob = json.dumps([encoded.input_ids, encoded.labels, batch_size, list(curves), lora_layers])
    return hashlib.sha256(blob.encode()).hexdigest()


def _load_checkpoint(path, fingerprint: str) -> dict | None:
    if path is None or not Path(path).is_file():
        return None
    with contextlib.suppress(ValueError, KeyError):
        state = json.loads(Path(path).read_text())
        if state["fingerprint"] == fingerprint:
            return state
    return None


# ---------------------------------------------------------------------------
# The plain loop, for the benchmark and the equivalence tests
# ---------------------------------------------------------------------------

@torch.inference_mode()
def truncation_curve_plain(model, encoded: Encoded, *, batch_size: int, pad_token_id: int,
                           on_step: Callable[[], None] | None = None) -> dict:
    """The obvious way: for every boundary, toggle adapters and run the whole model, logits everywhere."""
    model.eval()
    lora_layers = adapter_layers(model)
    boundaries = [-1] + lora_layers
    scores = TokenScores(len(boundaries))
    device = next(model.parameters()).device
    for batch in batches(encoded, batch_size, pad_token_id):
        batch = batch.to(device)
        targets = Targets.from_labels(batch.labels)
        scores.tokens += targets.tokens.numel()
        for i, b in enumerate(boundaries):
            with no_adapter(model) if b < 0 else keep_lora(model, range(b + 1)):
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            scores.add(i, logits[:, :-1][targets.rows, targets.positions].float(), targets)
            if on_step:
                on_step()
    return {"boundary": boundaries, **scores.means()}
