"""The selection flags through the commands: prune writes what the flags say, evaluate shows each selection as a
row that says what it keeps and where it comes from, and the report files record the selection."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from lorabound.generation.decode import generate
from lorabound.model import load_adapter, load_model
from lorabound.lora.selection import Selection, parse_layers, per_group_over
from lorabound.lora.masking import keep_selection

from clitools import ok
from test_cli import TEMPLATE, rows, table_rows, write_jsonl
from tiny import tiny_lora, save_tiny_base


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection-cli")
    save_tiny_base(root)
    tiny_lora().save_pretrained(root / "adapter")
    write_jsonl(root / "data.jsonl", rows(16))
    common = ["--model", root / "base", "--data", root / "data.jsonl", "--template", TEMPLATE, "--validation-size",
              2, "--test-size", 4, "--max-length", 64, "--max-new-tokens", 4, "--bootstrap", 20]
    return root, [str(a) for a in common]


def test_parse_layers_reads_ranges_and_single_layers():
    assert parse_layers("0-3,7, 5,2") == (0, 1, 2, 3, 5, 7)
    assert parse_layers("4") == (4,)
    assert per_group_over({"mlp": 1}, [(0, "attention"), (3, "attention"), (0, "mlp"), (3, "mlp")]) == \
        Selection((("attention", (0, 3)), ("mlp", (0, 1))))


def test_prune_flags_write_the_selection_they_name(capsys, ws, tmp_path):
    root, _ = ws
    out = ok(capsys, "prune", "--adapter", root / "adapter", "--boundary-mlp", 1, "--out", tmp_path / "m1")
    # only MLP LoRA above layer 1 is dropped; attention keeps every layer
    expected = Selection((("attention", (0, 1, 2, 3)), ("mlp", (0, 1))))
    assert f"wrote peft adapter with {expected.describe()} to {tmp_path / 'm1'}" in out
    assert Selection.from_json(json.loads((tmp_path / "m1" / "lorabound.json").read_text())["selection"]) == expected
    ok(capsys, "prune", "--adapter", root / "adapter", "--layers", "0,2-3", "--model", root / "base",
       "--out", tmp_path / "l")
    base = load_model(str(root / "base"))[0]
    model = load_adapter(load_model(str(root / "base"))[0], root / "adapter")
    ids = torch.tensor([[5, 17, 33, 2, 90, 41]])
    for folder, selection in (("m1", expected), ("l", Selection.layers([0, 2, 3]))):
        exported = PeftModel.from_pretrained(load_model(str(root / "base"))[0], str(tmp_path / folder)).eval()
        with torch.no_grad(), keep_selection(model, selection):
            assert torch.allclose(exported(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(exported(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)
        assert not torch.allclose(exported(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)


def test_evaluate_shows_each_selection_as_a_row_with_its_origin(capsys, ws, tmp_path):
    root, common = ws
    out = ok(capsys, "evaluate", *common, "--adapter", root / "adapter", "--layers", "0,2", "1-3",
             "--boundary-attention", 3, "--boundary-mlp", 0, "--out", tmp_path / "ev")
    result = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    by_name = {row["name"]: row for row in result["variants"]}
    per_group = Selection.per_group({"attention": 3, "mlp": 0})
    wanted = {Selection.layers([0, 2]).describe(): (Selection.layers([0, 2]), "given with --layers"),
              Selection.layers([1, 2, 3]).describe(): (Selection.layers([1, 2, 3]), "given with --layers"),
              per_group.describe(): (per_group, "given with --boundary-attention 3 --boundary-mlp 0")}
    table = table_rows(out)
    model, tokenizer = load_model(str(root / "base"))
    model = load_adapter(model, root / "adapter")
    per_module = [(pair, p.numel()) for pair, _, p in _lora_params(model)]
    for name, (selection, origin) in wanted.items():
        row = by_name[name]
        assert row["origin"] == origin and table[name][-1] == origin
        assert Selection.from_json(row["selection"]) == selection and row["description"] == selection.describe()
        assert row["lora_params"] == sum(n for pair, n in per_module if selection.keeps(*pair))
        assert any(t["a"] == name for t in result["significance"])  # compared with the full adapter
        hypotheses = [json.loads(line)["output"] for line in (tmp_path / "ev" / row["hypotheses_file"]).open()]
        prompts = [json.loads(line)["input"] for line in (tmp_path / "ev" / row["hypotheses_file"]).open()]
        with keep_selection(model, selection):
            again = generate(model, tokenizer, [TEMPLATE.format(input=p) for p in prompts], max_new_tokens=4,
                             progress=False).texts
        assert hypotheses == again
    assert by_name["full adapter"]["selection"] is None and "selection" not in by_name["base model"]
    assert len({row["hypotheses_file"] for row in result["variants"]}) == len(result["variants"])


def _lora_params(model):
    """(layer, group, parameter) for every LoRA parameter in the stack, read from the module paths."""
    import re

    for name, p in model.named_parameters():
        match = re.search(r"layers\.(\d+)\.(self_attn|mlp)\..*lora_", name)
        if match:
            yield (int(match[1]), "attention" if match[2] == "self_attn" else "mlp"), name, p


def test_run_report_records_each_rows_selection(capsys, ws, tmp_path):
    root, common = ws
    ok(capsys, "run", *common, "--adapter", root / "adapter", "--boundary", 1, "--boundaries", 2,
       "--out", tmp_path / "r")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    by_name = {row["name"]: row for row in report["variants"]}
    for name, b in (("pruned (b=1)", 1), ("pruned (b=2)", 2)):
        assert Selection.from_json(by_name[name]["selection"]) == Selection.prefix(b)
        assert by_name[name]["description"] == f"LoRA on layers 0..{b}"
    assert by_name["full adapter"]["description"] == "every LoRA layer"
    assert "selection" not in by_name["base model"]


def test_python_api_prune_takes_a_selection(ws, tmp_path):
    from lorabound import pipeline

    root, _ = ws
    selection = Selection.per_group({"attention": 2, "mlp": 0})
    result = pipeline.prune(root / "adapter", selection, tmp_path / "a2-m0")
    assert result.selection == selection and result.boundary is None
    assert result.pairs_kept == [(0, "attention"), (0, "mlp"), (1, "attention"), (2, "attention")]


def test_prune_without_a_model_keeps_a_group_whole_from_its_top_layer_up(capsys, ws, tmp_path):
    """Without --model, a group boundary above the adapter's layers keeps that group's LoRA (built in no time)."""
    root, _ = ws
    out = ok(capsys, "prune", "--adapter", root / "adapter", "--boundary-mlp", 10**9, "--boundary-attention", 0,
             "--out", tmp_path / "x")
    assert "attention 0, mlp 0..3" in out
    out = ok(capsys, "prune", "--adapter", root / "adapter", "--boundary", 10**9, "--out", tmp_path / "y")
    assert f"boundary {10**9} keeps all of them" in out
