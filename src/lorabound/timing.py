"""What dropping LoRA buys at inference, measured: latency, throughput and memory of five variants.

The variants: the base model; the full adapter and the pruned adapter (LoRA on layers 0..b, a real PEFT export
written by export.prune_adapter, so the dropped layers carry no LoRA module at all), each run unmerged (PEFT
adds the LoRA product to every adapted linear layer) and merged (merge_and_unload folds it into the weights).
Each is a lora/variants.Variant of an adapter folder, or of none (the base model); a :class:`Job` carries it to
the process that measures it.

Read top to bottom:

1. :class:`SpeedSettings` and :func:`resolve_device`: what is measured and where;
2. :func:`build_model` and :func:`greedy_steps`: one variant, and the timed work (one prefill forward over
   the prompts, then exactly `new_tokens` greedy decoding steps over the KV cache: no early stop, so every
   variant does the same work);
3. :class:`LocalRunner` / :class:`ProcessRunner`: where a variant is measured: in this process, or in a process
   of its own (the honest way to get each variant's peak memory on CPU: the peak RSS of that process);
4. :func:`measure`: warm-up, then repetitions interleaved across variants (ABCDE, BCDEA, ...), so machine noise
   that drifts over time spreads over all of them instead of biasing a ratio; medians with min and max;
5. :func:`speed_table` / :func:`render_markdown`: the table printed, written to speed.md and shown by the report;
6. :func:`check_request` (every refusal, before any work) and :func:`measure_request` (the pruned export into a
   scratch folder, the measurement, speed.json's content), called by pipeline.speed.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LoraboundError, first_line

if TYPE_CHECKING:  # imported where used: `lorabound --help` reads SpeedSettings without torch
    from .lora.variants import Variant

DEVICES = ("auto", "cpu", "cuda")
PROMPT_SOURCES = ("test", "synthetic")
UNITS = {"prefill_seconds": "s", "decode_seconds": "s", "prefill_tokens_per_s": "prompt tokens/s",
         "decode_ms_per_step": "ms per decoding step (one new token for every row of the batch)",
         "decode_tokens_per_s": "generated tokens/s (all rows of the batch)", "memory": "MiB (2^20 bytes)",
         "time_ratio": "time of the variant / time of the full adapter in the same round (below 1: faster)"}


@dataclass
class SpeedSettings:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16],
                                   metadata={"help": "batch sizes to measure, e.g. 1,16"})
    new_tokens: int = field(default=32, metadata={"help": "greedy decoding steps per measurement (no early stop)"})
    repeats: int = field(default=5, metadata={"help": "measured rounds per variant and batch size, after one "
                                                      "warm-up round; the median is reported"})
    prompts: str = field(default="test", metadata={"help": "test: the task's test split; synthetic: random token "
                                                           "ids of --prompt-tokens each"})
    prompt_tokens: int = field(default=64, metadata={"help": "tokens per synthetic prompt (--prompts synthetic)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu or cuda"})
    isolate: bool = field(default=True, metadata={"help": "each variant in its own process (its peak memory)"})

    def __post_init__(self):
        from .rules import check_arguments

        check_arguments(batch_sizes=self.batch_sizes, new_tokens=self.new_tokens, repeats=self.repeats,
                        prompt_tokens=self.prompt_tokens)
        if self.prompts not in PROMPT_SOURCES:
            raise LoraboundError(f"--prompts {self.prompts!r} is not offered; choose one of "
                                 f"{', '.join(PROMPT_SOURCES)}")
        if self.device not in DEVICES:
            raise LoraboundError(f"--device {self.device!r} is not offered; choose one of {', '.join(DEVICES)}")
        if not self.batch_sizes:
            raise LoraboundError("--batch-sizes is empty; pass at least one batch size, e.g. 1,16")


def resolve_device(device: str) -> str:
    """auto: cuda when torch sees a GPU, else cpu. cuda without a GPU is refused."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LoraboundError("--device cuda, but torch sees no CUDA GPU here; pass --device cpu (or auto)")
    return device


