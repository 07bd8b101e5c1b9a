"""The JSON documents lorabound writes, as typed dicts: search.json, the evaluation table (evaluation.json and
the rows of report.json), report.json and study.json.

Each document is also described by a JSON Schema (draft 2020-12) shipped with the package:
``lorabound/schemas/report.schema.json``, ``study.schema.json`` and ``search.schema.json`` (see
:func:`schema`). Every object definition there (``$defs``) has a typed dict of the same name here with the same
keys, the same of them required; tests/test_schema.py keeps the two in step.

A key that is always written is a required key of its typed dict even when its value may be null; a key written
only in some cases (a selection search, a chosen selection, a transfer task) is optional. Scores (BLEU, chrF,
ROUGE) are on a 0-100 scale, and so are their differences ("points"); probabilities are 0-1; NLL is in nats per
target token; times are wall seconds; sizes on disk are in MB (10^6 bytes). A standard error or a detectable
difference that cannot be sized (fewer than 2 examples) is written as Infinity.

This module sits below every other one: it imports nothing from lorabound.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, TypedDict

SCHEMAS = {"report": "report.schema.json", "study": "study.schema.json", "search": "search.schema.json"}


def schema(name: str) -> dict:
    """The JSON Schema of a document: "report", "study" or "search" (read from the installed package)."""
    if name not in SCHEMAS:
        raise ValueError(f"no schema named {name!r}; the schemas are {', '.join(SCHEMAS)}")
    text = resources.files("lorabound").joinpath("schemas").joinpath(SCHEMAS[name]).read_text(encoding="utf-8")
    return json.loads(text)


# --------------------------------------------------------------------------------------------
# Paired comparisons (stats.compare and what the documents keep of it)
# --------------------------------------------------------------------------------------------

class Comparison(TypedDict):
    """System A against system B on the same examples, one metric (stats.compare)."""
    metric: str  # "bleu", "rougeL" or "bleu+rougeL" (the mean of the two)
    a_score: float  # A's corpus score, points
    b_score: float  # B's corpus score, points
    diff: float  # a_score - b_score, points
    mean_diff: float  # the paired bootstrap's mean difference, points
    ci_low: float  # lower end of the 95% interval of diff, points (-Infinity when it cannot be sized)
    ci_high: float  # upper end of the 95% interval of diff, points
    interval: str  # how the interval was computed
    p_value: float  # two-sided p-value of the paired sign-flip permutation test
    test: str  # how the p-value was computed (exact or Monte Carlo, how many swaps)
    smallest_p: float  # the smallest p-value the test can give with n examples
    mdd: float  # minimal detectable difference at 80% power and the 5% level, points
    se: float  # standard error of diff, points
    effect: float  # the difference that matters (the paper's gain), points
    n_for_effect: int | None  # examples that would detect `effect` with 80% power; None: outputs never differ
    n: int  # paired examples
    differing: int  # examples whose outputs differ between A and B
    n_resamples: int  # bootstrap resamples
    seed: int  # bootstrap seed


class SignificanceRow(Comparison):
    """A row of the report's significance list: a variant (a) against the full adapter (b) on test."""
    a: str  # variant name (A)
    b: str  # variant name (B): the full adapter
    sentence: str  # the comparison in plain words


class TestSummary(TypedDict):
    """What search.json keeps of a validation comparison with the full adapter (boundary.test_summary)."""
    diff: float  # candidate - full adapter, points
    ci_low: float  # 95% interval, lower end, points
    ci_high: float  # 95% interval, upper end, points
    p_value: float  # sign-flip test, two-sided
    smallest_p: float  # the smallest p-value reachable with n examples
    mdd: float  # minimal detectable difference (80% power), points
    se: float  # standard error of diff, points
    effect: float  # the difference that matters, points
    n_for_effect: int | None  # examples that would detect `effect` with 80% power
    n: int  # validation examples
    differing: int  # examples whose outputs differ from the full adapter's


# "bleu+rougeL" is no identifier: the functional form.
VsFull = TypedDict("VsFull", {"bleu": TestSummary, "rougeL": TestSummary, "bleu+rougeL": TestSummary})
VsFull.__doc__ = "A candidate against the full adapter on validation, per metric."

NiLowerEnd = TypedDict("NiLowerEnd", {"bleu": float, "rougeL": float, "bleu+rougeL": float})
NiLowerEnd.__doc__ = "The guarded lower ends of the 95% intervals used for non-inferiority, points."


