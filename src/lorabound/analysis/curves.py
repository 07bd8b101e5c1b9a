"""Teacher-forced, per-layer curves of how LoRA helps predict the ground truth.

- truncation curve (the paper's signal): LoRA kept on layers <= b, for b = -1 (base: no adapter at all) .. L-1
  (full); when the adapter has parts no boundary drops (LoRA on the head or embeddings, modules_to_save), the
  "LoRA-layers-only" baseline (every layer's LoRA off, those parts on) is reported beside it;
- logit lens: the ground-truth probability read from each layer's hidden state (base and full adapter);
- single-layer ablation: LoRA dropped on one layer alone, the change in NLL;
- joint curve (on request, "joint"): the truncation curve per module group, every pair (Ba, Bm) of attention LoRA
  kept on layers <= Ba and MLP LoRA kept on layers <= Bm (see _joint_batch for how it shares work).

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

from ..data import Encoded, batches, by_length
from ..errors import LoraboundError
from ..rules import CURVES, OPTIONAL_CURVES
from ..lora.selection import Selection
from ..lora.masking import adapter_layers, keep_lora, keep_selection, lora_modules, no_adapter, parts_outside_layers
from ..model import LayerStack, apply_head, find_layer_stack, unwrap_model
from ..runtime import distributed
from ..runtime.files import write_json_atomic

JOINT_GROUPS = ("attention", "mlp")


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
def run_layers(stack: LayerStack, trace: LayerTrace, hidden: torch.Tensor, start: int,
               record: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Continue from `hidden` (the input of layer `start`) through the rest of the stack, as the model is now set.

    With `record`, every layer's output from `start` on is appended to it."""
    for index in range(start, stack.num_layers):
        args, kwargs = trace.call_args[index]
        hidden = _hidden_of(stack.layers[index](hidden, *args, **kwargs))
        if record is not None:
            record.append(hidden)
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


def target_log_probs(logits: torch.Tensor, tokens: torch.Tensor, float64: bool = False) -> torch.Tensor:
    """log p(target) per row, in float64.

    By default the normaliser (logsumexp over the vocabulary) is computed in float32 and only the per-token
    results go on in float64: the whole-vocabulary log-softmax in float64 costs as much as the head itself,
    and the curves move by less than 1e-6 (tests/test_analysis.py). `float64` is the exact reference.
    """
    if float64:
        return torch.log_softmax(logits.double(), dim=-1).gather(1, tokens[:, None]).squeeze(1)
    target = logits.gather(1, tokens[:, None]).squeeze(1)
    return target.double() - torch.logsumexp(logits.float(), dim=-1).double()


class TokenScores:
    """Running sums of ground-truth probability, NLL and argmax hits (float64, in a fixed order)."""

    def __init__(self, n: int, float64: bool = False):
        self.prob = [0.0] * n
        self.nll = [0.0] * n
        self.hits = [0.0] * n
        self.tokens = 0
        self.float64 = float64  # log-softmax over the vocabulary in float64 (the exact, slower reference)

    def add(self, index: int, logits: torch.Tensor, targets: Targets) -> None:
        target_logp = target_log_probs(logits, targets.tokens, self.float64)
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
    def from_state(cls, state: dict, float64: bool = False) -> "TokenScores":
        scores = cls(len(state["prob"]), float64)
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
    counted = {"truncation": ["truncation"], "logit_lens": ["lens_base", "lens_full"],
               "ablation": ["ablation", "ablation_full"], "joint": ["joint"]}
    for name in (n for c in curves for n in counted[c] if n in scores):
        scores[name].tokens += targets.tokens.numel()
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
        if "ablation_full" in scores:  # the reference NLL on the same examples as the approximated ablation
            scores["ablation_full"].add(0, head_logits(stack, full.outputs[-1], targets), targets)
        for i, layer in enumerate(lora_layers):
            with keep_lora(model, [other for other in every if other != layer]):
                hidden = run_layers(stack, full, full.inputs[layer], layer)
            scores["ablation"].add(i, head_logits(stack, hidden, targets), targets)

    if "joint" in curves:
        _joint_batch(model, stack, full, boundaries, targets, scores["joint"])


