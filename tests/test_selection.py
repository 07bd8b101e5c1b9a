"""The Selection value type: what it keeps, how it normalises against an adapter, its key and its wording."""

import pytest

from lorabound.errors import LoraboundError
from lorabound.lora.selection import Selection

PAIRS = [(layer, group) for layer in range(4) for group in ("attention", "mlp")]


def test_prefix_keeps_layers_up_to_the_boundary_in_every_group():
    s = Selection.prefix(1)
    assert [p for p in PAIRS if s.keeps(*p)] == [(0, "attention"), (0, "mlp"), (1, "attention"), (1, "mlp")]
    assert s.prefix_boundary() == 1
    assert Selection.prefix(-1).describe() == "no LoRA layer"


def test_per_group_keeps_each_group_up_to_its_own_boundary():
    s = Selection.per_group({"attention": 2, "mlp": 0})
    assert [p for p in PAIRS if s.keeps(*p)] == [(0, "attention"), (0, "mlp"), (1, "attention"), (2, "attention")]
    assert s.prefix_boundary() is None
    assert s.describe() == "attention 0..2, mlp 0"


def test_unknown_group_is_refused():
    with pytest.raises(LoraboundError, match="unknown module group ffn"):
        Selection.per_group({"ffn": 3})


def test_restricted_to_gives_equal_keys_to_selections_that_keep_the_same_modules():
    assert Selection.prefix(3).restricted_to(PAIRS) == Selection.full()
    assert Selection.prefix(40).restricted_to(PAIRS).key() == Selection.full().key()
    same = Selection.per_group({"attention": 1, "mlp": 1}).restricted_to(PAIRS)
    assert same == Selection.prefix(1).restricted_to(PAIRS)
    assert Selection.layers([0, 2]).restricted_to(PAIRS) != Selection.prefix(1).restricted_to(PAIRS)


def test_json_round_trip_and_non_contiguous_wording():
    s = Selection.layers([5, 0, 1, 2, 7, 8])
    assert Selection.from_json(s.to_json()) == s
    assert s.describe() == "LoRA on layers 0..2,5,7..8"
    assert Selection.from_json(None).is_full
