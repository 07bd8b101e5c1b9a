"""Benchmark: the paired bootstrap from summed statistics against recomputing corpus BLEU per resample.

    python bench/bootstrap.py [--examples 200] [--resamples 1000]

Both take the same resamples (the same seed); the plain way calls sacrebleu's corpus_score on every resampled
corpus of both systems. They must give the same differences. Prints both times and their ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sacrebleu.metrics import BLEU

from lorabound.metrics.scores import paired_test
from lorabound.metrics.stats import resample_counts


def plain_diffs(a, b, refs, n_resamples: int, seed: int) -> np.ndarray:
    counts = resample_counts(len(a), n_resamples, seed)
    bleu, diffs = BLEU(), []
    for row in counts:
        idx = np.repeat(np.arange(len(a)), row)
        streams = [[refs[i][0] for i in idx]]
        diffs.append(bleu.corpus_score([a[i] for i in idx], streams).score
                     - bleu.corpus_score([b[i] for i in idx], streams).score)
    return np.asarray(diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    words = "the a cat dog sat ran on in mat road fish noon rain car team won".split()
    refs = [[" ".join(rng.choice(words, 12))] for _ in range(args.examples)]
    a = [" ".join(rng.choice(words, 11)) for _ in range(args.examples)]
    b = [" ".join(rng.choice(words, 13)) for _ in range(args.examples)]

    start = time.perf_counter()
    fast = paired_test(a, b, refs, metric="bleu", n_resamples=args.resamples, seed=0)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    plain = plain_diffs(a, b, refs, args.resamples, seed=0)
    plain_s = time.perf_counter() - start

    assert np.isclose(plain.mean(), fast["mean_diff"]), (plain.mean(), fast["mean_diff"])
    print(f"{args.examples} examples, {args.resamples} resamples, BLEU")
    print(f"paired_test (summed statistics)   : {fast_s:8.2f} s")
    print(f"corpus_score per resample:            {plain_s:8.2f} s")
    print(f"ratio: {plain_s / fast_s:.1f}x faster (same mean difference {fast['mean_diff']:.4f})")


if __name__ == "__main__":
    main()
