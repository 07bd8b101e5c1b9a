"""The JSON Schemas of report.json, study.json and search.json: real documents (tiny random models through the
pipeline and the study) validate, broken ones do not, and the typed dicts of lorabound.results say the same keys."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

jsonschema = pytest.importorskip("jsonschema")

from lorabound import pipeline, results  # noqa: E402
from lorabound.decision.boundary import CRITERIA, SearchResult  # noqa: E402
from lorabound.options import DataOptions, GenerationOptions  # noqa: E402
from lorabound.results import schema  # noqa: E402
from lorabound.studies import grid_from_dict, study  # noqa: E402

from test_study import tiny_grid, workspace  # noqa: E402,F401  (workspace: a tiny model folder and two tasks)
from tiny import tiny_llama, tiny_lora  # noqa: E402

ROOT = Path(__file__).parent.parent
ROOTS = {"report": "Report", "study": "StudySummary", "search": "SearchDocument"}  # each schema's top-level type


def errors(document, name: str, definition: str | None = None) -> list[str]:
    """Each way `document` breaks schema `name` (or one of its $defs), as 'path: message', sorted."""
    whole = schema(name)
    target = whole if definition is None else {"$ref": f"#/$defs/{definition}", "$defs": whole["$defs"]}
    validator = jsonschema.Draft202012Validator(target)
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document))


def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Real documents
# ---------------------------------------------------------------------------------------------

RUNS = {"auto": {}, "goal size": {"goal": "size"}, "knee": {"criterion": "knee"},
        "greedy-drop selection": {"criterion": "greedy-drop", "keep_fraction": 0.5}}


@pytest.fixture(scope="module")
def runs(workspace):  # noqa: F811
    """A run folder per search kind, on a tiny random adapter (no training). The adapter's LoRA on layers 0 and 1
    does nothing, so greedy-drop keeps layers 2-3: a selection that is no prefix (the report's selection_test)."""
    adapter = workspace / "schema-adapter"
    model = tiny_lora(tiny_llama())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and (".layers.0." in name or ".layers.1." in name):
                p.zero_()
    model.save_pretrained(adapter)
    data = DataOptions(data=str(workspace / "places.jsonl"), validation_size=4, test_size=6, max_length=64)
    folders = {}
    for kind, settings in RUNS.items():
        folders[kind] = workspace / f"schema-run-{kind.replace(' ', '-')}"
        pipeline.run(str(workspace / "base"), adapter, out=folders[kind], data_options=data,
                     generation=GenerationOptions(max_new_tokens=4), bootstrap=50, progress=False, **settings)
    return folders


@pytest.fixture(scope="module")
def study_folder(workspace):  # noqa: F811
    """A one-cell study (trained adapter, a transfer task), as tests/test_study.py runs them."""
    out = workspace / "schema-study"
    study(out, grid_from_dict(tiny_grid(workspace, seeds=[0], transfer=str(workspace / "inns.jsonl"))), progress=False)
    return out


def test_the_schemas_are_draft_2020_12_and_ship_with_the_package():
    for name in results.SCHEMAS:
        loaded = schema(name)
        assert loaded["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(loaded)
    with pytest.raises(ValueError, match="no schema named"):
        schema("curves")


@pytest.mark.parametrize("kind", RUNS)
def test_real_reports_and_searches_validate(runs, kind):
    report = read(runs[kind] / "report.json")
    assert errors(report, "report") == []
    assert errors(read(runs[kind] / "search.json"), "search") == []
    assert report["search"] == read(runs[kind] / "search.json")
    if kind == "greedy-drop selection":  # the optional parts were exercised, not only allowed
        assert report["search"]["boundary"] is None and "selection_test" in report
        assert isinstance(report["search"]["compared_prefix"]["tests"], dict)
        assert report["search"]["greedy_path"]["steps"]
    if kind == "knee":
        assert report["search"]["validation_tests"] is None


def test_real_study_validates(study_folder):
    summary = read(study_folder / "study.json")
    assert errors(summary, "study") == []
    [cell] = summary["cells"]
    assert cell["status"] == "ok" and "transfer" in cell and "rules" in cell
    cell_dir = study_folder / "cells" / cell["id"]
    assert errors(read(cell_dir / "run" / "report.json"), "report") == []
    transfer = next(cell_dir.glob("transfer-*"))
    assert errors(read(transfer / "evaluation.json"), "report", "Evaluation") == []  # lorabound evaluate's file


# Fields the study code has added since studies/*-2026-11-28 were run: the three decision rules, the pooled
# test-side curve, and the pooled interval's standard error, power and its judging of the paper's claim.
# Everything else of those files conforms.
ADDED_SINCE_THE_COMMITTED_STUDIES = [
    ": 'rules' is a required property", ": 'test_curve' is a required property",
    *(f"pooled/{metric}: '{key}' is a required property" for metric in ("bleu", "rougeL")
      for key in ("claim", "mdd", "se", "test_sets", "test_sets_for_effect")),
]


@pytest.mark.parametrize("folder", ["paper-2026-11-28", "gemma-2026-11-28"])
def test_committed_studies_validate_but_for_the_fields_added_since(folder):
    summary = read(ROOT / "studies" / folder / "study.json")
    assert errors(summary, "study") == sorted(ADDED_SINCE_THE_COMMITTED_STUDIES)


# ---------------------------------------------------------------------------------------------
# Broken documents are refused
# ---------------------------------------------------------------------------------------------

def _drop(path: list):
    def change(doc):
        *parents, key = path
        for p in parents:
            doc = doc[p]
        del doc[key]
    return change


def _rename(path: list, new: str):
    def change(doc):
        *parents, key = path
        for p in parents:
            doc = doc[p]
        doc[new] = doc.pop(key)
    return change


def _set(path: list, value):
    def change(doc):
        *parents, key = path
        for p in parents:
            doc = doc[p]
        doc[key] = value
    return change


REPORT_BREAKS = {
    "verdict missing": _drop(["verdict"]),
    "search.kept_fraction missing": _drop(["search", "kept_fraction"]),
    "a significance row's mdd missing": _drop(["significance", 0, "mdd"]),
    "a significance row's differing renamed": _rename(["significance", 0, "differing"], "n_differing"),
    "a candidate's p-value missing": _drop(["search", "candidates", 0, "vs_full", "bleu", "p_value"]),
    "a variant's origin renamed": _rename(["variants", 0, "origin"], "why"),
    "an unknown key in a variant's metrics": _set(["variants", 0, "metrics", "ci_low"], 0.0),
    "the seed as text": _set(["meta", "seed"], "0"),
    "an unknown criterion": _set(["search", "criterion"], "best"),
    "n_for_effect as a float": _set(["significance", 0, "n_for_effect"], 12.5),
    "an unknown size source": _set(["variants", 1, "adapter_mb_source"], "guess"),
}


@pytest.mark.parametrize("change", REPORT_BREAKS, ids=list(REPORT_BREAKS))
def test_a_broken_report_is_refused(runs, change):
    report = read(runs["auto"] / "report.json")
    if change == "a candidate's p-value missing":
        report["search"]["candidates"].sort(key=lambda c: c["vs_full"] is None)  # one compared with the full
    broken = copy.deepcopy(report)
    REPORT_BREAKS[change](broken)
    assert errors(report, "report") == []
    assert errors(broken, "report") != []


STUDY_BREAKS = {
    "rules missing": _drop(["rules"]),
    "a pooled mdd missing": _drop(["pooled", "bleu", "mdd"]),
    "a pooled test_sets renamed": _rename(["pooled", "bleu", "test_sets"], "n_test_sets"),
    "a cell's status unknown": _set(["cells", 0, "status"], "done"),
    "a cell test's source missing": _drop(["cells", 0, "in_domain", "tests", "bleu", "source"]),
    "a cell test's p-value as text": _set(["cells", 0, "in_domain", "tests", "bleu", "p_value"], "0.5"),
    "the Holm counts as a float": _set(["pooled", "rougeL", "better"], 0.5),
}


@pytest.mark.parametrize("change", STUDY_BREAKS, ids=list(STUDY_BREAKS))
def test_a_broken_study_is_refused(study_folder, change):
    summary = read(study_folder / "study.json")
    broken = copy.deepcopy(summary)
    STUDY_BREAKS[change](broken)
    assert errors(summary, "study") == []
    assert errors(broken, "study") != []


def test_a_broken_search_is_refused(runs):
    search = read(runs["greedy-drop selection"] / "search.json")
    for change in (_drop(["greedy_path", "steps", 0, "nll"]), _set(["selection"], {"attention": ["0"]}),
                   _rename(["compared_prefix", "optimistic"], "caveat")):
        broken = copy.deepcopy(search)
        change(broken)
        assert errors(broken, "search") != []


# ---------------------------------------------------------------------------------------------
# The typed dicts and the schemas say the same keys
# ---------------------------------------------------------------------------------------------

def _objects(name: str) -> dict[str, dict]:
    """Each object schema with named properties: the root under its typed dict's name, and every such $def."""
    whole = schema(name)
    found = {ROOTS[name]: whole}
    found.update({key: value for key, value in whole["$defs"].items() if "properties" in value})
    return found


@pytest.mark.parametrize("name", sorted(ROOTS))
def test_each_typed_dict_has_the_keys_and_required_keys_of_its_schema(name):
    for type_name, part in _objects(name).items():
        typed = getattr(results, type_name, None)
        assert typed is not None, f"{name}.schema.json's {type_name} has no typed dict in lorabound.results"
        assert set(part["required"]) == set(typed.__required_keys__), type_name
        assert set(part["properties"]) == set(typed.__required_keys__) | set(typed.__optional_keys__), type_name
        assert set(part["required"]) <= set(part["properties"]), type_name
        if part.get("additionalProperties") is not False:  # open by design: said so in the description
            assert "open" in part["description"], type_name


def test_search_schema_is_the_reports_search_part():
    report, search = schema("report"), schema("search")
    assert {k: v for k, v in search.items() if not k.startswith("$") and k != "title"} == \
        report["$defs"]["SearchDocument"]
    for key, value in search["$defs"].items():
        assert report["$defs"][key] == value, key


def test_search_document_is_search_result_to_dict():
    """SearchResult (a dataclass) writes search.json; its fields and SearchDocument's keys cannot drift apart."""
    fields = {f.name for f in dataclasses.fields(SearchResult)} | {"kept_fraction"}
    assert fields == set(results.SearchDocument.__required_keys__)
    criteria = schema("search")["properties"]["criterion"]["enum"]
    assert set(criteria) == {*CRITERIA, "boundary"}


def test_results_imports_nothing_from_lorabound_nor_torch():
    tree = ast.parse((ROOT / "src" / "lorabound" / "results.py").read_text(encoding="utf-8"))
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [("." * node.level) + (node.module or "") for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)]
    assert imported and not [m for m in imported if m.startswith((".", "lorabound", "torch"))]


def test_the_powered_study_validates_in_full():
    """studies/powered-2026-12-02, pooled by the current code: every field, the cells' report.json included."""
    folder = ROOT / "studies" / "powered-2026-12-02"
    summary = read(folder / "study.json")
    assert errors(summary, "study") == []
    assert len(summary["cells"]) == 13 and all(cell["status"] == "ok" for cell in summary["cells"])
    for cell in summary["cells"]:
        assert errors(read(folder / "cells" / cell["id"] / "run" / "report.json"), "report") == []