# ---------------------------------------------------------------------------
# 2. One variant, and the timed work
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """Everything a (possibly separate) process needs to build one variant and its prompts.

    The variant is stated as lora/variants.Variant states one: `adapter` an adapter folder loaded as it is (the full
    adapter, or the pruned export), None the base model (no adapter at all); :meth:`variant` is that Variant and
    :meth:`for_variant` the job of one (on the settings of another job).
    """
    name: str                    # the variant's name
    model: str
    adapter: str | None          # an adapter folder (the full adapter, or the pruned export); None: the base model
    merged: bool                 # the adapter merged into the weights (merge_and_unload)
    dtype: str
    device: str
    threads: int
    trust_remote_code: bool = False
    allow_pickle: bool = False
    prompts: tuple[str, ...] = ()   # texts; empty: synthetic prompts
    prompt_tokens: int = 64         # per synthetic prompt
    seed: int = 0

    def variant(self) -> "Variant":
        """The variant this job builds, as a Variant: another adapter folder, or the base model (selection None)."""
        from .lora.variants import Variant

        return Variant(self.name, None) if self.adapter is None else Variant(self.name, adapter=Path(self.adapter))

    @classmethod
    def for_variant(cls, base: "Job", variant: "Variant", merged: bool = False) -> "Job":
        """`base`'s job (model, device, prompts, ...) for `variant`: its adapter folder, or none for the base model.
        A selection of a loaded adapter is no folder to load: it is refused (export it with `lorabound prune`)."""
        if variant.adapter is None and not variant.is_base:
            raise LoraboundError(f"variant {variant.name!r} keeps a selection of a loaded adapter, but the speed "
                                 "measurement loads adapter folders; export it with lorabound prune and pass the "
                                 "folder")
        adapter = None if variant.adapter is None else str(variant.adapter)
        return cls(**{**asdict(base), "name": variant.name, "adapter": adapter, "merged": merged})


def build_model(job: Job):
    """(model, tokenizer) of the job's variant, in eval mode on its device."""
    from .model import load_adapter, load_model

    model, tokenizer = load_model(job.model, dtype=job.dtype, device=job.device,
                                  trust_remote_code=job.trust_remote_code)
    if job.adapter is not None:
        model = load_adapter(model, job.adapter, allow_pickle=job.allow_pickle, model_name=job.model)
        if job.merged:
            model = model.merge_and_unload()
    return model.eval(), tokenizer


def lora_module_count(model) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())


def prompt_batch(job: Job, tokenizer, model, batch: int):
    """(input_ids, attention_mask) of the first `batch` prompts, left-padded, on the model's device.

    Test prompts are cycled when the split has fewer than `batch`; synthetic prompts are seeded random ids
    (the same in every process), without padding.
    """
    import torch

    from .generation.decode import encode_batch, tokenizer_sides

    device = next(model.parameters()).device
    if not job.prompts:
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (batch, job.prompt_tokens), generator=torch.Generator().manual_seed(job.seed))
        return ids.to(device), torch.ones_like(ids).to(device)
    texts = [job.prompts[i % len(job.prompts)] for i in range(batch)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with tokenizer_sides(tokenizer):
        enc = encode_batch(tokenizer, texts, None, pad_id)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def greedy_steps(model, input_ids, attention_mask, new_tokens: int) -> tuple[list[list[int]], float, float]:
    """(tokens per row, prefill seconds, decode seconds): one forward over the prompts (prefill, which gives
    the first new token), then `new_tokens` single-token forwards over the KV cache (decode). No row stops
    early, so every variant does the same amount of work."""
    import torch

    from .generation.decode import cache_of, forward_parameters

    takes = forward_parameters(model)
    cache_arg = "cache" if "cache" in takes else "past_key_values"
    first = {"logits_to_keep": 1} if "logits_to_keep" in takes else {}
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, **first)
        chosen = out.logits[:, -1].argmax(-1)
        sync()
        prefilled = time.perf_counter()
        steps = [chosen]
        cache, position = cache_of(out), position_ids[:, -1:] + 1
        for _ in range(new_tokens):
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
            out = model(input_ids=chosen[:, None], attention_mask=attention_mask, position_ids=position,
                        use_cache=True, **{cache_arg: cache})
            cache, position = cache_of(out), position + 1
            chosen = out.logits[:, -1].argmax(-1)
            steps.append(chosen)
        sync()
        done = time.perf_counter()
    tokens = torch.stack(steps, 1).tolist()
    return tokens, prefilled - start, done - prefilled


