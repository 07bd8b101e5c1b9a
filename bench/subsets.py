"""Experiment: does a search decide differently on fewer validation examples? Reads one `lorabound search --out`
folder (its search.json and saved validation outputs), then reruns the decision on random subsets of the
validation examples, with no new generation.

    python bench/subsets.py SEARCH_OUT [--sizes 8 16] [--draws 200] [--goal size] [--tolerance 2]

For each size it prints how often the search drops layers, the mean number of layers dropped, and how often it
picks a b that all the examples show to be significantly worse than the full adapter (p < 0.05 on the mean of
BLEU and ROUGE-L). A decision rule that rewards small validation sets drops more on the smaller subsets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lorabound.decision.boundary import COMPARED, pick_for_goal
from lorabound.metrics.scores import paired_statistics
from lorabound.runtime.files import read_jsonl
from lorabound.metrics.stats import COMBINED, PARTS, compare


def saved_outputs(folder: Path, search: dict) -> tuple[dict[int, list[str]], list[list[str]]]:
    """Validation outputs per generated candidate b, read from the folder's generations (named as
    generation_cache names them: validation-pruned-b-B-KEY.jsonl, validation-full-adapter-KEY.jsonl)."""
    texts, references = {}, None
    for candidate in search["candidates"]:
        if candidate.get("bleu") is None:
            continue
        b = candidate["boundary"]
        stem = "validation-full-adapter-" if candidate.get("vs_full") is None else f"validation-pruned-b-{b}-"
        files = sorted((folder / "generations").glob(stem + "*.jsonl"))
        if len(files) != 1:
            raise SystemExit(f"expected one {stem}*.jsonl in {folder / 'generations'}, found {len(files)}")
        rows = read_jsonl(files[0], "rerun the search to write it again")
        texts[b] = [r["output"] for r in rows]
        references = [r["references"] for r in rows]
    return texts, references


def decide(texts: dict[int, list[str]], references: list[list[str]], rows, full: int, goal: str, margin: float):
    scored = {}
    for b, outputs in texts.items():
        sub_refs = [references[i] for i in rows]
        scored[b] = {m: 0.0 for m in COMPARED}
        if b == full:
            scored[b]["vs_full"] = None
            continue
        paired = paired_statistics([outputs[i] for i in rows], [texts[full][i] for i in rows], sub_refs,
                                   sorted({p for m in COMPARED for p in PARTS[m]}))
        tests = {m: compare(paired, m, resamples=500, seed=0) for m in COMPARED}
        scored[b] = {m: tests[m]["a_score"] for m in COMPARED} | {"vs_full": tests}
    scored[full].update({m: next(t for s in scored.values() if s["vs_full"] for t in [s["vs_full"][m]])["b_score"]
                         for m in COMPARED})
    return pick_for_goal(scored, goal, margin, full)[0], scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--goal", default="size", choices=["size", "quality"])
    parser.add_argument("--tolerance", type=float, default=2.0)
    args = parser.parse_args()

    search = json.loads((args.folder / "search.json").read_text())
    texts, references = saved_outputs(args.folder, search)
    full = next(c["boundary"] for c in search["candidates"] if c.get("bleu") is not None and c.get("vs_full") is None)
    n = len(references)
    chosen_all, scored_all = decide(texts, references, np.arange(n), full, args.goal, args.tolerance)
    worse = {b for b, s in scored_all.items() if s["vs_full"] and s["vs_full"][COMBINED]["p_value"] < 0.05
             and s["vs_full"][COMBINED]["diff"] < 0}
    print(f"{args.folder}: {n} validation examples, candidates {sorted(texts)}, full adapter b = {full}")
    print(f"all {n}: chooses b = {chosen_all}; significantly worse than the full adapter on all {n}: {sorted(worse)}")
    rng = np.random.default_rng(0)
    for size in args.sizes:
        picks = [decide(texts, references, rng.choice(n, size, replace=False), full, args.goal, args.tolerance)[0]
                 for _ in range(args.draws)]
        dropped = [full - b for b in picks]
        print(f"{size:3d} examples, {args.draws} random subsets: drops layers in {np.mean([d > 0 for d in dropped]):.1%}, "
              f"mean layers dropped {np.mean(dropped):.2f} (all {n}: {full - chosen_all}), picks a b worse on all "
              f"{n} in {np.mean([b in worse for b in picks]):.1%}; picks: "
              + ", ".join(f"b={b}: {picks.count(b)}" for b in sorted(set(picks))))


if __name__ == "__main__":
    main()
