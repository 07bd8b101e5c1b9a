"""The commands as Python functions (same names and defaults as the CLI), and the resumable `run`.

RUN_DIR layout:
  run.json                    what the run was asked (a rerun with other settings is refused)
  curves.json, *.png          analysis (analysis.partial.json while it is under way)
  search.json                 the chosen boundary (or selection: per-module, greedy-drop) and the candidates' scores
  generations/*.jsonl         every hypothesis, per split and variant (cached: a rerun skips finished ones)
  adapter-pruned/, prune.json the exported PEFT adapter with LoRA on layers 0..b, and its summary
  report.json / .md / .html   the report
  speed.json, speed.md        inference speed, when `lorabound speed --run` (or `run --speed`) measured it
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .analysis.curves import check_joint_groups
from .analysis.curves import analyze as analyze_curves
from .analysis.greedy import greedy_path, params_budget
from .data import Splits, encode_pairs, first_reference_pairs, input_fingerprints, require_nonempty
from .errors import LoraboundError
from .evaluation import evaluate_variants, file_size, run_origins, selection_on_test
from .generation.cache import (SelectionGenerator, boundary_variant, check_engine_options, generate_cached, make_engine,
                               model_identity)
from .lora.selection import GROUPS, Selection, check_boundary, parse_layers, per_group_over
from .lora.masking import adapter_layers, adapter_pairs, lora_params_per_layer
from .lora.export import ADAPTER_WEIGHTS, PruneResult, adapter_file_pairs, check_selection, prune_adapter
from .lora.variants import Variant
from .metrics.scores import MetricOptions
from .model import (DEFAULT_MODEL, adapter_weights_file, check_lora_config, check_sequence_room, find_layer_stack,
                    model_num_layers, model_paths, read_adapter_config)
from .options import DataOptions, GenerationOptions, ModelOptions, TrainSettings, VLLMOptions
from .report.document import format_table, plot_curves, write_report
from .report.verdict import report_notes, verdict
from .rules import CURVES, check_arguments
from .runtime import distributed
from .runtime.files import (check_not_input, check_output_dir, existing_path, holds_folder_locks, input_identity,
                            lock_folder, output_folder, read_json, write_json_atomic)
from .runtime.folders import claim_folder, claim_output, rank0_output_folder
from .runtime.threads import torch_threads
from .decision.boundary import (SELECTION_CRITERIA, SearchResult, SearchSettings, Validation, knee,
                              raises_probability)
from .decision.boundary import search as search_boundary
from .decision.modules import pair_params, search_greedy, search_per_module
from .training import TrainResult
from .results import Evaluation, Report
from .training import train as train_adapter


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------

def _check_adapters(*folders, allow_pickle: bool = False) -> None:
    """Each adapter folder has a readable config and weights: refused before any model is loaded."""
    for folder in folders:
        read_adapter_config(folder)
        adapter_weights_file(folder, allow_pickle=allow_pickle)


def _load(model: str, adapter, data: str, data_options: DataOptions | None, model_options: ModelOptions | None,
          needs: tuple[str, ...] = ("validation",), teacher_forced: bool = True, max_new_tokens: int | None = None):
    """Options (the given ones, or defaults for `model` and `data`), the task and its splits, and the adapted model.

    The splits named in `needs` must be non-empty; that is checked before the model is loaded. Once it is loaded,
    the sequences the command will run must fit its position table: up to --max-length tokens when
    `teacher_forced`, and each needed split's prompts plus `max_new_tokens` when it generates.
    """
    data_options = data_options or DataOptions(data=data)
    model_options = model_options or ModelOptions(model=model)
    check_lora_config(read_adapter_config(adapter), adapter)  # a missing folder is named before any work
    task, splits = data_options.load()
    for name in needs:
        require_nonempty(getattr(splits, name), name)
    check_held_out(adapter, splits)
    distributed.start(model_options.device)
    peft_model, tokenizer = model_options.load(adapter)
    check_sequence_room(peft_model, model_options.model, tokenizer,
                        max_length=data_options.max_length if teacher_forced else None, max_new_tokens=max_new_tokens,
                        prompts={name: [task.prompt(e) for e in getattr(splits, name)] for name in needs}
                        if max_new_tokens is not None else None)
    return data_options, model_options, task, splits, peft_model, tokenizer


def _inputs(adapter, data_options: DataOptions, model_options: ModelOptions, *others) -> list:
    """Every path a command reads (those that exist): an output folder must not touch any of them."""
    return [adapter, data_options.data, data_options.template, model_options.model,
            *model_paths(model_options.model), *others]


class StageTimes:
    """Wall seconds of each stage in this invocation (a stage resumed from its files takes about 0 s)."""

    def __init__(self, progress: bool, earlier: dict[str, float] | None = None):
        self.seconds = dict(earlier or {})
        self.progress = progress
        self.current: tuple[str, float] | None = None

    def next(self, stage: str | None) -> None:
        """End the running stage (printing its time) and start `stage` (None: just end)."""
        now = time.perf_counter()
        if self.current is not None:
            name, started = self.current
            self.seconds[name] = round(now - started, 1)
            distributed.print_progress(self.progress, f"      {name}: {self.seconds[name]:.1f} s")
        self.current = (stage, now) if stage else None

    def summary(self) -> str:
        return "stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()) + \
            f" ({sum(self.seconds.values()):.0f} s)"


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------

@holds_folder_locks  # --out's lock, taken in claim_output
def train(model: str = DEFAULT_MODEL, data: str = "e2e", out: str | Path = "adapter", *,
          settings: TrainSettings | None = None, data_options: DataOptions | None = None,
          model_options: ModelOptions | None = None, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Fine-tune LoRA on all layers of `model` on the training split of `data`; save a PEFT adapter to `out`."""
    if distributed.world_size() > 1:
        raise LoraboundError("train runs in one process; launch it without torchrun (torchrun serves analyze, "
                             "search, evaluate and run)")
    check_arguments(out=out)
    data_options = data_options or DataOptions(data=data)
    model_options = model_options or ModelOptions(model=model)
    check_not_input(out, _inputs(None, data_options, model_options))
    check_output_dir(out, overwrite, "--out")
    claim_output(out)
    task, splits = data_options.load()
    base, tokenizer = model_options.load()
    settings = settings or TrainSettings(max_length=data_options.max_length, seed=data_options.seed)
    check_sequence_room(base, model_options.model, tokenizer, max_length=settings.max_length)
    _check_target_modules(base, settings.target_modules)
    return train_adapter(base, tokenizer, task, splits, out, settings, model_spec=model_options.model,
                         overwrite=overwrite, progress=progress)