class PrefixTest(TypedDict):
    """The chosen selection against the prefix of the same size on validation, one metric."""
    chosen: float  # the chosen selection's score, points
    prefix: float  # the prefix's score, points
    diff: float  # chosen - prefix, points
    ci_low: float  # 95% interval, points
    ci_high: float
    p_value: float  # sign-flip test, two-sided
    mdd: float  # minimal detectable difference (80% power), points


# --------------------------------------------------------------------------------------------
# search.json (boundary.SearchResult.to_dict)
# --------------------------------------------------------------------------------------------

_CandidateScores = TypedDict("_CandidateScores", {
    "mean_prob": "float | None",  # mean ground-truth token probability on validation (teacher-forced), 0-1
    "why": "list[str]",  # why it is a candidate (knee fractions, local maximum, given, full adapter)
    "bleu": "float | None",  # validation BLEU, points; None where the criterion generated nothing
    "rougeL": "float | None",  # validation ROUGE-L F1, points
    "chrf": "float | None",  # validation chrF, points
    "bleu+rougeL": "float | None",  # the mean of BLEU and ROUGE-L, points
    "vs_full": "VsFull | None",  # tests against the full adapter; None for the full adapter itself
})


class Candidate(_CandidateScores, total=False):
    """A candidate row of search.json: a boundary b, or (per-module, greedy-drop) a selection."""
    boundary: int  # LoRA kept on layers 0..b (-1: the base model); boundary searches only
    selection: dict[str, list[int]] | None  # the kept LoRA, {group or "*": layers}; None: the full adapter
    describe: str  # the selection in words
    lora_params_kept: int  # LoRA parameters the selection keeps
    attention_boundary: int  # per-module: attention LoRA kept on layers 0..Ba
    mlp_boundary: int  # per-module: MLP LoRA kept on layers 0..Bm
    kept_layers: list[int]  # greedy-drop: the layers whose LoRA is kept
    non_inferior: bool | None  # --goal size: shown non-inferior; None: not tested (the sequence stopped)
    ni_lower_end: NiLowerEnd  # --goal size: the lower ends that decided it


class _ValidationTestsRequired(TypedDict):
    against: str  # what each candidate was compared with
    metrics: list[str]  # the compared metrics
    n: int  # validation examples
    resamples: int  # bootstrap resamples
    seed: int  # bootstrap seed
    level: float  # significance level (two-sided)
    test: str  # the test, in words
    interval: str  # the interval, in words
    power: str  # what mdd and n_for_effect mean
    bleu_signature: str  # sacrebleu's BLEU signature
    rouge_signature: str  # how ROUGE was computed


class ValidationTests(_ValidationTestsRequired, total=False):
    """How the candidates were compared with the full adapter on validation."""
    margin: float  # --goal size: the non-inferiority margin, points
    rule: str  # --goal size: the decision rule, in words


class ComparedPrefix(TypedDict):
    """per-module / greedy-drop: the prefix of the same size as the chosen selection."""
    boundary: int  # the prefix's b (LoRA on layers 0..b)
    selection: dict[str, list[int]] | None  # the prefix as a selection
    describe: str  # the prefix in words
    lora_params_kept: int  # LoRA parameters the prefix keeps
    tests: str | dict[str, PrefixTest]  # per metric on validation; a sentence when the chosen one is the prefix
    how: str  # how the prefix was picked
    optimistic: str  # why the validation comparison is no evidence


class GreedyStep(TypedDict):
    """One step of the greedy removal path."""
    removed: int | None  # the layer whose LoRA this step removed; None: the starting point
    kept: list[int]  # layers whose LoRA is kept after it
    params_kept: int  # LoRA parameters kept
    mean_prob: float  # mean ground-truth token probability on validation, 0-1
    nll: float  # mean NLL, nats per target token
    accuracy: float  # top-1 accuracy on the target tokens, 0-1


class GreedyPath(TypedDict):
    """greedy-drop: the removal path (greedy.greedy_path)."""
    what: str  # the procedure, in words
    steps: list[GreedyStep]
    layer_passes_per_batch: float  # decoder-layer forward passes per batch, the search's cost
    num_layers: int  # layers of the model
    params_total: int  # the adapter's LoRA parameters in its layers


