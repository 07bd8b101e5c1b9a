"""The `lorabound` command: parses arguments, calls pipeline functions, prints. Nothing else lives here.

The modules that load torch, numpy or PEFT are imported inside the functions, after main() has started: a Ctrl-C
during those seconds of imports is then an interruption like any other (exit 130, one line), not a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import errno
import signal
import sys
import threading
import warnings
from pathlib import Path

from .runtime.threads import held_library_warnings, offline_unless_asked, set_threads

offline_unless_asked()  # before any hub library is imported (they read it once)

from . import __version__  # noqa: E402
from .errors import LoraboundError  # noqa: E402
from .lora.selection import GROUPS  # noqa: E402
from .runtime import distributed  # noqa: E402

RESUMING = ("run", "demo", "study", "train")  # a rerun continues where these stopped (stages, checkpoints)

EXAMPLES = {
    "train": "lorabound train --model smollm2-135m --data e2e --out adapter --epochs 1",
    "analyze": "lorabound analyze --model smollm2-135m --adapter adapter --data e2e --out run",
    "search": "lorabound search --model smollm2-135m --adapter adapter --data e2e --criterion auto",
    "prune": "lorabound prune --adapter adapter --boundary 19 --out adapter-b19\n"
             "  lorabound prune --adapter adapter --boundary-attention 20 --boundary-mlp 9 --out adapter-a20-m9",
    "evaluate": "lorabound evaluate --model smollm2-135m --adapter adapter --data e2e --boundaries 14 19 --out eval",
    "run": "lorabound run --model smollm2-135m --adapter adapter --data e2e --out run",
    "demo": "lorabound demo --out lorabound-demo",
    "study": "lorabound study --grid studies/paper.toml --out study",
    "speed": "lorabound speed --model smollm2-135m --adapter adapter --boundary 19 --out speed",
}
DESCRIPTIONS = {
    "train": "Fine-tune LoRA on every layer (loss on target tokens only) and save a PEFT adapter.",
    "analyze": "Per-layer teacher-forced curves on validation: truncation, logit lens, single-layer ablation.",
    "search": "Choose the boundary b: LoRA is kept on layers 0..b and dropped above.",
    "prune": "Write a new adapter with LoRA on layers 0..b only, on a layer set, or up to a b per module group "
             "(peft, zero-fill or merged).",
    "evaluate": "Generate on test for base, full and pruned variants; BLEU, ROUGE, chrF and bootstrap tests.",
    "run": "analyze, search, prune, evaluate and report into one folder; rerun to resume.",
    "demo": "Train SmolLM2-135M with LoRA on E2E, then the whole run, and print the results table.",
    "study": "Train and run every cell of a grid (models x tasks x seeds x training settings), then pool the answer.",
    "speed": "Measure latency, throughput and memory of the base model, the full and the pruned adapter, "
             "unmerged and merged.",
}


THREADS_HELP = ("CPU threads for torch (default: the cores free at start, i.e. usable cores minus the cores busy "
                "over a 0.2 s sample, at least 1)")
EXACT_HELP = ("compute the logit lens and the ablation on every validation example with a float64 log-softmax "
              "(default: on the first quarter, labelled approximated; the truncation curve is always complete)")


class Parser(argparse.ArgumentParser):
    """argparse with lorabound's refusal form: one line `error: ...; fix` and exit status 2, no usage block."""

    def error(self, message: str):
        message = " ".join(message.split())
        distributed.refuse(f"error: {message}; see '{self.prog} --help'")  # once under torchrun
        self.exit(2)


def _add_fields(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One --option per dataclass field, with the field's help text and default."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata.get("help", "")
        kind = str(f.type)
        if kind == "bool" and default:
            parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=f"do not: {text}")
        elif kind == "bool":
            parser.add_argument(flag, action="store_true", help=text)
        elif kind.startswith("list[int]"):
            parser.add_argument(flag, type=int, nargs="+", default=default, help=text)
        elif kind.startswith("list[str]"):
            parser.add_argument(flag, nargs="+", default=default, help=f"{text} (default: {default})")
        else:
            convert = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, type=convert, default=default, help=f"{text} (default: {default})")