def _check_target_modules(model, target_modules) -> None:
    """Each named target module exists in the model (PEFT would fail with a traceback)."""
    if isinstance(target_modules, str):
        return  # all-linear, or a regex PEFT matches itself
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} | {n for n, _ in model.named_modules()}
    missing = [m for m in target_modules if m not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise LoraboundError(f"--target-modules {' '.join(missing)}: no such module in the model; "
                             f"pick from {' '.join(linear)}, or pass all-linear")


def check_held_out(adapter_dir: str | Path, splits: Splits) -> None:
    """Refuse validation or test examples the adapter was trained on (when lorabound trained it)."""
    read_adapter_config(adapter_dir)  # says so if the folder does not exist, rather than finding no info file
    info_file = Path(adapter_dir) / "lorabound_train.json"
    if not info_file.is_file():
        return
    try:
        trained = set(json.loads(info_file.read_text()).get("train_input_hashes", []))
    except (ValueError, AttributeError):
        raise LoraboundError(f"cannot parse {info_file}; restore it, or delete it to skip the held-out check") from None
    for name, examples in (("validation", splits.validation), ("test", splits.test)):
        seen = len(trained & set(input_fingerprints(examples)))
        if seen:
            raise LoraboundError(
                f"{seen} {name} examples were in the adapter's training data; use the same --seed and "
                f"--validation-size / --test-size as when training, so the held-out splits stay held out")


# ---------------------------------------------------------------------------
# analyze
# ---------------------------------------------------------------------------

@holds_folder_locks  # --out's lock, taken in claim_output
def analyze(model: str = DEFAULT_MODEL, adapter: str | Path = "adapter", data: str = "e2e", out: str | Path = "run", *,
            curves: tuple[str, ...] = CURVES, batch_size: int = 8, data_options: DataOptions | None = None,
            model_options: ModelOptions | None = None, overwrite: bool = False, progress: bool = True,
            exact_curves: bool = False) -> dict:
    """Teacher-forced curves on the validation split into OUT/curves.json and PNG plots.

    Without `exact_curves` the logit lens and the ablation are approximated (see analysis.analyze)."""
    check_arguments(out=out, adapter=adapter, curves=list(curves), batch_size=batch_size)
    data_options = data_options or DataOptions(data=data)
    model_options = model_options or ModelOptions(model=model)
    check_not_input(out, _inputs(adapter, data_options, model_options))
    check_output_dir(out, overwrite, "--out")
    _check_adapters(adapter, allow_pickle=model_options.allow_pickle)
    claim_output(out)
    data_options, model_options, task, splits, peft_model, tokenizer = _load(model, adapter, data, data_options,
                                                                              model_options)
    with rank0_output_folder(out, overwrite) as out:
        result = _analyze(peft_model, tokenizer, task, splits, out, curves, batch_size, data_options,
                          model_options, adapter, progress, exact_curves)
        # Mark the knee (90% of the full adapter's probability gain): the curve's own reading of b.
        if distributed.is_main():
            has_knee = "truncation" in result and raises_probability(result["truncation"])
            plot_curves(result, knee(result["truncation"]) if has_knee else None, out)
    return result


def _analyze(peft_model, tokenizer, task, splits, out: Path, curves, batch_size, data_options, model_options,
             adapter, progress, exact: bool = False) -> dict:
    require_nonempty(splits.validation, "validation")
    encoded = encode_pairs(tokenizer, task, first_reference_pairs(splits.validation), data_options.max_length)
    meta = {"model": model_options.model, "adapter": str(adapter), "task": task.name, "task_source": task.source,
            "split": "validation", "sizes": _sizes(splits), "seed": data_options.seed,
            "max_length": data_options.max_length}
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
    partial = out / "analysis.partial.json"
    result = analyze_curves(peft_model, encoded, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id,
                            curves=tuple(curves), checkpoint=partial, progress=progress, meta=meta, exact=exact)
    if distributed.is_main():
        write_json_atomic(out / "curves.json", result)
        partial.unlink(missing_ok=True)
        _warn_cut(result["meta"], data_options.max_length)
    distributed.barrier()  # no rank looks for curves.json before rank 0 has written it
    return result


def _warn_cut(meta: dict, max_length: int) -> None:
    """One stderr line when the curves left examples out or cut targets (also noted in curves.json / the report)."""
    skipped, cut = meta.get("n_skipped", 0), meta.get("n_truncated", 0)
    if not skipped and not cut:
        return
    total = meta.get("n_examples", 0) + skipped
    parts = ([f"{skipped} of {total} {meta.get('split', 'validation')} examples were skipped (prompt alone longer "
              f"than --max-length {max_length})"] if skipped else []) \
        + ([f"{cut} targets were cut to --max-length {max_length}"] if cut else [])
    _warn(" and ".join(parts) + "; the curves use the rest: raise --max-length to use them whole")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _sizes(splits: Splits) -> dict:
    return {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)}