class SearchDocument(TypedDict):
    """search.json: the chosen boundary (or selection) and the scored candidates (boundary.SearchResult.to_dict)."""
    criterion: str  # the search's criterion ("boundary" when b was given with --boundary)
    boundary: int | None  # the chosen b; None: the chosen selection is no prefix
    num_layers: int  # layers of the model
    reason: str  # why this b (or selection), in words
    candidates: list[Candidate]
    lora_params_kept: int  # LoRA parameters the choice keeps
    lora_params_total: int  # LoRA parameters of the full adapter
    goal: str | None  # "quality" or "size" for the criteria that decide by goal, else None
    validation_tests: ValidationTests | None  # None where no candidate was generated (knee, max-likelihood, given b)
    selection: dict[str, list[int]] | None  # per-module / greedy-drop: the chosen selection; None: all (or a b)
    selection_text: str | None  # the chosen selection in words
    compared_prefix: ComparedPrefix | None  # per-module / greedy-drop: the prefix of the same size
    greedy_path: GreedyPath | None  # greedy-drop: the removal path
    kept_fraction: float  # lora_params_kept / lora_params_total, 0-1


# --------------------------------------------------------------------------------------------
# The evaluation table (evaluation_table.evaluate_variants; evaluation.json, and part of report.json)
# --------------------------------------------------------------------------------------------

class Metrics(TypedDict):
    """Test-split corpus scores of one variant, points (0-100)."""
    bleu: float  # sacrebleu corpus BLEU
    rouge1: float  # mean best-reference ROUGE-1 F1
    rouge2: float  # mean best-reference ROUGE-2 F1
    rougeL: float  # mean best-reference ROUGE-L F1
    chrf: float  # sacrebleu corpus chrF


class _VariantRowRequired(TypedDict):
    name: str  # "base model", "full adapter", "pruned (b=N)", a selection's description, or an adapter folder
    boundary: int | None  # LoRA kept on layers 0..b (-1: the base model); None: the full adapter or no prefix
    origin: str  # why the row is in the table ("chosen by the search (auto)", "for comparison: ...")
    lora_params: int  # LoRA parameters the variant keeps
    adapter_mb: float | None  # the adapter's size on disk, MB; None for the base model
    adapter_mb_source: str | None  # "file" (measured), "export" (exact size of an export), "estimate"
    metrics: Metrics
    hypotheses_file: str  # the variant's outputs (JSONL), relative to the run folder


class VariantRow(_VariantRowRequired, total=False):
    """One row of the evaluation table."""
    selection: dict[str, list[int]] | None  # the kept LoRA of the loaded adapter; None: all of it
    description: str  # that selection in words
    exported_to: str  # the folder of the exported pruned adapter


class Example(TypedDict):
    """One test example with every variant's output."""
    input: str  # the example's input (before the prompt template)
    references: list[str]  # its references
    outputs: dict[str, str]  # variant name -> generated text


class SelectionMetrics(TypedDict):
    """Test-split scores of a chosen selection, points."""
    bleu: float
    rougeL: float
    chrf: float


class _SelectionTestRequired(TypedDict):
    selection: dict[str, list[int]] | None  # the chosen selection
    describe: str  # it in words
    metrics: SelectionMetrics
    against: dict[str, dict[str, Comparison]]  # "full adapter" / "prefix ..." -> metric -> comparison on test


class SelectionTest(_SelectionTestRequired, total=False):
    """A chosen selection that is no prefix, on test (evaluation_table.selection_on_test)."""
    exported_to: str  # the folder of its exported adapter


class _EvaluationRequired(TypedDict):
    variants: list[VariantRow]
    significance: list[SignificanceRow]  # every row but the full adapter against the full adapter, BLEU, ROUGE-L
    examples: list[Example]  # the first few test examples
    bleu_signature: str  # sacrebleu's BLEU signature
    rouge_signature: str  # how ROUGE was computed
    lora_params_total: int  # LoRA parameters of the full adapter


class Evaluation(_EvaluationRequired, total=False):
    """evaluation.json, and the evaluation part of report.json."""
    selection_test: SelectionTest  # run with a chosen selection that is no prefix


# --------------------------------------------------------------------------------------------
# report.json (pipeline.run)
# --------------------------------------------------------------------------------------------

class Sizes(TypedDict):
    """Examples per split."""
    train: int
    validation: int
    test: int


class ReportMeta(TypedDict):
    """What the run was."""
    model: str  # model spec
    adapter: str  # adapter folder
    task: str  # task name
    sizes: Sizes
    seed: int  # split and bootstrap seed
    lorabound_version: str
    created: str  # ISO 8601 time, UTC
    max_new_tokens: int  # generation limit, tokens
    num_layers: int  # layers of the model
    torch_threads: int  # CPU threads torch used


