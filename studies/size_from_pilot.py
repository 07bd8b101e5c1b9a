"""Size a study from a pilot: the test examples a pooled comparison needs to detect a given difference.

    python studies/size_from_pilot.py studies/paper-2026-11-28 [--bleu 1.4] [--rougeL 0.9]

Reads every cell's report.json (pruned minus full adapter on test: the interval and its number of examples),
turns each interval's half-width into a per-example spread (half-width / 1.96 x sqrt(n)), takes the median per
task and metric, and prints the test examples that detect the effect with 80% power at the 5% level when pooled
(2.8 x spread / effect, squared). Spread between test sets and cells is not counted: plan above the figure.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pilot", type=Path)
    parser.add_argument("--bleu", type=float, default=1.4, help="the BLEU difference to detect (the paper's gain)")
    parser.add_argument("--rougeL", type=float, default=0.9, help="the ROUGE-L difference to detect")
    args = parser.parse_args()
    effects = {"bleu": args.bleu, "rougeL": args.rougeL}
    spreads = defaultdict(list)
    for report_file in sorted(args.pilot.glob("cells/*/report.json")):
        report = json.loads(report_file.read_text())
        cell = json.loads((report_file.parent / "cell.json").read_text())
        task = cell.get("cell", cell)["task"]
        for test in report.get("significance") or []:
            if test.get("b") == "full adapter" and test.get("a") != "base model" and test["metric"] in effects:
                half = (test["ci_high"] - test["ci_low"]) / 2 / 1.96
                spreads[(task, test["metric"])].append(half * math.sqrt(test["n"]))
    print(f"{'task':10} {'metric':7} {'cells':>5} {'spread/example':>15} {'effect':>7} {'test examples':>14}")
    for (task, metric), values in sorted(spreads.items()):
        spread = float(np.median(values))
        needed = math.ceil((2.8 * spread / effects[metric]) ** 2)
        print(f"{task:10} {metric:7} {len(values):5d} {spread:15.1f} {effects[metric]:7.2f} {needed:14,d}")


if __name__ == "__main__":
    main()