# ---------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------

@holds_folder_locks  # --out's lock, taken in claim_output
def search(model: str = DEFAULT_MODEL, adapter: str | Path = "adapter", data: str = "e2e", *,
           criterion: str = "auto", boundary: int | None = None, tolerance: float | None = None, knee_fraction: float = 0.9,
           candidates: list[int] | None = None, out: str | Path | None = None, batch_size: int = 8,
           data_options: DataOptions | None = None, model_options: ModelOptions | None = None,
           generation: GenerationOptions | None = None, vllm: VLLMOptions | None = None, overwrite: bool = False,
           progress: bool = True, goal: str | None = None, bootstrap: int = 1000,
           metric_options: MetricOptions | None = None, keep_fraction: float | None = None) -> SearchResult:
    """Pick the boundary b on the validation split (see search/boundary.py for the criteria; per-module and greedy-drop
    pick a Selection, see search/modules.py)."""
    check_arguments(adapter=adapter, boundary=boundary, tolerance=tolerance, knee_fraction=knee_fraction,
                    candidates=candidates, batch_size=batch_size, bootstrap=bootstrap, keep_fraction=keep_fraction,
                    **({} if out is None else {"out": out}))
    settings = SearchSettings(criterion=criterion, boundary=boundary, tolerance=tolerance, goal=goal,
                              knee_fraction=knee_fraction, candidates=candidates, bootstrap=bootstrap,
                              keep_fraction=keep_fraction)
    data_options = data_options or DataOptions(data=data)
    model_options = model_options or ModelOptions(model=model)
    if out is not None:
        check_not_input(out, _inputs(adapter, data_options, model_options))
        check_output_dir(out, overwrite, "--out")
    generation = generation or GenerationOptions()
    check_engine_options(generation, model_options, [adapter], vllm)
    _check_adapters(adapter, allow_pickle=model_options.allow_pickle)
    if out is not None:
        claim_output(out)
    data_options, model_options, task, splits, peft_model, tokenizer = _load(
        model, adapter, data, data_options, model_options, max_new_tokens=generation.max_new_tokens)
    _check_selection_search(settings, peft_model)
    with rank0_output_folder(out, overwrite) if out is not None else contextlib.nullcontext() as folder:
        engine = make_engine(generation, vllm, peft_model, tokenizer, model_options, adapter, folder)
        try:
            return _search(peft_model, tokenizer, task, splits, settings, generation, folder, batch_size,
                           data_options, model_options, adapter, progress, metric_options, engine=engine)
        finally:
            engine.close()