def _picked(args: argparse.Namespace, cls, **overrides):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def build_parser() -> argparse.ArgumentParser:
    # imported here, and only modules free of torch: `lorabound --help` stays quick
    from .metrics.scores import MetricOptions
    from .options import DataOptions, GenerationOptions, ModelOptions, TrainSettings, VLLMOptions
    from .rules import CURVES, EXPORT_FORMATS, OPTIONAL_CURVES
    from .decision.boundary import CRITERIA, GOALS, SELECTION_CRITERIA

    parser = Parser(
        prog="lorabound",
        description="Find the layer above which a LoRA adapter can be dropped, prune it, and measure the cost.",
        epilog="Start with: lorabound demo",
    )
    parser.add_argument("--version", action="version", version=f"lorabound {__version__}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, help=THREADS_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=DESCRIPTIONS[name], description=DESCRIPTIONS[name],
                                  epilog=f"example:\n  {EXAMPLES[name]}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        # Also accepted after the command; SUPPRESS keeps a --quiet given before it.
        sub.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
        sub.add_argument("--threads", type=int, default=argparse.SUPPRESS, help=THREADS_HELP)
        return sub

    def model_and_data(p, adapter=True):
        _add_fields(p, ModelOptions)
        if adapter:
            p.add_argument("--adapter", required=True, help="the LoRA adapter folder (PEFT format)")
        _add_fields(p, DataOptions)

    def search_rule(p):
        p.add_argument("--goal", choices=GOALS, help="for --criterion auto: quality (default; drop layers only "
                       "for a validation gain beyond noise) or size (smallest b shown non-inferior within "
                       "--tolerance)")
        p.add_argument("--tolerance", type=float, default=None, help="points a smaller b may lose: the "
                       "non-inferiority margin of --goal size and greedy-drop (default 1), or the smallest b within "
                       "this many points of the best for bleu / rougeL / chrf (default: 0)")
        p.add_argument("--knee-fraction", type=float, default=0.9, help="share of the full gain the knee must reach")

    def generation_flags(p):
        """How outputs are generated (engine included) and scored: search, evaluate and run."""
        _add_fields(p, GenerationOptions)
        _add_fields(p, VLLMOptions)
        _add_fields(p, MetricOptions)

    def selection_flags(p, lead: str, many: bool = False):
        """What to keep besides a boundary: a layer set, or per module group boundaries (issue 12)."""
        p.add_argument("--layers", nargs="+" if many else None, default=[] if many else None, metavar="SET",
                       help=lead + "LoRA on a layer set, every module group, e.g. 0-9,12,15" + (
                           " (one row per set)" if many else ""))
        for group in GROUPS:
            p.add_argument(f"--boundary-{group}", type=int, metavar="B", help=lead + f"{group} LoRA on layers "
                           f"0..B only (-1: none); module groups not given keep all their LoRA")

    p = command("train")
    model_and_data(p, adapter=False)
    p.add_argument("--out", required=True, help="folder for the new adapter")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--lr", dest="learning_rate", type=float, default=TrainSettings.learning_rate,
                   help=f"AdamW learning rate (default: {TrainSettings.learning_rate})")
    _add_fields(p, TrainSettings, skip=("seed", "max_length", "learning_rate"))

    p = command("analyze")
    model_and_data(p)
    p.add_argument("--out", required=True, help="run folder for curves.json and plots")
    p.add_argument("--curves", nargs="+", choices=CURVES + OPTIONAL_CURVES, default=list(CURVES),
                   help="which curves to compute (default: the first three; joint costs about 2L/3 truncation sweeps)")
    p.add_argument("--exact-curves", action="store_true", help=EXACT_HELP)
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default: 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = command("search")
    model_and_data(p)
    p.add_argument("--criterion", choices=CRITERIA, default="auto", help="how to pick b (default: auto)")
    p.add_argument("--boundary", type=int, help="your own b (skips the search)")
    search_rule(p)
    p.add_argument("--candidates", type=int, nargs="+", help="boundaries to generate for (auto, bleu, rougeL, chrf; "
                   "default: read off the truncation curve)")
    p.add_argument("--keep-fraction", type=float, help="for --criterion greedy-drop: share of the LoRA parameters to "
                   "keep, in (0, 1] (a parameter budget instead of --tolerance)")
    p.add_argument("--out", help="optional folder to keep curves, generations and search.json")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default: 8)")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (default: 1000)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    generation_flags(p)

    p = command("prune")
    p.add_argument("--adapter", required=True, help="the LoRA adapter folder to prune (read only)")
    p.add_argument("--boundary", type=int, help="keep LoRA on layers 0..B")
    selection_flags(p, "instead of --boundary: ")
    p.add_argument("--out", required=True, help="folder for the new adapter (written atomically)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="peft", help="export format (default: peft)")
    p.add_argument("--model", help="base model: needed for --format merged, and to check the boundary's range")
    p.add_argument("--dtype", default="float32", help="dtype for --format merged (default: float32)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = command("evaluate")
    model_and_data(p)
    p.add_argument("--boundaries", type=int, nargs="+", default=[], help="also evaluate LoRA kept up to each b")
    p.add_argument("--adapters", nargs="+", default=[], help="also evaluate these exported adapter folders")
    selection_flags(p, "also evaluate ", many=True)
    p.add_argument("--out", required=True, help="folder for generations and evaluation.json")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (default: 1000)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    generation_flags(p)

    p = command("run")
    model_and_data(p)
    p.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    p.add_argument("--criterion", choices=CRITERIA, default="auto", help="how to pick b (default: auto)")
    p.add_argument("--boundary", type=int, help="your own b (skips the search)")
    search_rule(p)
    p.add_argument("--boundaries", type=int, nargs="+", default=[], help="also evaluate LoRA kept up to each b")
    p.add_argument("--keep-fraction", type=float, help="for --criterion greedy-drop: share of the LoRA parameters to "
                   "keep, in (0, 1] (a parameter budget instead of --tolerance)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default: 8)")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (default: 1000)")
    p.add_argument("--overwrite", action="store_true", help="start the run folder afresh")
    p.add_argument("--exact-curves", action="store_true", help=EXACT_HELP)
    p.add_argument("--speed", action="store_true", help="then measure inference speed at the chosen b (as "
                   "'lorabound speed --run OUT' with its defaults) and add it to the report")
    generation_flags(p)

    p = command("demo")
    p.add_argument("--out", default="lorabound-demo", help="folder for the adapter and the run (default: lorabound-demo)")
    p.add_argument("--train-size", type=int, default=64, help="E2E training inputs (each has several references)")
    p.add_argument("--validation-size", type=int, default=40, help="E2E validation inputs")
    p.add_argument("--test-size", type=int, default=100, help="E2E test inputs")
    p.add_argument("--epochs", type=float, default=1.0, help="training epochs")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per example at most")
    p.add_argument("--seed", type=int, default=0, help="seed for everything")
    p.add_argument("--overwrite", action="store_true", help="start the demo folder afresh")
    p.add_argument("--exact-curves", action="store_true", help=EXACT_HELP)

    p = command("speed")
    from .timing import DEVICES, PROMPT_SOURCES, SpeedSettings
    p.add_argument("--model", help="smollm2-135m, a model folder, a .gguf file or a hub id (default: smollm2-135m, "
                   "or the run's with --run)")
    _add_fields(p, ModelOptions, skip=("model", "device"))
    p.add_argument("--adapter", help="the LoRA adapter folder (PEFT format; read only)")
    p.add_argument("--boundary", type=int, help="keep LoRA on layers 0..B in the pruned variant (with --run: "
                   "instead of the run's b)")
    p.add_argument("--run", help="a 'lorabound run' folder: its model, adapter, data and chosen b; without --out, "
                   "speed.json is written there and shown in its report")
    p.add_argument("--out", help="folder for speed.json and speed.md (default with --run: the run folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--batch-sizes", type=_int_list, default=SpeedSettings().batch_sizes,
                   help="comma-separated batch sizes (default: 1,16)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--prompts", choices=PROMPT_SOURCES, default="test",
                   help="test: the task's test split (default); synthetic: random token ids of --prompt-tokens")
    _add_fields(p, SpeedSettings, skip=("batch_sizes", "device", "prompts"))
    _add_fields(p, DataOptions)

    p = command("study")
    p.add_argument("--out", required=True, help="study folder (rerun the same command to resume)")
    p.add_argument("--grid", help="a TOML grid file (see studies/paper.toml); the flags below override it")
    p.add_argument("--models", nargs="+", help="model specs (default: smollm2-135m)")
    p.add_argument("--tasks", nargs="+", help="built-in tasks or .jsonl/.csv files (default: e2e)")
    p.add_argument("--seeds", type=int, nargs="+", help="one cell per seed (default: 0)")
    p.add_argument("--epochs", type=float, nargs="+", help="training epochs; crossed with --ranks (default: 1)")
    p.add_argument("--ranks", type=int, nargs="+", help="LoRA ranks, alpha = 2 x rank (default: 16)")
    for name in ("train-size", "validation-size", "test-size", "max-length", "max-new-tokens"):
        p.add_argument(f"--{name}", type=int, help="as in run, for every cell")
    p.add_argument("--criterion", choices=[c for c in CRITERIA if c not in SELECTION_CRITERIA],
                   help="how each cell picks b (default: auto)")
    p.add_argument("--bootstrap", type=int, help="paired bootstrap resamples (default: 1000)")
    p.add_argument("--transfer", help="also apply each cell's b to this task's test split")
    p.add_argument("--retry-failed", action="store_true", help="run failed cells again (default: keep them failed)")
    p.add_argument("--overwrite", action="store_true", help="start the study folder afresh")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where each cell trains and runs "
                   "(default: cpu)")
    p.add_argument("--shard", metavar="I/N", help="run only the cells at positions I, I+N, I+2N, ... of the grid's "
                   "order (0 <= I < N), for a SLURM array or separate jobs; no report: the same command without "
                   "--shard over the finished cells pools them")
    from .runtime.executors import EXECUTORS, ExecutorOptions
    p.add_argument("--executor", choices=EXECUTORS, default="local", help="local: cells one after another in this "
                   "process (default); ray: each cell a Ray task ('pip install lorabound[ray]')")
    _add_fields(p, ExecutorOptions, skip=("executor",))
    return parser


def main(argv: list[str] | None = None) -> int:
    with _interruptible():
        try:
            code = _main(argv)
            _stop_if_interrupted()  # a Ctrl-C that Python swallowed (see _interruptible) still counts
            return code
        except BaseException as error:
            if distributed.stopped_by_launcher():
                return 2  # another rank ended first and said why (see distributed.refuse)
            # Libraries may wrap the KeyboardInterrupt (a RuntimeError from a class body, say): the flag tells.
            if not (isinstance(error, KeyboardInterrupt) or _interrupted.is_set()):
                raise
            command = next((a for a in (sys.argv[1:] if argv is None else argv) if a in DESCRIPTIONS), None)
            again = "continue where it stopped" if command in RESUMING else "start it again"
            if distributed.is_main():
                print(f"interrupted; rerun the same command to {again}", file=sys.stderr)
            return 130


def _main(argv: list[str] | None) -> int:
    distributed.stop_quietly_until_started()
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes are not for users
    if not distributed.is_main():
        args.quiet = True  # under torchrun only rank 0 prints (an error only its own rank has comes from that rank)
    offline_unless_asked()  # for main() called in-process (lorabound reads it at each load)
    try:
        with contextlib.redirect_stdout(sys.stdout if distributed.is_main() else io.StringIO()), \
                held_library_warnings(refusals=(LoraboundError, OSError)):
            return _dispatch(args)
    except LoraboundError as error:
        _stop_if_interrupted()  # an error made of a Ctrl-C is the interruption, not a refusal
        distributed.refuse(f"error: {error}")  # once under torchrun
        return 2
    except OSError as error:  # the last resort: a full disk, a folder made read-only during the work, ...
        _stop_if_interrupted()
        distributed.refuse(f"error: {_os_error_line(error, args)}")
        return 2
    finally:
        distributed.finish()


_interrupted = threading.Event()


@contextlib.contextmanager
def _interruptible():
    """SIGINT raises KeyboardInterrupt for the command, even in a process started with SIGINT ignored (a script's
    `lorabound ... &` job, which Python would otherwise leave deaf to `kill -INT`); the old handler comes back.

    Python prints and drops a KeyboardInterrupt raised inside a weakref callback (which imports run), so the
    handler also sets a flag: _stop_if_interrupted raises it again after the imports and at the end.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _interrupted.clear()
    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler set outside Python, which cannot be put back from here
            signal.signal(signal.SIGINT, previous)


def _interrupt(signum, frame) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def _stop_if_interrupted() -> None:
    if _interrupted.is_set():
        raise KeyboardInterrupt


def _dispatch(args: argparse.Namespace) -> int:
    from . import pipeline
    from .metrics.scores import MetricOptions
    from .options import DataOptions, GenerationOptions, ModelOptions, TrainSettings, VLLMOptions

    _stop_if_interrupted()  # before any work, should a Ctrl-C during those imports have been dropped
    progress = not args.quiet
    set_threads(args.threads)
    if not progress:
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()
    name = args.command
    if name == "prune":
        result = pipeline.prune(args.adapter, args.boundary, args.out, format=args.format, model=args.model,
                                overwrite=args.overwrite, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                                layers=args.layers, group_boundaries=_group_boundaries(args))
        print(result.summary())
        return 0
    if name == "demo":
        pipeline.demo(args.out, train_size=args.train_size, validation_size=args.validation_size,
                      test_size=args.test_size, epochs=args.epochs, max_new_tokens=args.max_new_tokens,
                      seed=args.seed, overwrite=args.overwrite, progress=progress, exact_curves=args.exact_curves)
        return 0

    if name == "study":
        return _study(args, progress)
    if name == "speed":
        return _speed(args, progress)

    data_options, model_options = _picked(args, DataOptions), _picked(args, ModelOptions)
    common = dict(data_options=data_options, model_options=model_options, progress=progress)
    if name == "train":
        settings = _picked(args, TrainSettings, seed=args.seed, max_length=args.max_length,
                           target_modules=_target_modules(args.target_modules))
        result = pipeline.train(args.model, args.data, args.out, settings=settings, overwrite=args.overwrite, **common)
        print(f"saved adapter to {result.adapter_dir} ({result.trainable_params:,} LoRA parameters, "
              f"{result.steps} steps, {result.seconds:.0f} s)")
        print(f"train loss: {result.train_loss_first:.3f} -> {result.train_loss_last:.3f}")
        if result.validation_loss_after is not None:
            print(f"validation loss: {result.validation_loss_before:.3f} -> {result.validation_loss_after:.3f}")
        return 0
    if name == "analyze":
        curves = pipeline.analyze(args.model, args.adapter, args.data, args.out, curves=tuple(args.curves),
                                  batch_size=args.batch_size, overwrite=args.overwrite,
                                  exact_curves=args.exact_curves, **common)
        _print_truncation(curves)
        print(f"wrote {Path(args.out) / 'curves.json'} and plots")
        return 0
    generation = _picked(args, GenerationOptions)
    common["vllm"] = _picked(args, VLLMOptions)
    metrics = _picked(args, MetricOptions) if hasattr(args, "bleu_tokenize") else None
    if name == "search":
        result = pipeline.search(args.model, args.adapter, args.data, criterion=args.criterion,
                                 boundary=args.boundary, tolerance=args.tolerance, knee_fraction=args.knee_fraction,
                                 candidates=args.candidates, out=args.out, batch_size=args.batch_size,
                                 generation=generation, overwrite=args.overwrite, goal=args.goal,
                                 bootstrap=args.bootstrap, metric_options=metrics,
                                 keep_fraction=args.keep_fraction, **common)
        if result.selection_text is not None:
            _print_selection(result)
            return 0
        print(f"boundary b = {result.boundary} ({result.reason})")
        print(f"LoRA parameters kept: {result.lora_params_kept:,} of {result.lora_params_total:,} "
              f"({result.kept_fraction:.1%})")
        _print_candidates(result)
        return 0
    if name == "evaluate":
        result = pipeline.evaluate(args.model, args.adapter, args.data, boundaries=args.boundaries,
                                   adapters=args.adapters, layers=args.layers,
                                   group_boundaries=_group_boundaries(args), out=args.out, generation=generation,
                                   bootstrap=args.bootstrap, overwrite=args.overwrite, metric_options=metrics,
                                   **common)
        from .report.document import format_table
        print(format_table(result))
        for test in result["significance"]:
            print(test["sentence"])
        print(f"BLEU signature: {result['bleu_signature']}")
        print(f"ROUGE signature: {result['rouge_signature']}")
        return 0
    if name == "run":
        report = pipeline.run(args.model, args.adapter, args.data, args.out, criterion=args.criterion,
                              boundary=args.boundary, tolerance=args.tolerance, knee_fraction=args.knee_fraction,
                              boundaries=args.boundaries, batch_size=args.batch_size, bootstrap=args.bootstrap,
                              generation=generation, overwrite=args.overwrite, goal=args.goal,
                              metric_options=metrics, exact_curves=args.exact_curves,
                              keep_fraction=args.keep_fraction, **common)
        from .report.document import format_table
        print(format_table(report))
        print(report["verdict"])
        if args.speed:
            _run_speed(report, args, progress)
        print(f"report: {Path(args.out) / 'report.html'}")
        return 0
    raise AssertionError(name)


def _study(args: argparse.Namespace, progress: bool) -> int:
    from .runtime.executors import ExecutorOptions
    from .studies import load_grid, study

    grid = load_grid(args.grid, models=args.models, tasks=args.tasks, seeds=args.seeds, epochs=args.epochs,
                     ranks=args.ranks, train_size=args.train_size, validation_size=args.validation_size,
                     test_size=args.test_size, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
                     criterion=args.criterion, bootstrap=args.bootstrap, transfer=args.transfer)
    summary = study(args.out, grid, overwrite=args.overwrite, retry_failed=args.retry_failed, progress=progress,
                    shard=args.shard, executor=_picked(args, ExecutorOptions), device=args.device)
    if "shard" in summary:
        done = sum(1 for c in summary["cells"] if c["status"] == "ok")
        print(f"shard {summary['shard']}: {done} of {len(summary['cells'])} cells finished")
        for failed in summary["failed"]:
            print(f"failed cell {failed['id']}: {failed['reason']}")
        print("when every shard has finished, run the same command without --shard to pool the cells")
        return 0
    print(summary["paper"]["comparison"])
    for failed in summary["failed"]:
        print(f"failed cell {failed['id']}: {failed['reason']}")
    print(f"report: {Path(args.out) / 'study.html'}")
    return 0


def _speed(args: argparse.Namespace, progress: bool) -> int:
    from . import pipeline
    from .formatting import markdown_table
    from .options import DataOptions, ModelOptions
    from .rules import DEFAULT_MODEL
    from .timing import SpeedSettings, describe, speed_table

    settings = _picked(args, SpeedSettings)
    data_options = _picked(args, DataOptions)
    result = pipeline.speed(args.model, args.adapter, boundary=args.boundary, run=args.run, out=args.out,
                            settings=settings, data_options=None if data_options == DataOptions() else data_options,
                            model_options=_picked(args, ModelOptions, model=args.model or DEFAULT_MODEL,
                                                  device="cpu"),
                            overwrite=args.overwrite, progress=progress)
    print(describe(result))
    print(markdown_table(*speed_table(result)))
    print(f"wrote {Path(args.out or args.run) / 'speed.json'} and speed.md")
    return 0


def _run_speed(report: dict, args: argparse.Namespace, progress: bool) -> None:
    """run --speed: measure at the chosen b, unless it drops nothing (or everything): then say so."""
    from . import pipeline
    from .pipeline import ModelOptions
    from .timing import SpeedSettings, describe, speed_table
    from .formatting import markdown_table

    b, layers = report["search"]["boundary"], report["curves"]["meta"]["adapter_layers"]
    if not min(layers) <= b < max(layers):
        print(f"speed: skipped, b = {b} drops {'no' if b >= max(layers) else 'every'} LoRA layer, so there is no "
              f"pruned adapter to measure; run 'lorabound speed --run {args.out} --boundary B' for another b")
        return
    options = _picked(args, ModelOptions)
    result = pipeline.speed(run=args.out, settings=SpeedSettings(device=options.device), progress=progress,
                            model_options=options)
    print(describe(result))
    print(markdown_table(*speed_table(result)))


def _int_list(text: str) -> list[int]:
    """'1,16' (or '1 16') as [1, 16]; argparse turns the ValueError into a one-line refusal."""
    return [int(part) for part in text.replace(",", " ").split()]


def _os_error_line(error: OSError, args: argparse.Namespace | None = None) -> str:
    """One line naming the file (and the flag that gave it) and the fix, for an OSError no earlier check foresaw."""
    from .runtime.files import CACHE_ENV, cache_root

    name = str(error.filename) if error.filename else ""
    shown = name if len(name) <= 80 else name[:60] + "..."
    flag = _flag_of(args, name) if args is not None and name else None
    where = f" ({flag} {shown})" if flag else f" ({shown})" if name else ""
    if error.errno == errno.ENAMETOOLONG:
        fix = f"pass a shorter {flag or 'path'} (each name at most 255 bytes)"
    elif error.errno == errno.ENOSPC:
        fix = "free some space and rerun the same command (finished stages are kept)"
    elif error.filename and cache_root().resolve() in Path(str(error.filename)).resolve().parents:
        fix = f"set {CACHE_ENV} to a folder you can write to"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "pass input paths you can read, and an --out you can write to"
    else:
        fix = "check the path and rerun the same command"
    return " ".join(f"{error.strerror or type(error).__name__}{where}; {fix}".split())


def _flag_of(args: argparse.Namespace, filename: str) -> str | None:
    """The flag whose value is `filename` or a folder holding it, e.g. --out for OUT/curves.json."""
    from .rules import flag

    for dest, value in vars(args).items():
        for given in value if isinstance(value, list) else [value]:
            if isinstance(given, str) and given and (filename == given or filename.startswith(given.rstrip("/") + "/")):
                return flag(dest)
    return None


def _group_boundaries(args: argparse.Namespace) -> dict[str, int]:
    """--boundary-attention / --boundary-mlp / --boundary-other as {group: b}, the ones given only."""
    return {group: b for group in GROUPS if (b := getattr(args, f"boundary_{group}")) is not None}


def _target_modules(value):
    if value is None or value == ["all-linear"] or value == "all-linear":
        return "all-linear"
    return list(value)


def _interval(test: dict | None) -> str:
    if test is None:
        return f"{'(reference)':>22}"
    return f"{test['diff']:+7.2f} [{test['ci_low']:+6.1f}, {test['ci_high']:+6.1f}]"


def _margin(tests: dict) -> str:
    if "margin" not in tests:
        return ""
    return f"; --goal size: non-inferiority margin {tests['margin']:g} points, {tests['rule']}"


def _print_selection(result) -> None:
    """per-module / greedy-drop: the chosen selection, its candidates and the prefix of the same size."""
    from .metrics.scores import COMBINED

    print(f"selection: {result.selection_text} ({result.reason})")
    print(f"LoRA parameters kept: {result.lora_params_kept:,} of {result.lora_params_total:,} "
          f"({result.kept_fraction:.1%})")
    tests = result.validation_tests
    print(f"validation, {tests['n']} examples; against the full adapter: difference of the mean of BLEU and ROUGE-L "
          f"[95% CI] ({tests['interval']}, {tests['resamples']} resamples), p ({tests['test']}){_margin(tests)}")
    for row in result.candidates:
        vs = (row.get("vs_full") or {}).get(COMBINED)
        versus = f"  {_interval(vs)}  p {vs['p_value']:.3f}" if vs else ""
        print(f"  {row['describe']:<40} params {row['lora_params_kept']:>10,}  BLEU {row['bleu']:6.2f}  "
              f"ROUGE-L {row['rougeL']:6.2f}{versus}  ({', '.join(row['why'])})")
    prefix = result.compared_prefix
    tests = prefix["tests"]
    if isinstance(tests, dict):
        t = tests[COMBINED]
        print(f"against the prefix of the same size ({prefix['describe']}, {prefix['lora_params_kept']:,} parameters): "
              f"mean of BLEU and ROUGE-L {t['chosen']:.2f} vs {t['prefix']:.2f}, {_interval(t)}, p {t['p_value']:.3f}")
    else:
        print(f"prefix of the same size: {prefix['describe']} ({tests})")


def _print_candidates(result) -> None:
    """The candidates' validation scores, and each one against the full adapter (difference [95% CI], p)."""
    from .metrics.scores import COMBINED

    tests = result.validation_tests
    if tests:
        print(f"validation, {tests['n']} examples; against the {tests['against']}: difference [95% CI] "
              f"({tests['interval']}, {tests['resamples']} resamples); p for the mean of BLEU and ROUGE-L "
              f"({tests['test']}); detectable: its smallest difference found with 80% power{_margin(tests)}")
    header = "   b  mean p(truth)    BLEU  ROUGE-L    chrF"
    if tests:
        header += (f"  {'BLEU vs full':>22}  {'ROUGE-L vs full':>22}  {'mean vs full':>22}       p  detectable"
                   "  candidate because")
    print(header)
    for row in result.candidates:
        generated = row.get("bleu") is not None
        if not (generated or abs(row["boundary"] - result.boundary) <= 2):  # the curve's points around b
            continue
        prob = f"{row['mean_prob']:13.4f}" if row.get("mean_prob") is not None else f"{'-':>13}"
        scores = "".join(f"{row[m]:>8.2f}" if row.get(m) is not None else f"{'-':>8}"
                         for m in ("bleu", "rougeL", "chrf"))
        line = f"{row['boundary']:4d}  {prob}{scores}"
        if generated:
            vs = row.get("vs_full") or {}
            p = vs.get(COMBINED, {}).get("p_value")
            line += "".join(f"  {_interval(vs.get(m))}" for m in ("bleu", "rougeL", COMBINED))
            line += f"  {p:6.3f}" if p is not None else f"  {'':>6}"
            mdd = vs.get(COMBINED, {}).get("mdd")
            line += f"  {mdd:10.2f}" if mdd is not None else f"  {'':>10}"
            line += "  " + ", ".join(row.get("why") or [])
        print(line.rstrip())


def _print_truncation(curves: dict) -> None:
    if "truncation" not in curves:
        return
    t = curves["truncation"]
    print("   b  mean p(truth)    NLL   accuracy")
    for b, p, nll, acc in zip(t["boundary"], t["mean_prob"], t["nll"], t["accuracy"]):
        print(f"{b:4d}  {p:12.4f}  {nll:6.3f}  {acc:8.3f}")
    if only := t.get("layers_only_baseline"):
        parts = ", ".join(only["parts_on"])
        print(f"b = -1 is the base model without any adapter; LoRA off on every layer with {parts} on: "
              f"mean p {only['mean_prob']:.4f}, NLL {only['nll']:.3f}, accuracy {only['accuracy']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