class Report(Evaluation):
    """report.json: every figure of a run."""
    meta: ReportMeta
    curves: dict[str, Any]  # curves.json: meta, truncation and the other curves computed (analysis.analyze)
    search: SearchDocument  # search.json
    verdict: str  # plain sentences on what the choice does on test
    notes: list[str]  # caveats (cut or skipped examples, the export)
    stage_seconds: dict[str, float]  # stage -> wall seconds in the invocation that finished the run


# --------------------------------------------------------------------------------------------
# study.json (studies.pooling.build_summary)
# --------------------------------------------------------------------------------------------

class _CellTestRequired(TypedDict):
    diff: float  # pruned - full adapter on test, points
    ci_low: float  # 95% interval, points
    ci_high: float
    p_value: float  # sign-flip test, two-sided
    a_score: float | None  # pruned's score, points
    b_score: float | None  # the full adapter's score, points
    source: str  # "report", "computed from the saved hypotheses" or "nothing dropped"


class CellTest(_CellTestRequired, total=False):
    """One metric's test of a cell's pruned variant against the full adapter."""
    mdd: float | None  # minimal detectable difference (80% power), points


class CellMetrics(TypedDict):
    """Test scores of the base model, the full adapter and the pruned variant (Metrics, or a selection's)."""
    base: dict[str, float]
    full: dict[str, float]
    pruned: dict[str, float]


class _CellComparisonRequired(TypedDict):
    boundary: int | None  # the chosen b; None: a chosen selection
    pruned_name: str | None  # the pruned variant's row name (or the selection's description)
    share_dropped: float | None  # share of the LoRA parameters dropped, 0-1
    metrics: CellMetrics
    tests: dict[str, CellTest]  # "bleu", "rougeL" -> test


class CellComparison(_CellComparisonRequired, total=False):
    """A cell's pruned variant against the full adapter on test (studies.pooling.compare_with_full)."""
    selection: str | None  # a chosen selection, in words
    test_set: str  # "TASK|seed S": cells with the same one share test examples


class _CellTransferRequired(TypedDict):
    task: str  # the transfer task


class CellTransfer(_CellTransferRequired, total=False):
    """The in-domain b on the transfer task's test split: a CellComparison's keys when one could be made."""
    boundary: int | None
    selection: str | None
    pruned_name: str | None
    share_dropped: float | None
    metrics: CellMetrics
    tests: dict[str, CellTest]


class TrainingRun(TypedDict):
    """From the adapter's lorabound_train.json (training.TrainResult)."""
    steps: int | None  # optimiser steps
    train_pairs: int | None  # training pairs
    train_loss_first: float | None  # training loss, nats per token
    train_loss_last: float | None
    validation_loss_before: float | None  # validation loss before / after training, nats per token
    validation_loss_after: float | None


class CellTruncation(TypedDict):
    """The cell's truncation curve."""
    boundary: list[int] | None  # b values (-1: the base model)
    mean_prob: list[float | None] | None  # mean ground-truth probability at each, 0-1


class CellRules(TypedDict):
    """What each decision rule picks from the cell's candidates, tested (None: not computable)."""
    plain: CellComparison | None
    quality: CellComparison | None
    size: CellComparison | None


class _CellRowRequired(TypedDict):
    id: str  # the cell's folder name
    model: str  # model spec
    task: str  # task
    training: dict[str, Any]  # the training setting (studies.grid.Training)
    seed: int
    status: str  # "ok" or "failed"
    reason: str | None  # why it failed
    seconds: dict[str, float]  # stage -> wall seconds


class CellRow(_CellRowRequired, total=False):
    """One cell of the study (studies.pooling.summarise_cell); the optional keys only for finished cells."""
    num_layers: int
    boundary: int | None  # the chosen b
    criterion: str | None
    truncation: CellTruncation
    in_domain: CellComparison | None
    rules: CellRules
    test_curve: list[CurvePoint]  # every pruned boundary evaluated on test
    training_run: TrainingRun  # when lorabound trained the adapter
    transfer: CellTransfer  # when the grid has a transfer task