def _search(peft_model, tokenizer, task, splits, settings: SearchSettings, generation: GenerationOptions,
            out: Path | None, batch_size, data_options, model_options, adapter, progress,
            metric_options: MetricOptions | None = None, engine=None) -> SearchResult:
    num_layers = find_layer_stack(peft_model).num_layers
    engine = engine or make_engine(generation, None, peft_model, tokenizer, model_options, adapter, out)
    top = max(adapter_layers(peft_model))
    selection_search = settings.criterion in SELECTION_CRITERIA and settings.boundary is None
    if (cached := _cached_json(out, "curves.json")) is not None:
        truncation = cached["truncation"]
    elif settings.boundary is not None or selection_search:  # these need no truncation curve
        truncation = {"boundary": [settings.boundary], "mean_prob": [None]}  # the user's b needs no curve
    else:
        with tempfile.TemporaryDirectory(prefix="lorabound-") as scratch:
            truncation = _analyze(peft_model, tokenizer, task, splits, out or Path(scratch), ("truncation",),
                                  batch_size, data_options, model_options, adapter, progress)["truncation"]

    model_id, pairs = model_identity(model_options), adapter_pairs(peft_model)

    def generate_many(boundaries: list[int]) -> dict[int, list[str]]:  # the candidates in one engine call
        requests = {b: boundary_variant(b, top) for b in boundaries}
        generated = generate_cached(engine, task, splits.validation, list(requests.values()), "validation", out,
                                     generation, model_id, adapter, pairs, progress)
        return {b: generated[request.name].texts for b, request in requests.items()}

    def generate_for(b: int) -> list[str]:
        return generate_many([b])[b]

    validation = Validation(generate_for, [list(e.references) for e in splits.validation],
                            metric_options or MetricOptions(), data_options.seed, generate_many)
    if selection_search:
        selections = SelectionGenerator(engine, peft_model, task, splits.validation, out, generation, model_id,
                                         adapter, pairs, progress)
        validation = Validation(lambda s: selections.texts([s])[s], validation.references, validation.metrics,
                                validation.seed, selections.texts)
        result = _search_selection(peft_model, tokenizer, task, splits, settings, num_layers, out, batch_size,
                                   data_options, model_options, adapter, progress, validation)
    else:
        result = search_boundary(truncation, settings, num_layers, lora_params_per_layer(peft_model), validation)
    if out is not None and distributed.is_main():
        write_json_atomic(out / "search.json", result.to_dict())
    distributed.barrier()
    return result


def _check_selection_search(settings: SearchSettings, peft_model) -> None:
    """What the per-module and greedy-drop searches refuse, once the model is loaded and before any curve."""
    if settings.boundary is not None:
        return
    if settings.criterion == "per-module":
        check_joint_groups(peft_model)
    if settings.criterion == "greedy-drop" and settings.keep_fraction is not None:
        params_budget(lora_params_per_layer(peft_model), settings.keep_fraction)


def _search_selection(peft_model, tokenizer, task, splits, settings: SearchSettings, num_layers: int, out, batch_size,
                      data_options, model_options, adapter, progress, validation: Validation) -> SearchResult:
    """per-module: the joint curve (curves.json, computed unless there), then the search; greedy-drop: the path."""
    params = pair_params(peft_model)
    if settings.criterion == "per-module":
        curves = _cached_json(out, "curves.json")
        if curves is None or "joint" not in curves:
            with tempfile.TemporaryDirectory(prefix="lorabound-") as scratch:
                # Into OUT with the truncation curve when it has no curves yet; else added to its curves.json.
                joint = _analyze(peft_model, tokenizer, task, splits, out if curves is None and out else Path(scratch),
                                 ("truncation", "joint") if curves is None else ("joint",), batch_size, data_options,
                                 model_options, adapter, progress)
            if curves is not None and out is not None and distributed.is_main():
                write_json_atomic(out / "curves.json", {**curves, "joint": joint["joint"]})
            curves = {**(curves or {}), "joint": joint["joint"]}
        return search_per_module(curves["joint"], settings, num_layers, params, validation)
    per_layer = lora_params_per_layer(peft_model)
    stop = params_budget(per_layer, settings.keep_fraction) if settings.keep_fraction is not None else None
    encoded = encode_pairs(tokenizer, task, first_reference_pairs(splits.validation), data_options.max_length)
    path = greedy_path(peft_model, encoded, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id,
                       params_per_layer=per_layer, stop_at_params=stop, progress=progress and distributed.is_main())
    return search_greedy(path, settings, num_layers, params, validation)


def _cached_json(folder: Path | None, name: str) -> dict | None:
    if folder is not None and (folder / name).is_file():
        return read_json(folder / name, "delete it and rerun the same command to compute that stage again")
    return None


# ---------------------------------------------------------------------------
# prune
# ---------------------------------------------------------------------------