def joint_selection(attention: int, mlp: int, top: int) -> Selection:
    """The joint curve's cell: attention LoRA on layers 0..attention, MLP LoRA on 0..mlp; LoRA on any other module
    group of the layers (neither attention nor MLP) stays on every layer."""
    return Selection.per_group({"attention": attention, "mlp": mlp, "other": top})


@torch.inference_mode()
def _joint_batch(model, stack: LayerStack, full: LayerTrace, boundaries: list[int], targets: Targets,
                 scores: TokenScores) -> None:
    """Every cell (Ba, Bm) of the joint curve for one batch, cell index = i(Ba) * len(boundaries) + i(Bm).

    Exact and shared like the truncation sweep. A cell with Ba < Bm agrees with the full adapter on layers 0..Ba,
    with "attention on 0..Ba, MLP everywhere" up to layer Bm, and has no LoRA above. So for each Ba one partial
    pass from the full adapter's output of layer Ba (attention LoRA off above it) records the hidden state after
    every layer, and each Bm > Ba runs only its layers above Bm without LoRA; the same with the groups swapped
    for Bm < Ba, and the diagonal (Ba = Bm) is the truncation sweep itself. Each layer then runs once per distinct
    selection of the layers up to it: sum over layers i of (i + 2)^2 layer passes, against sum of (i + 2) for the
    truncation sweep, about 2L/3 times as many.
    """
    n, top = len(boundaries), stack.num_layers - 1
    position = {b: i for i, b in enumerate(boundaries)}
    off = joint_selection(-1, -1, top)

    def start_after(b: int) -> torch.Tensor:  # the full adapter's hidden state entering layer b + 1
        return full.inputs[0] if b < 0 else full.outputs[b]

    def score_tail(ba: int, bm: int, hidden: torch.Tensor, start: int) -> None:
        logits = head_logits(stack, run_layers(stack, full, hidden, start), targets)
        scores.add(position[ba] * n + position[bm], logits, targets)

    with keep_selection(model, off):
        for b in boundaries:
            score_tail(b, b, start_after(b), b + 1)
    for lower in JOINT_GROUPS:  # the group whose boundary is the lower one
        for b in boundaries[:-1]:
            recorded: list[torch.Tensor] = []
            upper = {"attention": top, "mlp": top, lower: b}
            with keep_selection(model, joint_selection(upper["attention"], upper["mlp"], top)):
                run_layers(stack, full, start_after(b), b + 1, record=recorded)
            with keep_selection(model, off):
                for c in (c for c in boundaries if c > b):
                    cell = (b, c) if lower == "attention" else (c, b)
                    score_tail(*cell, recorded[c - b - 1], c + 1)

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

# Without --exact-curves the logit lens and the ablation (which the boundary search does not read) run on
# the first quarter of the validation batches: their cost is then well under the truncation sweep's.
APPROXIMATE_SHARE = 0.25


def approximated_batches(n_batches: int, exact: bool) -> int:
    """How many leading batches the logit lens and the ablation run on."""
    return n_batches if exact else min(n_batches, max(1, round(n_batches * APPROXIMATE_SHARE)))