class CurvePoint(TypedDict):
    """One pruned boundary of a cell on test (studies.pooling.curve_on_test)."""
    boundary: int  # LoRA kept on layers 0..boundary
    share_kept: float  # share of the adapter's LoRA parameters kept, 0-1
    diff: dict[str, float]  # metric -> test score minus the full adapter's, points
    ci: dict[str, list[float]]  # metric -> [low, high] of that difference's 95% interval, points


class CurveInterval(TypedDict):
    """A pooled mean difference with its interval over independent test sets (studies.pooling.pooled_interval)."""
    n: int  # cells
    test_sets: int  # independent test sets among them
    mean_diff: float  # mean difference over cells, points
    ci_low: float | None  # 95% interval over test sets, points; None: fewer than 3 test sets
    ci_high: float | None
    se: float | None  # standard error of mean_diff, points
    mdd: float | None  # detectable mean difference (80% power), points
    test_sets_for_effect: int | None  # independent test sets that would detect the paper's gain (80% power)
    claim: str | None  # None on the curve (no claim is judged per band)


class _CurveBandRequired(TypedDict):
    share_kept: list[float]  # [low, high): the band of the share of LoRA parameters kept
    cells: int  # cells with a boundary in the band
    boundaries: list[int]  # the boundaries that fell in it, over all cells


class CurveBand(_CurveBandRequired, total=False):
    """One band of the pooled test-side curve (studies.pooling.pool_curve_on_test)."""
    bleu: CurveInterval | None
    rougeL: CurveInterval | None


class PooledMetric(TypedDict):
    """One metric pooled over cells: pruned - full adapter."""
    n: int  # cells with this test
    test_sets: int  # independent test sets among them
    mean_diff: float  # mean difference over cells, points
    ci_low: float | None  # 95% interval over test sets (mean +- t x se), points; None: fewer than 3 test sets
    ci_high: float | None
    se: float | None  # standard error of mean_diff (bootstrap over test sets, rescaled), points
    mdd: float | None  # detectable mean difference (80% power), points
    test_sets_for_effect: int | None  # independent test sets that would detect the paper's gain (80% power)
    claim: str | None  # the paper's claim judged by the interval
    better: int  # cells significantly better after Holm's correction
    worse: int  # cells significantly worse
    not_different: int  # the rest
    holm_family: int  # cells where something was dropped (the Holm family)
    holm_adjusted_p: list[float]  # Holm-adjusted p-values of that family


class _PooledRequired(TypedDict):
    n_cells: int  # finished cells pooled
    share_dropped: float | None  # mean share of LoRA parameters dropped, 0-1


class Pooled(_PooledRequired, total=False):
    """Pooled across cells (studies.pooling.pool); a metric is present when some cell tested it."""
    bleu: PooledMetric
    rougeL: PooledMetric
    chrf: PooledMetric


class RuleSummary(TypedDict):
    """One decision rule pooled over cells."""
    rule: str  # the rule, in words
    pooled: Pooled
    comparison: str  # against the paper's claims, in words


class PaperComparison(TypedDict):
    """The paper's averages (arXiv 2503.23360) and the pooled result beside them."""
    params_dropped: float  # share of LoRA parameters the paper drops, 0-1
    bleu: float  # its BLEU gain, points
    rougeL: float  # its ROUGE-L gain, points
    comparison: str  # the pooled result against them, in words


class StudyTransfer(TypedDict):
    """The transfer task's pooled result."""
    task: str
    pooled: Pooled


class Timing(TypedDict):
    """Where the study's time went."""
    seconds: float | None  # wall seconds of the study call
    stages_seconds: dict[str, float]  # stage -> seconds summed over cells
    stage_shares: dict[str, float]  # stage -> share of the measured time, 0-1
    note: str  # what the times measure


class FailedCell(TypedDict):
    id: str  # the cell
    reason: str | None  # why it failed


class StudyRules(TypedDict):
    """Each decision rule pooled over cells."""
    plain: RuleSummary
    quality: RuleSummary
    size: RuleSummary


class StudySummary(TypedDict):
    """study.json: the grid, every cell, and the pooled results."""
    grid: dict[str, Any]  # the grid (studies.grid.Grid)
    cells: list[CellRow]
    failed: list[FailedCell]
    pooled: Pooled  # the chosen b of each cell against the full adapter
    test_curve: list[CurveBand]  # every evaluated boundary of every cell, pooled by share of LoRA kept
    rules: StudyRules
    paper: PaperComparison
    transfer: StudyTransfer | None  # None: the grid has no transfer task
    timing: Timing