@holds_folder_locks  # --out's lock, taken in claim_output
def prune(adapter: str | Path, boundary: int | Selection | None, out: str | Path, *, format: str = "peft",
          model: str | None = None, overwrite: bool = False, dtype: str = "float32", trust_remote_code: bool = False,
          layers: str | None = None, group_boundaries: dict[str, int] | None = None) -> PruneResult:
    """Export a new adapter with only some of its LoRA (the input folder is never written to).

    What is kept: `boundary` (layers 0..b, or any Selection), or `layers` (a layer set such as "0-9,12,15"), or
    `group_boundaries` ({"attention": Ba, "mlp": Bm}; groups not named keep all their LoRA): exactly one of them.
    """
    group_boundaries = {g: b for g, b in (group_boundaries or {}).items() if b is not None}
    check_arguments(adapter=adapter, boundary=None if isinstance(boundary, Selection) else boundary, out=out,
                    format=format, layers=layers, **_group_flags(group_boundaries),
                    **({} if model is None else {"model": model}))
    if layers is not None:
        parse_layers(layers)  # a value that is no layer set is named before the flags' combination
    given = [flag for flag, value in (("--boundary", boundary), ("--layers", layers),
                                      ("--boundary-GROUP", group_boundaries or None)) if value is not None]
    if len(given) != 1:
        raise LoraboundError(f"{' and '.join(given)} each say what to keep; pass only one of them" if given else
                             "prune needs what to keep; pass --boundary B, --layers 0-9,12 or --boundary-attention "
                             "/ --boundary-mlp")
    read_adapter_config(adapter)  # a missing or broken folder is named first; export then needs safetensors
    if layers is not None or group_boundaries:
        num_layers = model_num_layers(model, trust_remote_code=trust_remote_code) if model is not None else None
        [(boundary, _)] = _asked_selections(adapter, model, [layers] if layers is not None else [], group_boundaries,
                                            num_layers, trust_remote_code=trust_remote_code)
    check_not_input(out, [adapter, model, *model_paths(model)])  # before the lock file goes into --out
    check_output_dir(out, overwrite, "--out")
    claim_output(out)
    return prune_adapter(adapter, boundary, out, format=format, model_spec=model, overwrite=overwrite,
                         dtype=dtype, trust_remote_code=trust_remote_code)


def _group_flags(group_boundaries: dict[str, int] | None) -> dict[str, int]:
    """{"mlp": 9} -> {"boundary_mlp": 9}: the names rules.py's rules use. An unknown group is refused."""
    unknown = sorted(set(group_boundaries or {}) - set(GROUPS))
    if unknown:
        raise LoraboundError(f"unknown module group {unknown[0]}; the groups are {', '.join(GROUPS)}")
    return {f"boundary_{group}": b for group, b in (group_boundaries or {}).items()}


