"""Generation and metrics: greedy decoding, BLEU / chrF / ROUGE, and a paired bootstrap test.

Read top to bottom:

1. :func:`generate` decodes greedily in left-padded batches, stopping each row at its first newline;
2. :func:`score` computes corpus BLEU and chrF (sacrebleu) and ROUGE-1/2/L (rouge-score) against every
   reference of each example;
3. :func:`paired_bootstrap` tests whether two systems differ, resampling examples; corpus BLEU and chrF are
   recomputed from per-sentence sufficient statistics, so 1,000 resamples take a fraction of a second;
4. :func:`describe_significance` says the result in one plain sentence.

All metric values are on a 0-100 scale.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from .errors import LoraboundError

METRICS = ("bleu", "chrf", "rougeL")
METRIC_LABELS = {"bleu": "BLEU", "chrf": "chrF", "rougeL": "ROUGE-L", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2"}


# --------------------------------------------------------------------------------------------
# 1. Generation
# --------------------------------------------------------------------------------------------

@dataclass
class GenerationResult:
    texts: list[str]          # one output per prompt, in the prompts' order
    n_prompt_truncated: int   # prompts cut from the left to max_prompt_length tokens


def _newline_criteria(tokenizer, prompt_length: int):
    """A StoppingCriteria that marks a row done once its answer line (the first non-blank one) has ended."""
    import torch
    from transformers import StoppingCriteria

    class StopAtNewline(StoppingCriteria):
        def __init__(self):
            self.done = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.done is None:
                self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            rows = (~self.done).nonzero().flatten().tolist()
            if rows:
                texts = tokenizer.batch_decode(input_ids[rows, prompt_length:], skip_special_tokens=True)
                for row, text in zip(rows, texts):
                    if "\n" in text.lstrip():  # leading blank lines are not the answer line yet
                        self.done[row] = True
            return self.done.clone()

    return StopAtNewline()


def _eos_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a sequence: the model's generation config and the tokenizer's EOS."""
    ids = []
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None) if config is not None else None
    for value in ([configured] if isinstance(configured, int) else list(configured or [])) + [tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


@contextlib.contextmanager
def _tokenizer_sides(tokenizer):
    """Left padding and left truncation while generating; the tokenizer's own settings come back afterwards."""
    padding, truncation = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = padding, truncation


def _clean(text: str, stop_at_newline: bool) -> str:
    if stop_at_newline:
        text = text.lstrip().split("\n", 1)[0]
    return text.strip()


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, batch_size: int = 16,
             stop_at_newline: bool = True, max_prompt_length: int | None = None,
             progress: bool | str = True) -> GenerationResult:
    """Greedy outputs for `prompts` (new text only, only the first non-blank line when `stop_at_newline`, stripped).

    Prompts are sorted by length into left-padded batches and the outputs put back in the prompts' order.
    Prompts longer than `max_prompt_length` tokens lose their beginning; they are counted in the result.
    `model` may be a plain causal LM or a peft PeftModel. `progress`: show a bar (a str labels it).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    prompts = list(prompts)
    if not prompts:
        return GenerationResult(texts=[], n_prompt_truncated=0)
    if batch_size < 1 or max_new_tokens < 1:
        raise LoraboundError(f"batch_size {batch_size} and max_new_tokens {max_new_tokens} must be at least 1; "
                             "pass positive numbers")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise LoraboundError(f"max_prompt_length {max_prompt_length} must be at least 1; pass a positive number "
                             "or None")
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    if pad_id is None:
        raise LoraboundError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token before "
                             "generating")

    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    n_truncated = sum(n > max_prompt_length for n in lengths) if max_prompt_length else 0
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    texts: list[str | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    was_training = model.training
    label = progress if isinstance(progress, str) else "generating"
    bar = tqdm(total=len(prompts), unit="ex", desc=label, disable=not progress)
    try:
        model.eval()
        with _tokenizer_sides(tokenizer), torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                enc = _encode_batch(tokenizer, [prompts[i] for i in chunk], max_prompt_length, pad_id)
                input_ids = enc["input_ids"].to(device)
                attention_mask = enc["attention_mask"].to(device)
                criteria = StoppingCriteriaList()
                if stop_at_newline:
                    criteria.append(_newline_criteria(tokenizer, input_ids.shape[1]))
                output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                        max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                        eos_token_id=eos_ids or None, stopping_criteria=criteria)
                new_tokens = output[:, input_ids.shape[1]:].tolist()
                for i, ids in zip(chunk, new_tokens):
                    ids = _until_eos(ids, eos_ids)
                    texts[i] = _clean(tokenizer.decode(ids, skip_special_tokens=True), stop_at_newline)
                bar.update(len(chunk))
    finally:
        bar.close()
        if was_training:
            model.train()
    return GenerationResult(texts=texts, n_prompt_truncated=n_truncated)


def _encode_batch(tokenizer, prompts: list[str], max_prompt_length: int | None, pad_id: int):
    """Left-padded (and, past max_prompt_length, left-truncated) tensors; works without a tokenizer pad token."""
    truncation = {"truncation": True, "max_length": max_prompt_length} if max_prompt_length else {}
    pad_token = tokenizer.pad_token
    if pad_token is None:
        tokenizer.pad_token_id = pad_id
    try:
        return tokenizer(prompts, padding=True, return_tensors="pt", **truncation)
    finally:
        if pad_token is None:
            tokenizer.pad_token = None


def _until_eos(ids: list[int], eos_ids: list[int]) -> list[int]:
    """The tokens before the first EOS: what follows is padding."""
    for k, token in enumerate(ids):
        if token in eos_ids:
            return ids[:k]
    return ids


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


def _sacrebleu_metric(metric: str):
    from sacrebleu.metrics import BLEU, CHRF

    if metric == "bleu":
        return BLEU()
    if metric == "chrf":
        return CHRF()
    raise LoraboundError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")


def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def _rouge_per_example(hypotheses: list[str], references: list[list[str]], scorer=None) -> dict[str, np.ndarray]:
    """Per example, the best F1 over its references (x100), for rouge1, rouge2 and rougeL."""
    scorer = scorer or _rouge_scorer()
    out = {key: np.zeros(len(hypotheses)) for key in ("rouge1", "rouge2", "rougeL")}
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        best = scorer.score_multi(refs, hyp)
        for key in out:
            out[key][i] = 100.0 * best[key].fmeasure
    return out


def score(hypotheses: list[str], references: list[list[str]]) -> dict:
    """Corpus BLEU and chrF (sacrebleu), mean best-reference ROUGE-1/2/L F1; every value 0-100.

    Every reference of each example counts; examples may have different numbers of references.
    Returns bleu, chrf, rouge1, rouge2, rougeL, bleu_signature, chrf_signature and n.
    """
    hypotheses, references = _check_pairs(hypotheses, references)
    streams = reference_streams(references)
    bleu, chrf = _sacrebleu_metric("bleu"), _sacrebleu_metric("chrf")
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
        "n": len(hypotheses),
    }


# --------------------------------------------------------------------------------------------
# 3. Paired bootstrap
# --------------------------------------------------------------------------------------------

def segment_stats(metric: str, hypotheses: list[str], references: list[list[str]]) -> np.ndarray:
    """Per-example sufficient statistics, shape (n, k): summed over examples they give the corpus score.

    bleu / chrf: sacrebleu's own per-segment statistics; rougeL: the example's best-reference F1 (k = 1).
    """
    hypotheses, references = _check_pairs(hypotheses, references)
    if metric == "rougeL":
        return _rouge_per_example(hypotheses, references)["rougeL"][:, None]
    scorer = _sacrebleu_metric(metric)
    stats = scorer._extract_corpus_statistics(hypotheses, reference_streams(references))
    return np.asarray(stats, dtype=np.int64)


def score_from_stats(metric: str, summed: np.ndarray, n: int) -> float:
    """The corpus score from statistics summed over `n` examples (sacrebleu's own formula for bleu / chrf)."""
    if metric == "rougeL":
        return float(summed[0] / n)
    return float(_sacrebleu_metric(metric)._compute_score_from_stats([int(x) for x in summed]).score)


def _scores_for_counts(metric: str, stats: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Corpus scores for many resamples at once; counts[r, i] = how often resample r drew example i."""
    summed = counts @ stats  # (R, k): the statistics of each resample, summed
    if metric == "rougeL":
        return summed[:, 0] / counts.shape[1]
    scorer = _sacrebleu_metric(metric)
    return np.array([scorer._compute_score_from_stats(row).score for row in summed.tolist()])


def paired_bootstrap(hyps_a: list[str], hyps_b: list[str], references: list[list[str]], *, metric: str = "bleu",
                     n_resamples: int = 1000, seed: int = 0) -> dict:
    """Paired bootstrap test of system A against system B on `metric` ("bleu", "rougeL" or "chrf").

    Each resample draws n example indices with replacement (numpy ``default_rng(seed)``), the same indices for
    both systems, and recomputes each system's corpus score (BLEU / chrF from summed sacrebleu statistics,
    ROUGE-L as the mean of per-example scores). With d = score(A) - score(B) per resample:

    - mean_diff: the mean of d; ci_low / ci_high: its 2.5th and 97.5th percentiles (95% interval);
    - p_value, two-sided: ``min(1, 2 * (min(#{d <= 0}, #{d >= 0}) + 1) / (n_resamples + 1))``. The +1 keeps
      it honest: a bootstrap of R resamples cannot show p below about 2 / (R + 1), so it never reports 0.
      Identical systems give 1.

    Deterministic for a given seed.
    """
    if metric not in METRICS:
        raise LoraboundError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
    if len(hyps_a) != len(hyps_b):
        raise LoraboundError(f"system A has {len(hyps_a)} outputs and system B {len(hyps_b)}; "
                             "compare outputs for the same examples")
    if n_resamples < 1:
        raise LoraboundError(f"n_resamples {n_resamples} must be at least 1; 1000 is usual")
    stats_a = segment_stats(metric, hyps_a, references)
    stats_b = segment_stats(metric, hyps_b, references)
    n = stats_a.shape[0]

    rng = np.random.default_rng(seed)
    indices = rng.integers(0, n, size=(n_resamples, n))
    counts = np.zeros((n_resamples, n), dtype=np.int64)
    np.add.at(counts, (np.arange(n_resamples)[:, None], indices), 1)
    diffs = _scores_for_counts(metric, stats_a, counts) - _scores_for_counts(metric, stats_b, counts)

    tail = min(int((diffs <= 0).sum()), int((diffs >= 0).sum()))
    p_value = min(1.0, 2.0 * (tail + 1) / (n_resamples + 1))
    return {
        "metric": metric,
        "a_score": score_from_stats(metric, stats_a.sum(axis=0), n),
        "b_score": score_from_stats(metric, stats_b.sum(axis=0), n),
        "mean_diff": float(diffs.mean()),
        "ci_low": float(np.percentile(diffs, 2.5)),
        "ci_high": float(np.percentile(diffs, 97.5)),
        "p_value": float(p_value),
        "n_resamples": int(n_resamples),
        "seed": int(seed),
        "n": int(n),
    }


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


def describe_significance(result: dict, name_a: str, name_b: str, level: float = 0.05) -> str:
    """One plain sentence: how A scored against B, the 95% interval, and whether that is significant."""
    label = METRIC_LABELS.get(result["metric"], result["metric"])
    diff = result["a_score"] - result["b_score"]
    p = format_p(result["p_value"])
    ci = f"95% CI {_points(result['ci_low'])} to {_points(result['ci_high'])}"
    if diff == 0:
        head = f"{name_a} scores the same {label} as {name_b}"
    else:
        head = f"{name_a} scores {_points(abs(diff))} {label} {'higher' if diff > 0 else 'lower'} than {name_b}"
    if result["p_value"] < level and diff != 0:
        change = "gain" if diff > 0 else "drop"
        return f"{head} ({ci}, {p}): the {change} is statistically significant at the {level:.0%} level."
    return f"{head} ({ci}): the difference is not statistically significant ({p})."