def memory_mib(device: str) -> dict:
    """This process's memory now and at its peak: RSS on CPU (Linux /proc), allocated tensors on CUDA."""
    if device.startswith("cuda"):
        import torch

        return {"now": torch.cuda.memory_allocated() / 2**20, "peak": torch.cuda.max_memory_allocated() / 2**20,
                "kind": "torch.cuda.max_memory_allocated of the variant's process"}
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return {"now": int(fields["VmRSS"].split()[0]) / 1024, "peak": int(fields["VmHWM"].split()[0]) / 1024,
                "kind": "peak resident set size (VmHWM) of the variant's own process, loading included"}
    except (OSError, KeyError, ValueError):
        return {"now": None, "peak": None, "kind": "not measured (no /proc/self/status)"}


class LoadedModel:
    """One job's variant loaded, with its prompt batches ready: `measure(batch)` times one prefill + decode."""

    def __init__(self, job: Job, batch_sizes: list[int], new_tokens: int):
        self.memory_before = memory_mib(job.device)
        self.model, tokenizer = build_model(job)
        self.lora_modules = lora_module_count(self.model)
        self.batches = {b: prompt_batch(job, tokenizer, self.model, b) for b in batch_sizes}
        self.new_tokens = new_tokens
        self.memory_loaded = memory_mib(job.device)

    def measure(self, batch: int) -> dict:
        input_ids, attention_mask = self.batches[batch]
        tokens, prefill, decode = greedy_steps(self.model, input_ids, attention_mask, self.new_tokens)
        return {"prefill_seconds": prefill, "decode_seconds": decode,
                "prompt_tokens": int(attention_mask.sum()), "padded_length": int(input_ids.shape[1]),
                "generated_per_row": len(tokens[0])}

    def info(self, device: str) -> dict:
        peak = memory_mib(device)
        return {"lora_modules": self.lora_modules,
                "memory_mib": {"before_load": self.memory_before["now"], "after_load": self.memory_loaded["now"],
                               "peak": peak["peak"], "how": peak["kind"]}}


# ---------------------------------------------------------------------------
# 3. Where a variant is measured: in this process, or in its own
# ---------------------------------------------------------------------------

class LocalRunner:
    """Measures a job's variant in this process: cheap (tests), but the variants' memory cannot be told apart, so
    it is not reported."""

    def __init__(self, job: Job, batch_sizes: list[int], new_tokens: int):
        from .runtime.threads import set_threads

        set_threads(job.threads)
        self.job, self.loaded = job, LoadedModel(job, batch_sizes, new_tokens)

    def measure(self, batch: int) -> dict:
        return self.loaded.measure(batch)

    def finish(self) -> dict:
        info = self.loaded.info(self.job.device)
        info["memory_mib"] = {"how": "not measured: every variant ran in one process (isolate=False)"}
        self.loaded = None
        return info


def _serve(job: Job, batch_sizes: list[int], new_tokens: int, conn) -> None:
    """The body of a variant's own process: load, then answer ("measure", batch) until ("finish", None)."""
    try:
        import warnings

        import torch
        from transformers.utils import logging as transformers_logging

        warnings.filterwarnings("ignore", category=FutureWarning)  # as the parent (cli.main) does
        transformers_logging.disable_progress_bar()  # the parent's bar is the one to read
        torch.set_num_threads(job.threads)
        loaded = LoadedModel(job, batch_sizes, new_tokens)
        conn.send(("ready", None))
        while True:
            command, batch = conn.recv()
            if command == "finish":
                conn.send(("info", loaded.info(job.device)))
                return
            conn.send(("timing", loaded.measure(batch)))
    except BaseException as error:  # reported to the parent, which refuses in one line
        message = first_line(error, limit=10_000, typed=not isinstance(error, LoraboundError))
        try:
            conn.send(("error", message, traceback.format_exc(limit=3)))
        except OSError:  # the parent is gone (it was interrupted): nothing to tell
            pass