def _asked_selections(adapter, model: str | None, layer_sets: list[str], group_boundaries: dict[str, int] | None,
                      num_layers: int | None, *, given: list[Selection] = (), allow_pickle: bool = False,
                      trust_remote_code: bool = False) -> list[tuple[Selection, str]]:
    """The selections asked for (`given` ones from Python, then the command line's), each with where it comes
    from, checked against the adapter's module groups and the model's layers before any work (from tensor names
    and config files only)."""
    asked = [(selection, "given (Python API)") for selection in given]
    asked += [(Selection.layers(parse_layers(text)), "given with --layers") for text in layer_sets]
    pairs = adapter_file_pairs(adapter, model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if group_boundaries:
        for group, b in group_boundaries.items():
            if num_layers is not None and b > num_layers - 1:
                raise LoraboundError(f"--boundary-{group} {b} is outside -1..{num_layers - 1} for this "
                                     f"{num_layers}-layer model; pass a b from -1 (none) to {num_layers - 1} (all)")
        flags = " ".join(f"--boundary-{g} {b}" for g, b in sorted(group_boundaries.items()))
        # Without the model, a b above the adapter's top layer keeps all of that group's LoRA.
        top = max((layer for layer, _ in pairs), default=-1)
        group_boundaries = {g: min(b, top) for g, b in group_boundaries.items()}
        check_selection(Selection.per_group(group_boundaries), pairs, None)  # a group the adapter lacks
        asked.append((per_group_over(group_boundaries, pairs), f"given with {flags}"))
    for selection, _ in asked:
        check_selection(selection, pairs, num_layers)
    return asked


# ---------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------

@holds_folder_locks  # --out's lock, taken in claim_output
def evaluate(model: str = DEFAULT_MODEL, adapter: str | Path = "adapter", data: str = "e2e", *,
             boundaries: list[int] | None = None, adapters: list[str | Path] | None = None,
             out: str | Path = "run", data_options: DataOptions | None = None,
             model_options: ModelOptions | None = None, generation: GenerationOptions | None = None,
             vllm: VLLMOptions | None = None, bootstrap: int = 1000, overwrite: bool = False,
             progress: bool = True, metric_options: MetricOptions | None = None, layers: list[str] | None = None,
             group_boundaries: dict[str, int] | None = None, selections: list[Selection] | None = None) -> Evaluation:
    """Generate on the test split for base, full adapter, LoRA up to each b, and exported adapters; score them.

    Also a row for each layer set in `layers` ("0-9,12,15"), for `group_boundaries` ({"attention": Ba, "mlp": Bm};
    groups not named keep all their LoRA) and for each Selection in `selections`.
    """
    group_boundaries = {g: b for g, b in (group_boundaries or {}).items() if b is not None}
    check_arguments(adapter=adapter, boundaries=boundaries or [], adapters=adapters or [], out=out,
                    bootstrap=bootstrap, layers=layers or [], **_group_flags(group_boundaries))
    data_options = data_options or DataOptions(data=data)
    model_options = model_options or ModelOptions(model=model)
    check_not_input(out, _inputs(adapter, data_options, model_options, *(adapters or [])))
    check_output_dir(out, overwrite, "--out")
    _check_adapters(adapter, *(adapters or []), allow_pickle=model_options.allow_pickle)
    generation = generation or GenerationOptions()
    check_engine_options(generation, model_options, [adapter, *(adapters or [])], vllm)
    asked = []
    if layers or group_boundaries or selections:
        num_layers = model_num_layers(model_options.model, trust_remote_code=model_options.trust_remote_code)
        asked = _asked_selections(adapter, model_options.model, list(layers or []), group_boundaries, num_layers,
                                  given=list(selections or []), allow_pickle=model_options.allow_pickle,
                                  trust_remote_code=model_options.trust_remote_code)
    claim_output(out)
    data_options, model_options, task, splits, peft_model, tokenizer = _load(
        model, adapter, data, data_options, model_options, needs=("test",), teacher_forced=False,
        max_new_tokens=generation.max_new_tokens)
    extras = [Variant(name=str(extra), adapter=Path(extra)) for extra in adapters or []]
    origins = {b: ["asked with --boundaries"] for b in boundaries or []}
    with rank0_output_folder(out, overwrite) as out:
        engine = make_engine(generation, vllm, peft_model, tokenizer, model_options, adapter, out)
        try:
            result = evaluate_variants(peft_model, tokenizer, task, splits, boundaries or [], out, generation,
                                       bootstrap, data_options.seed, progress, metric_options, adapter=adapter,
                                       model_id=model_identity(model_options), origins=origins, engine=engine,
                                       extras=extras, selections=asked)
        finally:
            engine.close()
        if distributed.is_main():
            write_json_atomic(out / "evaluation.json", result)
    return result


# ---------------------------------------------------------------------------
# speed: what dropping LoRA buys at inference (speed.py)
# ---------------------------------------------------------------------------

@holds_folder_locks  # a run folder's lock, when speed.json is written into it; else --out's
def speed(model: str | None = None, adapter: str | Path | None = None, *, boundary: int | None = None,
          run: str | Path | None = None, out: str | Path | None = None, settings=None,
          data_options: DataOptions | None = None, model_options: ModelOptions | None = None,
          overwrite: bool = False, progress: bool = True) -> dict:
    """Latency, throughput and peak memory of the base model, the full and the pruned adapter (LoRA on layers
    0..boundary), unmerged and merged. `run`: take model, adapter, data and boundary from a run folder (a
    `boundary` given too overrides its b) and, without `out`, write speed.json there and add it to its report."""
    from . import timing as measuring

    settings = settings or measuring.SpeedSettings()
    check_arguments(boundary=boundary, **{k: v for k, v in (("adapter", adapter), ("out", out), ("model", model),
                                                            ("run", run)) if v is not None})
    origin = "asked with --boundary"
    if run is not None:
        source = measuring.run_folder_source(run)
        if model is not None or adapter is not None:
            raise LoraboundError("--run reads the model and the adapter from the run folder; drop --model and "
                                 "--adapter, or drop --run")
        if data_options is not None and data_options != DataOptions():
            raise LoraboundError("--run reads the data options from the run folder; drop the data flags, or "
                                 "drop --run")
        model, adapter, data_options = source["model"], source["adapter"], DataOptions(**source["data"])
        if boundary is None:
            boundary, origin = source["boundary"], source["origin"]
        model_options = ModelOptions(**{**asdict(model_options or ModelOptions()), "dtype": source["dtype"]
                                        or "float32"})
    if adapter is None:
        raise LoraboundError("no adapter to measure: --adapter is required without --run; pass --adapter "
                             "(and --boundary), or --run RUN_DIR")
    if boundary is None:
        raise LoraboundError("no boundary to measure: --boundary is required without --run; pass --boundary B "
                             "(LoRA kept on layers 0..B), or --run RUN_DIR")
    if out is None and run is None:
        raise LoraboundError("no output folder: --out is required without --run; pass --out (or --run RUN_DIR to "
                             "write into the run folder)")
    model_options = ModelOptions(**{**asdict(model_options or ModelOptions()), **({"model": model} if model else {}),
                                    "device": measuring.resolve_device(settings.device)})
    data_options = data_options or DataOptions()
    folder = Path(out) if out is not None else Path(run)
    check_not_input(folder, _inputs(adapter, data_options, model_options))
    if out is not None:
        check_output_dir(out, overwrite, "--out")
    request = measuring.check_request(model_options, data_options, adapter, boundary, origin, settings)
    if out is None:  # into the run folder: speed.json, speed.md, and the report re-rendered with them
        lock_folder(folder, "--run")
        result = measuring.measure_request(request, settings, folder, progress)
        measuring.write_results(folder, result)
        write_report(folder, read_json(folder / "report.json", "rerun that run to rewrite it"))
        return result
    claim_output(out)
    with output_folder(out, overwrite) as folder:
        result = measuring.measure_request(request, settings, folder, progress)
        measuring.write_results(folder, result)
    return result


# ---------------------------------------------------------------------------
# run: every stage into one folder, resumable
# ---------------------------------------------------------------------------

@holds_folder_locks  # the run folder's lock, taken in claim_folder
def run(model: str = DEFAULT_MODEL, adapter: str | Path = "adapter", data: str = "e2e", out: str | Path = "run", *,
        criterion: str = "auto", boundary: int | None = None, tolerance: float | None = None, knee_fraction: float = 0.9,
        boundaries: list[int] | None = None, batch_size: int = 8, bootstrap: int = 1000,
        data_options: DataOptions | None = None, model_options: ModelOptions | None = None,
        generation: GenerationOptions | None = None, vllm: VLLMOptions | None = None, overwrite: bool = False,
        progress: bool = True, goal: str | None = None, metric_options: MetricOptions | None = None,
        exact_curves: bool = False, earlier_stages: dict[str, float] | None = None,
        keep_fraction: float | None = None) -> Report:
    """analyze → search → prune → evaluate → report, into OUT. A rerun continues where it stopped.

    report.json records each stage's wall time in this invocation (and `earlier_stages`, e.g. the demo's training).
    """
    check_arguments(adapter=adapter, out=out, boundary=boundary, tolerance=tolerance, knee_fraction=knee_fraction,
                    boundaries=boundaries or [], batch_size=batch_size, bootstrap=bootstrap,
                    keep_fraction=keep_fraction)
    data_options = data_options or DataOptions(data=data)
    model_options = model_options or ModelOptions(model=model)
    generation = generation or GenerationOptions()
    metric_options = metric_options or MetricOptions()
    settings = SearchSettings(criterion=criterion, boundary=boundary, tolerance=tolerance, knee_fraction=knee_fraction,
                              goal=goal, bootstrap=bootstrap, keep_fraction=keep_fraction)
    out = Path(out)
    inputs = _inputs(adapter, data_options, model_options)
    # The run resumes only if all of this is unchanged, the contents of its input files included.
    asked = {"model": model_options.model, "adapter": str(Path(adapter).resolve()),
             "data": asdict(data_options), "search": asdict(settings), "generation": asdict(generation),
             "metrics": asdict(metric_options),
             "extra_boundaries": boundaries or [], "batch_size": batch_size, "bootstrap": bootstrap,
             "dtype": model_options.dtype, "inputs": {str(p): input_identity(p) for p in inputs if existing_path(p)},
             "exact_curves": exact_curves}
    check_not_input(out, inputs)
    check_engine_options(generation, model_options, [adapter], vllm)
    _check_adapters(adapter, allow_pickle=model_options.allow_pickle)
    claim_folder(out, "run.json", asked, overwrite)

    _, _, task, splits, peft_model, tokenizer = _load(model, adapter, data, data_options, model_options,
                                                      needs=("validation", "test"),
                                                      max_new_tokens=generation.max_new_tokens)
    _check_selection_search(settings, peft_model)
    num_layers = find_layer_stack(peft_model).num_layers
    for given in ([boundary] if boundary is not None else []) + list(boundaries or []):
        check_boundary(given, num_layers)  # before the analysis, not after it
    engine = make_engine(generation, vllm, peft_model, tokenizer, model_options, adapter, out)
    try:
        return _run_stages(out, adapter, task, splits, peft_model, tokenizer, num_layers, settings, generation,
                           boundaries, batch_size, bootstrap, data_options, model_options, engine, progress,
                           metric_options, exact_curves, earlier_stages)
    finally:
        engine.close()


def _run_stages(out: Path, adapter, task, splits, peft_model, tokenizer, num_layers, settings: SearchSettings,
                generation, boundaries, batch_size, bootstrap, data_options, model_options, engine, progress,
                metric_options: MetricOptions | None = None, exact_curves: bool = False,
                earlier_stages: dict[str, float] | None = None) -> Report:
    """The five stages of `run`, each skipped when its result is already in OUT."""

    times = StageTimes(progress, earlier_stages)
    distributed.print_progress(progress, "[1/5] analysis: per-layer curves on validation")
    times.next("analysis")
    joint = ("joint",) if settings.criterion == "per-module" and settings.boundary is None else ()
    curves = _cached_json(out, "curves.json") or _analyze(
        peft_model, tokenizer, task, splits, out, CURVES + joint, batch_size, data_options, model_options, adapter,
        progress, exact_curves)

    times.next(None)
    distributed.print_progress(progress, "[2/5] search: choosing the boundary")
    times.next("search")
    found = _cached_json(out, "search.json")
    if found is None:
        found = _search(peft_model, tokenizer, task, splits, settings, generation, out, batch_size, data_options,
                        model_options, adapter, progress, metric_options, engine=engine).to_dict()
    b = found["boundary"]

    times.next("prune")
    pruned_dir = out / "adapter-pruned"
    layers = curves["meta"]["adapter_layers"]
    top = max(layers)
    selection = Selection.from_json(found["selection"]) if b is None else Selection.prefix(b)
    if b is not None and b >= top:
        distributed.print_progress(progress, f"[3/5] prune: b = {b} keeps every LoRA layer, nothing to export")
    elif b is not None and not any(layer <= b for layer in layers):
        distributed.print_progress(progress, f"[3/5] prune: b = {b} drops every LoRA layer (the base model), nothing to export")
    elif not Path(adapter, ADAPTER_WEIGHTS).is_file():
        distributed.print_progress(progress, "[3/5] prune: skipped, the adapter is a pickled adapter_model.bin "
                                  "(convert it to safetensors to export)")
    else:
        distributed.print_progress(progress, f"[3/5] prune: exporting {selection.describe()} to {pruned_dir}")
        if _cached_json(out, "prune.json") is None and distributed.is_main():
            export = prune_adapter(adapter, selection, pruned_dir, num_layers=num_layers, overwrite=True,
                                   layers_path=find_layer_stack(peft_model).layers_path)
            write_json_atomic(out / "prune.json", {"summary": export.summary().splitlines()})
        distributed.barrier()

    times.next(None)
    distributed.print_progress(progress, "[4/5] evaluate: generation on test")
    times.next("evaluate")
    origins = run_origins(found, curves, settings.knee_fraction, boundaries or [], top)
    evaluation = evaluate_variants(peft_model, tokenizer, task, splits, sorted(origins), out, generation,
                                   bootstrap, data_options.seed, progress, metric_options, adapter=adapter,
                                   model_id=model_identity(model_options), origins=origins, engine=engine)
    if b is None:  # a selection that is no prefix: not a row of the evaluation table
        evaluation["selection_test"] = selection_on_test(found, engine, peft_model, task, splits, out, generation,
                                                         model_options, adapter, progress, bootstrap,
                                                         data_options.seed, metric_options)
    if (pruned_dir / ADAPTER_WEIGHTS).is_file() and b is None and evaluation.get("selection_test"):
        evaluation["selection_test"]["exported_to"] = str(pruned_dir)
    elif (pruned_dir / ADAPTER_WEIGHTS).is_file():
        for row in evaluation["variants"]:
            if row["boundary"] == b:
                (row["adapter_mb"], row["adapter_mb_source"]), row["exported_to"] = file_size(pruned_dir), \
                    str(pruned_dir)

    times.next(None)
    distributed.print_progress(progress, "[5/5] report")
    times.next("report")
    report = {
        "meta": {"model": model_options.model, "adapter": str(adapter), "task": task.name, "sizes": _sizes(splits),
                 "seed": data_options.seed, "lorabound_version": __version__,
                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "max_new_tokens": generation.max_new_tokens, "num_layers": num_layers,
                 "torch_threads": torch_threads()},
        "curves": curves, "search": found, **evaluation,
        "verdict": verdict(found, evaluation, top),
        "notes": report_notes(curves, _cached_json(out, "prune.json")),
    }
    if distributed.is_main():
        write_report(out, report)
    times.next(None)
    # The report stage's own time is known only once its files are written: report.json gets it after.
    report["stage_seconds"] = times.seconds
    if distributed.is_main():
        write_json_atomic(out / "report.json", report)
    distributed.print_progress(progress, times.summary())
    return report


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------

@holds_folder_locks  # the demo folder's lock, taken in claim_folder
def demo(out: str | Path = "lorabound-demo", *, train_size: int = 64, validation_size: int = 40,
         test_size: int = 100, epochs: float = 1.0, max_new_tokens: int = 48, seed: int = 0,
         overwrite: bool = False, progress: bool = True, exact_curves: bool = False) -> Report:
    """Fine-tune SmolLM2-135M with LoRA on E2E, then the whole `run`, into OUT (resumable)."""
    check_arguments(out=out)
    data_options = DataOptions(data="e2e", train_size=train_size, validation_size=validation_size,
                               test_size=test_size, seed=seed)
    generation = GenerationOptions(max_new_tokens=max_new_tokens)
    settings = TrainSettings(epochs=epochs, seed=seed)  # every argument checked before the training
    out = Path(out)
    adapter = out / "adapter"
    claim_folder(out, "demo.json", {"train_size": train_size, "validation_size": validation_size,
                                     "test_size": test_size, "epochs": epochs, "seed": seed,
                                     "max_new_tokens": max_new_tokens, "exact_curves": exact_curves}, overwrite)
    started = time.perf_counter()
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        distributed.print_progress(progress, "[0/5] train: LoRA on every layer of SmolLM2-135M, E2E")
        result = train(DEFAULT_MODEL, "e2e", adapter, settings=settings,
                       data_options=data_options, progress=progress)
        if progress and result.validation_loss_after is not None:
            print(f"trained {result.steps} steps in {result.seconds:.0f} s; validation loss "
                  f"{result.validation_loss_before:.3f} -> {result.validation_loss_after:.3f}")
    trained = {"train": round(time.perf_counter() - started, 1)}
    report = run(DEFAULT_MODEL, adapter, "e2e", out / "run", data_options=data_options,
                 generation=generation, overwrite=overwrite, progress=progress,
                 exact_curves=exact_curves, earlier_stages=trained)
    if progress:
        print()
        print(format_table(report))
        print()
        print(report["verdict"])
        print(f"\nreport: {out / 'run' / 'report.html'}")
    return report