def analysis_batches(encoded: Encoded, batch_size: int, pad_token_id: int, exact: bool) -> tuple[list, int]:
    """(batches, how many leading ones the approximated curves use).

    Rows are batched by length, which cuts the padding the layers run on (21% -> 12% of the positions on the
    demo's validation split), but within two groups: the examples of the leading batches in input order
    (those the approximated curves cover, as before) and the rest, so that sorting changes no example's group.
    """
    n_batches = -(-len(encoded.input_ids) // batch_size)
    subset = approximated_batches(n_batches, exact)
    split = subset * batch_size
    order = by_length(encoded, 0, split) + by_length(encoded, split)
    return list(batches(encoded, batch_size, pad_token_id, order=order)), subset


def analyze(model, encoded: Encoded, *, batch_size: int = 8, pad_token_id: int, curves: tuple[str, ...] = CURVES,
            checkpoint: str | Path | None = None, progress: bool = True, meta: dict | None = None,
            exact: bool = False) -> dict:
    """Compute the curves over every encoded example. Returns the curves dict (see report/document.py for its shape).

    The truncation curve is always exact and over every example. Unless `exact`, the logit lens and the
    ablation run on the first batches only (APPROXIMATE_SHARE of them) and the log-softmax normaliser is
    computed in float32 (see target_log_probs); curves.json says so under each approximated curve.
    With `checkpoint`, the running sums are saved after every batch and a rerun continues from there,
    giving the same numbers as an uninterrupted run.
    """
    unknown = set(curves) - set(CURVES + OPTIONAL_CURVES)
    if unknown:
        raise LoraboundError(f"unknown curve {sorted(unknown)}; choose from {', '.join(CURVES + OPTIONAL_CURVES)}")
    model.eval()
    stack = find_layer_stack(model)
    lora_layers = adapter_layers(model)
    outside = parts_outside_layers(model)
    if "joint" in curves:
        check_joint_groups(model)
    boundaries = [-1] + lora_layers  # b between two LoRA layers equals the lower one: no need to run it
    sizes = {"truncation": len(boundaries), "layers_only": 1, "lens_base": stack.num_layers,
             "lens_full": stack.num_layers, "ablation": len(lora_layers), "ablation_full": 1,
             "joint": len(boundaries) ** 2}
    wanted = {"truncation": ["truncation"] + (["layers_only"] if outside else []),
              "logit_lens": ["lens_base", "lens_full"],
              "ablation": ["ablation"] + ([] if exact else ["ablation_full"]), "joint": ["joint"]}
    names = [n for c in curves for n in wanted[c]]
    all_batches, subset = analysis_batches(encoded, batch_size, pad_token_id, exact)
    check_reproduces_model(model, stack, all_batches, lora_layers)
    fingerprint = _fingerprint(encoded, batch_size, curves, lora_layers + outside, exact)

    state = _load_checkpoint(checkpoint, fingerprint)
    done = state["batches_done"] if state else 0
    scores = ({n: TokenScores.from_state(state["scores"][n], exact) for n in names} if state
              else {n: TokenScores(sizes[n], exact) for n in names})
    distributed.agree((fingerprint, done), "the inputs and the analysis checkpoint")

    def curves_for(index: int) -> tuple[str, ...]:
        return tuple(c for c in curves if c in ("truncation", "joint") or index < subset)

    # Under torchrun each round gives batch start + r to rank r; the round's sums are added up over the ranks
    # (float64) before the checkpoint, so a checkpoint holds whole batches and resumes under any world size.
    world = distributed.world_size()
    bar = tqdm(total=len(all_batches), initial=done, desc="analyze", unit="batch",
               disable=not progress or not distributed.is_main())
    for start in range(done, len(all_batches), world):
        if world == 1:
            score_batch(model, stack, all_batches[start], boundaries, lora_layers, curves_for(start), scores)
        else:
            mine = {n: TokenScores(sizes[n], exact) for n in names}
            index = start + distributed.rank()
            if index < len(all_batches):
                score_batch(model, stack, all_batches[index], boundaries, lora_layers, curves_for(index), mine)
            _add_over_ranks(scores, mine)
        finished = min(start + world, len(all_batches))
        if checkpoint is not None and distributed.is_main():
            write_json_atomic(checkpoint, {"fingerprint": fingerprint, "batches_done": finished,
                                           "scores": {n: s.state() for n, s in scores.items()}})
        bar.update(finished - start)
    bar.close()

    n_examples = len(encoded.input_ids)
    result = {"meta": {**(meta or {}), "num_layers": stack.num_layers, "adapter_layers": lora_layers,
                       "n_examples": n_examples, "n_target_tokens": next(iter(scores.values())).tokens,
                       "n_truncated": encoded.n_truncated, "n_skipped": encoded.n_skipped, "batch_size": batch_size,
                       "exact_curves": exact}}
    approximated = None
    if not exact:
        covered = min(n_examples, subset * batch_size)
        approximated = {"examples": covered, "of": n_examples,
                        "how": f"computed on the first {covered} of the {n_examples} validation examples, with the "
                               "log-softmax normaliser in float32; run with --exact-curves for all of them"}
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
                                "full_prob": full["mean_prob"], "base_nll": base["nll"], "full_nll": full["nll"],
                                **({"approximated": approximated} if approximated else {})}
    if "ablation" in scores:
        ablated = scores["ablation"].means()
        full_nll = scores["ablation_full"].means()["nll"][0] if "ablation_full" in scores else _full_nll(result, scores)
        result["ablation"] = {"layer": lora_layers, "nll": ablated["nll"], "full_nll": full_nll,
                              "delta_nll": [x - full_nll for x in ablated["nll"]] if full_nll is not None else None,
                              **({"approximated": approximated} if approximated else {})}
    if "joint" in scores:
        result["joint"] = joint_result(scores["joint"].means(), boundaries)
    return result


