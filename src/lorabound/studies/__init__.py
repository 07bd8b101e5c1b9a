"""The grid study (``lorabound study``): does dropping upper-layer LoRA help, across models x tasks x seeds x
training settings?

- :mod:`.grid`: :class:`Grid` (from flags or a TOML file), its cells in a fixed order, and :func:`check_grid`, which
  refuses an unknown model or task, bad sizes or settings before any work;
- :mod:`.pooling`: the summaries: per cell, read from its report.json; pooled across cells, the mean difference of
  pruned vs full with a bootstrap interval over test sets, and Holm-corrected per-cell significance counts;
- :mod:`.render`: the report: study.json, study.md and a self-contained study.html with the plots embedded;
- :mod:`.runner`: :func:`study`, the command: each cell trains an adapter (or takes a given one), then
  `pipeline.run` into its own folder of one resumable study folder, in this process or as Ray tasks, whole or by
  shard; then it pools the cells and writes the report. :func:`adopt_cells` makes a new study folder of cells
  copied from another (a committed study, or one of a grid with fewer cells).

Each module imports only those before it in grid <- pooling <- render <- runner. The package is not named after
the command: ``lorabound.study`` is the function of the curated API, which a submodule of that name would replace.
"""

from .grid import Cell, Grid, Training, check_grid, grid_from_dict, load_grid, model_label, task_label
from .pooling import (RULES, bootstrap_mean, build_summary, claim_verdict, compare_with_full, curve_on_test, holm,
                      paper_line, pool, pool_curve_on_test, pooled_interval, rule_decisions, summarise_cell)
from .render import write_study_report
from .runner import adopt_cells, run_cell, study

__all__ = [
    "Cell",
    "Grid",
    "Training",
    "check_grid",
    "grid_from_dict",
    "load_grid",
    "model_label",
    "task_label",
    "RULES",
    "bootstrap_mean",
    "build_summary",
    "claim_verdict",
    "compare_with_full",
    "curve_on_test",
    "holm",
    "paper_line",
    "pool",
    "pool_curve_on_test",
    "pooled_interval",
    "rule_decisions",
    "summarise_cell",
    "write_study_report",
    "adopt_cells",
    "run_cell",
    "study",
]
