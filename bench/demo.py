"""Benchmark: `lorabound demo` (default sizes) now against version 0.1.0's demo, side by side on one machine.

    python bench/demo.py [--baseline 457a6eb] [--baseline-seconds 439] [--skip-baseline SECONDS]

Issue 11 asks for the demo in at most 5 minutes on the machine it was measured on, where 0.1.0's demo took
7 min 19 s (439 s). Machines of this kind differ (that one's fp32 GEMM ran 3.5 times as fast as another's), so
an absolute time from another machine says little; the ratio of the two demos run here, one after the other,
does. This script checks the baseline commit out of this repository's history (git worktree, removed after),
runs its demo with its stage functions timed, then the current `lorabound demo` (which prints its own stage
times), each in a fresh folder, and prints both, the ratio, and what that ratio makes of the baseline's
measured time on the issue's machine: an estimate, labelled so. Both demos share LORABOUND_CACHE (the
converted model and the extracted data), so neither pays the one-time conversion. Run it on an idle machine:
it takes about 35 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs inside a child process with the baseline's src first on sys.path: its demo, stage functions timed.
BASELINE_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from lorabound import pipeline
seconds = {}
def timed(name, stage):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return stage(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    return wrapper
for function, name in (("train", "train"), ("_analyze", "analysis"), ("_search", "search"), ("_evaluate", "evaluate")):
    setattr(pipeline, function, timed(name, getattr(pipeline, function)))
pipeline.demo(sys.argv[2], progress=False)
print("STAGES " + json.dumps(seconds))
"""


def test_metrics(demo_folder: Path) -> dict:
    """{row name: (BLEU, ROUGE-L, chrF)} of a demo's report."""
    report = json.loads((demo_folder / "run" / "report.json").read_text())
    return {row["name"]: tuple(row["metrics"][k] for k in ("bleu", "rougeL", "chrf")) for row in report["variants"]}


def run_baseline(commit: str, scratch: Path) -> tuple[float, dict]:
    tree = scratch / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True,
                   capture_output=True)
    try:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", BASELINE_CHILD, str(tree / "src"), str(scratch / "demo-baseline")],
                              check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("STAGES "))
    return wall, json.loads(line[len("STAGES "):])


def run_current(scratch: Path) -> tuple[float, dict]:
    out = scratch / "demo-current"
    lorabound = Path(sys.executable).with_name("lorabound")
    start = time.perf_counter()
    subprocess.run([str(lorabound), "demo", "--quiet", "--out", str(out)], check=True, capture_output=True)
    wall = time.perf_counter() - start
    stages = json.loads((out / "run" / "report.json").read_text())["stage_seconds"]
    return wall, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="457a6eb", help="commit of the baseline (default: 0.1.0)")
    parser.add_argument("--baseline-seconds", type=float, default=439.0,
                        help="the baseline's demo wall time measured on the target machine (issue 11: 7 min 19 s)")
    parser.add_argument("--skip-baseline", type=float, metavar="SECONDS",
                        help="reuse a baseline wall time measured here before instead of running it again")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if args.skip_baseline:
            base_wall, base_stages, base_metrics = args.skip_baseline, {}, None
        else:
            base_wall, base_stages = run_baseline(args.baseline, scratch)
            base_metrics = test_metrics(scratch / "demo-baseline")
        now_wall, now_stages = run_current(scratch)
        now_metrics = test_metrics(scratch / "demo-current")

    def show(label: str, wall: float, stages: dict) -> None:
        parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stages.items())
        print(f"{label:<22} {wall:7.1f} s wall" + (f"  ({parts})" if parts else " (given)"))

    show(f"baseline {args.baseline}", base_wall, base_stages)
    show("current", now_wall, now_stages)
    for name, values in now_metrics.items():
        print(f"  {name:<16} BLEU {values[0]:6.2f}  ROUGE-L {values[1]:6.2f}  chrF {values[2]:6.2f}")
    if base_metrics is not None:
        same = base_metrics == now_metrics
        print("test metrics of every row: " + ("identical to the baseline's" if same else
                                              f"DIFFERENT from the baseline's {base_metrics}"))
    ratio = now_wall / base_wall
    print(f"ratio current / baseline: {ratio:.3f}")
    print(f"estimate on the machine where the baseline took {args.baseline_seconds:.0f} s: "
          f"{ratio * args.baseline_seconds:.0f} s (the ratio measured here times that time; not a measurement there)")


if __name__ == "__main__":
    main()