def check_joint_groups(model) -> None:
    """The joint curve needs LoRA in both the attention and the MLP modules of the layers."""
    have = {m.group for m in lora_modules(model)}
    missing = [g for g in JOINT_GROUPS if g not in have]
    if missing:
        raise LoraboundError(f"the adapter has no LoRA on {' or '.join(missing)} modules (it has "
                             f"{', '.join(sorted(have))}), so there is no per-module pair to search; use --criterion "
                             "auto (one boundary for all modules) or an adapter trained on attention and MLP modules")


def joint_result(means: dict[str, list[float]], boundaries: list[int]) -> dict:
    """curves.json's "joint": matrices indexed [i(Ba)][i(Bm)]."""
    n = len(boundaries)
    return {"attention_boundary": boundaries, "mlp_boundary": boundaries,
            "what": "mean ground-truth probability (nll, accuracy) with attention LoRA on layers <= Ba and MLP LoRA "
                    "on layers <= Bm, rows Ba, columns Bm; LoRA on other modules of the layers and outside them stays "
                    "on, so (-1, -1) is every layer's LoRA off; exact, every validation example",
            **{key: [values[i * n:(i + 1) * n] for i in range(n)] for key, values in means.items()}}


def _add_over_ranks(scores: dict[str, TokenScores], mine: dict[str, TokenScores]) -> None:
    """Add every rank's sums of this round (`mine`) into `scores`, in float64, the same on every rank."""
    keys = ("prob", "nll", "hits")
    flat = [x for n in scores for k in keys for x in getattr(mine[n], k)] + [mine[n].tokens for n in scores]
    total = iter(distributed.sum_floats(flat))
    for n, s in scores.items():
        for k in keys:
            setattr(s, k, [x + next(total) for x in getattr(s, k)])
    for s in scores.values():
        s.tokens += int(next(total))


def _full_nll(result: dict, scores: dict[str, TokenScores]) -> float | None:
    if "truncation" in result:
        return result["truncation"]["nll"][-1]
    if "lens_full" in scores:
        return scores["lens_full"].means()["nll"][-1]
    return None


def _fingerprint(encoded: Encoded, batch_size: int, curves, lora_layers, exact: bool) -> str:
    blob = json.dumps([encoded.input_ids, encoded.labels, batch_size, list(curves), lora_layers, exact, "by length"])
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
    scores = TokenScores(len(boundaries), float64=True)
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


@torch.inference_mode()
def joint_curve_plain(model, encoded: Encoded, *, batch_size: int, pad_token_id: int,
                      on_step: Callable[[], None] | None = None) -> dict:
    """The joint curve the obvious way: for every (Ba, Bm), keep_selection and run the whole model."""
    model.eval()
    check_joint_groups(model)
    boundaries = [-1] + adapter_layers(model)
    top = find_layer_stack(model).num_layers - 1
    scores = TokenScores(len(boundaries) ** 2, float64=True)
    device = next(model.parameters()).device
    for batch in batches(encoded, batch_size, pad_token_id):
        batch = batch.to(device)
        targets = Targets.from_labels(batch.labels)
        scores.tokens += targets.tokens.numel()
        for i, ba in enumerate(boundaries):
            for j, bm in enumerate(boundaries):
                with keep_selection(model, joint_selection(ba, bm, top)):
                    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                scores.add(i * len(boundaries) + j, logits[:, :-1][targets.rows, targets.positions].float(), targets)
                if on_step:
                    on_step()
    return joint_result(scores.means(), boundaries)