class ProcessRunner:
    """Measures a job's variant in a process of its own (spawned, so no state is shared): its peak memory is its
    own."""

    def __init__(self, job: Job, batch_sizes: list[int], new_tokens: int):
        context = multiprocessing.get_context("spawn")
        self.job = job
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(job, batch_sizes, new_tokens, child), daemon=True)
        self.process.start()
        child.close()
        self._answer("ready")

    def _answer(self, expected: str):
        try:
            kind, *value = self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise LoraboundError(f"the process measuring {self.job.name} ended (exit code {self.process.exitcode}); "
                                 "lower --batch-sizes or free memory, then rerun") from None
        if kind == "error":
            self.close()
            raise LoraboundError(f"measuring {self.job.name} failed: {value[0]}; lower --batch-sizes or check the "
                                 "model and adapter, then rerun")
        assert kind == expected, (kind, expected)
        return value[0]

    def measure(self, batch: int) -> dict:
        self.conn.send(("measure", batch))
        return self._answer("timing")

    def finish(self) -> dict:
        self.conn.send(("finish", None))
        info = self._answer("info")
        self.close()
        return info

    def close(self) -> None:
        """After finish() the child returns by itself; otherwise (an error, Ctrl-C) it is stopped."""
        self.process.join(2)
        if self.process.is_alive():
            self.process.kill()  # our own child, by its handle
            self.process.join()
        self.conn.close()


# ---------------------------------------------------------------------------
# 4. The measurement
# ---------------------------------------------------------------------------

def variant_jobs(base: Job, full_adapter: str, pruned_adapter: str, boundary: int) -> list[Job]:
    """The five variants, in table order: the base model, then the full and the pruned adapter folders, unmerged
    and merged."""
    from .lora.variants import Variant

    pruned = f"pruned (b={boundary})"
    variants = [(Variant("base model", None), False), (Variant("full adapter", adapter=Path(full_adapter)), False),
                (Variant(pruned, adapter=Path(pruned_adapter)), False),
                (Variant("full adapter, merged", adapter=Path(full_adapter)), True),
                (Variant(f"{pruned}, merged", adapter=Path(pruned_adapter)), True)]
    return [Job.for_variant(base, variant, merged) for variant, merged in variants]


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def measure(jobs: list[Job], settings: SpeedSettings, progress: bool = True) -> dict:
    """Load every variant (one after another), warm each up once per batch size, then `repeats` rounds in
    which every variant runs once per batch size, the order rotated each round. Returns per-variant results
    (raw seconds, medians with min/max, memory) and each variant's time ratio to its full adapter."""
    from tqdm.auto import tqdm

    kind = ProcessRunner if settings.isolate else LocalRunner
    sizes = list(settings.batch_sizes)
    runs: dict[str, list[dict]] = {}
    runners, info = [], {}
    bar = tqdm(total=len(jobs) * (1 + (1 + settings.repeats) * len(sizes)), desc="speed", unit="step",
               disable=not progress)
    try:
        for job in jobs:
            bar.set_postfix_str(f"loading {job.name}")
            runners.append(kind(job, sizes, settings.new_tokens))
            bar.update(1)
        for round_ in range(1 + settings.repeats):  # round 0 warms up and is not recorded
            order = runners[round_ % len(runners):] + runners[:round_ % len(runners)]
            for batch in sizes:
                for runner in order:
                    bar.set_postfix_str(f"{runner.job.name}, batch {batch}")
                    timing = runner.measure(batch)
                    if round_:
                        runs.setdefault(f"{runner.job.name}|{batch}", []).append({**timing, "round": round_})
                    bar.update(1)
        for runner in runners:
            info[runner.job.name] = runner.finish()
    finally:
        bar.close()
        for runner in runners:
            if isinstance(runner, ProcessRunner):
                runner.close()
    results = [_variant_result(job, sizes, runs, info[job.name]) for job in jobs]
    return {"variants": results, "ratios": _ratios(jobs, sizes, runs)}


def _variant_result(job: Job, sizes: list[int], runs: dict, info: dict) -> dict:
    batches = {}
    for batch in sizes:
        timings = runs[f"{job.name}|{batch}"]
        prefill = [t["prefill_seconds"] for t in timings]
        decode = [t["decode_seconds"] for t in timings]
        steps, prompt_tokens = timings[0]["generated_per_row"] - 1, timings[0]["prompt_tokens"]
        batches[str(batch)] = {
            "prompt_tokens": prompt_tokens, "padded_length": timings[0]["padded_length"], "decode_steps": steps,
            "prefill_seconds": prefill, "decode_seconds": decode,
            "prefill_tokens_per_s": summary([prompt_tokens / s for s in prefill]),
            "decode_ms_per_step": summary([1000 * s / steps for s in decode]),
            "decode_tokens_per_s": summary([batch * steps / s for s in decode]),
        }
    return {"name": job.name, "adapter": job.adapter, "merged": job.merged, **info, "batches": batches}


def _ratios(jobs: list[Job], sizes: list[int], runs: dict) -> list[dict]:
    """Each variant against the full adapter of its kind (merged with merged; the base model with unmerged),
    round by round (the two ran back to back), then the median and spread of those paired ratios."""
    full = {False: jobs[1].name, True: jobs[3].name}
    ratios = []
    for job in jobs:
        reference = full[job.merged]
        if job.name == reference:
            continue
        for batch in sizes:
            mine, theirs = runs[f"{job.name}|{batch}"], runs[f"{reference}|{batch}"]
            ratios.append({"variant": job.name, "against": reference, "batch": batch, **{
                part: summary([a[f"{part}_seconds"] / b[f"{part}_seconds"] for a, b in zip(mine, theirs)])
                for part in ("prefill", "decode")}})
    return ratios


# ---------------------------------------------------------------------------
# 5. The table
# ---------------------------------------------------------------------------

SPEED_COLUMNS = ["Variant", "Batch", "LoRA modules", "Prefill (tokens/s)", "Decode (ms/step)", "Decode (tokens/s)",
                 "Prefill time vs full", "Decode time vs full", "Peak memory (MiB)"]


def _spread(s: dict, digits: int) -> str:
    return f"{s['median']:,.{digits}f} [{s['min']:,.{digits}f}-{s['max']:,.{digits}f}]"


def speed_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): medians with [min-max] over the rounds; ratios are paired per round against the full
    adapter of the same kind (merged or not)."""
    ratios = {(r["variant"], r["batch"]): r for r in result.get("ratios") or []}
    rows = []
    for batch in result.get("batch_sizes") or []:
        for v in result.get("variants") or []:
            b = v["batches"][str(batch)]
            ratio = ratios.get((v["name"], batch))
            peak = (v.get("memory_mib") or {}).get("peak")
            rows.append([v["name"], str(batch), str(v.get("lora_modules", "?")),
                         _spread(b["prefill_tokens_per_s"], 0), _spread(b["decode_ms_per_step"], 1),
                         _spread(b["decode_tokens_per_s"], 1),
                         _spread(ratio["prefill"], 2) if ratio else "reference",
                         _spread(ratio["decode"], 2) if ratio else "reference",
                         f"{peak:,.0f}" if peak is not None else "not measured"])
    return SPEED_COLUMNS, rows


def describe(result: dict) -> str:
    """One paragraph: what was measured, where and how (shown above the table)."""
    p = result["prompts"]
    prompts = (f"the first {p['count']} prompts of the {p['task']} test split" if p["source"] == "test"
               else f"{p['count']} synthetic prompts of {p['tokens']} random token ids")
    if p["source"] == "test" and p["distinct"] < p["count"]:
        prompts += f" (cycled: the split has {p['distinct']})"
    memories = [v.get("memory_mib") or {} for v in result["variants"]]
    before = [m["before_load"] for m in memories if m.get("before_load")]
    memory = memories[0].get("how", "") + (f"; each process held {min(before):,.0f}-{max(before):,.0f} MiB before "
                                           "loading its model (Python and the libraries)" if before else "")
    return (f"Measured on {result['device']} ({result['device_name']}), torch threads {result['threads']}, "
            f"torch {result['torch_version']}, {result['dtype']}; model {result['model']}, LoRA kept on layers "
            f"0..{result['boundary']} ({result['boundary_origin']}). Prompts: {prompts} (batch B takes the first "
            f"B). Each measurement: one prefill forward over the left-padded prompts, then {result['new_tokens']} "
            f"greedy decoding steps over the KV cache with no early stop. One warm-up round, then "
            f"{result['repeats']} rounds with the variants interleaved (order rotated each round); median "
            f"[min-max] over the rounds. Ratios: the variant's time over the full adapter's (merged rows against "
            f"the merged full adapter) in the same round. Memory: {memory}."
            + (f" {result['note']}" if result.get("note") else ""))


def render_markdown(result: dict) -> str:
    from .formatting import markdown_table

    header, rows = speed_table(result)
    return "\n".join([f"# Inference speed (measured): {result['model']}", "", describe(result), "",
                      markdown_table(header, rows), ""])


def environment(device: str) -> dict:
    """Where the numbers come from: device, its name, threads and library versions."""
    import peft
    import torch
    import transformers

    from .runtime.threads import torch_threads

    name = torch.cuda.get_device_name(0) if device == "cuda" else (_cpu_name() or "CPU")
    return {"device": device, "device_name": name, "threads": torch_threads(), "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "peft_version": peft.__version__,
            "cpu_cores": os.cpu_count(), "load_average_at_start": _load_average()}


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ---------------------------------------------------------------------------
# 6. The command: checks first, then the export, the measurement and the files
# ---------------------------------------------------------------------------

SCRATCH = "speed-scratch"  # inside the output folder, removed when the command ends


@dataclass(frozen=True)
class Request:
    """What to measure, after every check: the adapter, the boundary (and why), where to write."""
    model_options: object      # pipeline.ModelOptions (device already resolved)
    data_options: object       # pipeline.DataOptions
    adapter: Path
    boundary: int
    boundary_origin: str
    layers_path: str
    num_layers: int
    adapter_layers: tuple[int, ...]
    prompts: tuple[str, ...]   # empty for synthetic prompts
    task: str | None


def run_folder_source(run_dir: str | Path) -> dict:
    """The model, adapter, data options, dtype and chosen boundary of a `lorabound run` folder."""
    from .runtime.files import read_json

    run_dir = Path(run_dir)
    fix = "pass a folder written by 'lorabound run' (it holds run.json and report.json)"
    if not run_dir.is_dir():
        raise LoraboundError(f"--run {run_dir} is not a folder; {fix}")
    for name in ("run.json", "report.json"):
        if not (run_dir / name).is_file():
            raise LoraboundError(f"--run {run_dir} has no {name}; {fix} and let it finish")
    asked = read_json(run_dir / "run.json", "rerun that run to rewrite it")
    report = read_json(run_dir / "report.json", "rerun that run to rewrite it")
    search = report.get("search") or {} if isinstance(report, dict) else {}
    if not isinstance(asked, dict) or "adapter" not in asked or search.get("boundary") is None:
        raise LoraboundError(f"--run {run_dir}: run.json or report.json lacks the adapter or the boundary; {fix}")
    return {"model": asked.get("model"), "adapter": asked["adapter"], "data": asked.get("data") or {},
            "dtype": asked.get("dtype"), "boundary": search["boundary"],
            "origin": f"chosen by the run's search ({search.get('criterion', 'given')})"}


def check_request(model_options, data_options, adapter, boundary: int, origin: str,
                  settings: SpeedSettings) -> Request:
    """Every refusal before any work: the adapter, the boundary against the model and the adapter, the data."""
    from .lora.selection import check_boundary
    from .data import require_nonempty
    from .model import model_layers_path, model_num_layers, read_adapter_config
    from .lora.export import AdapterFiles

    from .model import DTYPES

    if model_options.dtype not in DTYPES:
        raise LoraboundError(f"unknown dtype '{model_options.dtype}'; choose one of: {', '.join(DTYPES)}")
    read_adapter_config(adapter)  # names a missing folder first
    num_layers = model_num_layers(model_options.model, trust_remote_code=model_options.trust_remote_code)
    check_boundary(boundary, num_layers)
    layers_path = model_layers_path(model_options.model, trust_remote_code=model_options.trust_remote_code)
    layers = AdapterFiles.read(adapter, layers_path, num_layers=num_layers).layers()
    if not layers:
        raise LoraboundError(f"the adapter {adapter} has no LoRA in the model's layers; pass a LoRA adapter")
    if boundary >= max(layers):
        raise LoraboundError(f"boundary {boundary} keeps every LoRA layer of the adapter (its top layer is "
                             f"{max(layers)}), so the pruned adapter would be the full one; pass --boundary "
                             f"below {max(layers)}")
    if boundary < min(layers):
        raise LoraboundError(f"boundary {boundary} keeps no LoRA layer (the adapter starts at layer {min(layers)}), "
                             f"so the pruned adapter would be the base model; pass --boundary from {min(layers)}")
    prompts, task_name = (), None
    if settings.prompts == "test":
        task, splits = data_options.load()
        examples = require_nonempty(splits.test, "test")
        prompts, task_name = tuple(task.prompt(e) for e in examples[:max(settings.batch_sizes)]), task.name
    check_speed_room(model_options, prompts, settings)
    return Request(model_options=model_options, data_options=data_options, adapter=Path(adapter),
                   boundary=boundary, boundary_origin=origin, layers_path=layers_path, num_layers=num_layers,
                   adapter_layers=tuple(layers), prompts=prompts, task=task_name)


def check_speed_room(model_options, prompts: tuple[str, ...], settings: SpeedSettings) -> None:
    """Refuse prompts plus --new-tokens that run past a learned position table (GPT-2, OPT) before any worker
    starts: the model is built from its config alone, and the tokenizer counts the test prompts."""
    from .model import check_sequence_room, config_position_limit, load_tokenizer

    spec, remote = model_options.model, model_options.trust_remote_code
    limit = config_position_limit(spec, trust_remote_code=remote)
    if limit is None:
        return
    if prompts:
        check_sequence_room(None, spec, load_tokenizer(spec, trust_remote_code=remote), limit=limit,
                            prompts={"test": list(prompts)}, max_new_tokens=settings.new_tokens,
                            new_tokens_flag="--new-tokens")
    else:
        check_sequence_room(None, spec, None, limit=limit, prompts={"synthetic": [settings.prompt_tokens]},
                            max_new_tokens=settings.new_tokens, new_tokens_flag="--new-tokens",
                            shorten="a smaller --prompt-tokens")


def measure_request(request: Request, settings: SpeedSettings, folder: Path, progress: bool) -> dict:
    """Export the pruned adapter into a scratch folder inside `folder`, measure the five variants, and
    return speed.json's content. The scratch folder is removed afterwards."""
    import shutil

    from .runtime.threads import torch_threads
    from .lora.export import prune_adapter

    options = request.model_options
    scratch = folder / SCRATCH
    try:
        pruned = prune_adapter(request.adapter, request.boundary, scratch / "adapter-pruned",
                               num_layers=request.num_layers, layers_path=request.layers_path, overwrite=True)
        base = Job(name="", model=options.model, adapter=None, merged=False, dtype=options.dtype,
                   device=options.device, threads=torch_threads(), trust_remote_code=options.trust_remote_code,
                   allow_pickle=options.allow_pickle, prompts=request.prompts, prompt_tokens=settings.prompt_tokens,
                   seed=request.data_options.seed)
        jobs = variant_jobs(base, str(request.adapter), str(pruned.out_dir), request.boundary)
        measured = measure(jobs, settings, progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    count = max(settings.batch_sizes)
    return {
        "measured": True, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **environment(options.device), "dtype": options.dtype, "model": options.model,
        "adapter": str(request.adapter), "boundary": request.boundary, "boundary_origin": request.boundary_origin,
        "num_layers": request.num_layers, "adapter_layers": list(request.adapter_layers),
        "layers_kept": [layer for layer in request.adapter_layers if layer <= request.boundary],
        "prompts": ({"source": "test", "task": request.task, "count": count, "distinct": len(request.prompts)}
                    if request.prompts else {"source": "synthetic", "count": count, "tokens": settings.prompt_tokens,
                                             "seed": request.data_options.seed}),
        "batch_sizes": list(settings.batch_sizes), "new_tokens": settings.new_tokens, "repeats": settings.repeats,
        "warmup_rounds": 1, "isolated": settings.isolate, "units": UNITS,
        "how": ("prefill: one forward over the left-padded prompts (it yields the first new token); decode: "
                "new_tokens single-token greedy forwards over the KV cache, no early stop; one warm-up round, then "
                "`repeats` rounds with the variants interleaved, the order rotated each round; each variant "
                + ("in its own process" if settings.isolate else "in one shared process")),
        **measured,
    }


def write_results(folder: Path, result: dict) -> None:
    """speed.json and speed.md, each atomically."""
    from .runtime.files import write_json_atomic, write_text_atomic

    write_json_atomic(folder / "speed.json", result)
    write_text_atomic(folder / "speed.md", render_markdown(result))
