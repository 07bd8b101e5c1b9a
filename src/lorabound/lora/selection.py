"""A selection: which LoRA modules of the layer stack keep their update, as one small value.

The paper keeps LoRA on layers 0..b for every module. A selection also says "attention LoRA up to Ba, MLP LoRA
up to Bm" or "LoRA on layers {0..9, 12, 15}". Surgery (in memory and on export), generation's per-row masks,
cache keys and reports all take a Selection, so a variant means the same thing everywhere.

A module belongs to a group by its path inside its transformer layer (masking.LoraModule.group): "attention",
"mlp" or "other". LoRA outside the layer stack (on the head, modules_to_save) is never selected away; the base
model (no adapter at all) is a separate thing, see masking.no_adapter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from ..errors import LoraboundError

GROUPS = ("attention", "mlp", "other")
EVERY = "*"  # the group key that stands for every module group


def layer_ranges(layers: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0..2,5,7..8"; [] -> "none"."""
    layers = sorted(layers)
    if not layers:
        return "none"
    parts, start = [], layers[0]
    for previous, current in zip(layers, layers[1:] + [None]):
        if current != previous + 1:
            parts.append(str(start) if start == previous else f"{start}..{previous}")
            start = current
    return ",".join(parts)


@dataclass(frozen=True)
class Selection:
    """Kept LoRA as {group: layers}. `kept` None: every module the adapter has (the full adapter).

    `kept` is a sorted tuple of (group, layers) pairs; group EVERY applies to every module group and is then the
    only entry. A group the selection does not name keeps no LoRA.
    """
    kept: tuple[tuple[str, tuple[int, ...]], ...] | None = None

    # -- constructors ------------------------------------------------------
    @classmethod
    def full(cls) -> "Selection":
        return cls(None)

    @classmethod
    def layers(cls, layers: Iterable[int]) -> "Selection":
        """LoRA on these layers, every module group (a prefix, or any set: greedy-drop's result)."""
        return cls(((EVERY, tuple(sorted(set(int(layer) for layer in layers)))),))

    @classmethod
    def prefix(cls, boundary: int) -> "Selection":
        """The paper's selection: LoRA on layers 0..boundary (b = -1: none in the stack)."""
        return cls.layers(range(boundary + 1))

    @classmethod
    def per_group(cls, boundaries: Mapping[str, int]) -> "Selection":
        """LoRA of each named group on layers 0..its boundary, e.g. {"attention": 20, "mlp": 9}."""
        unknown = sorted(set(boundaries) - set(GROUPS))
        if unknown:
            raise LoraboundError(f"unknown module group {', '.join(unknown)}; the groups are {', '.join(GROUPS)}")
        return cls(tuple(sorted((group, tuple(range(b + 1))) for group, b in boundaries.items())))

    # -- questions ---------------------------------------------------------
    @property
    def is_full(self) -> bool:
        return self.kept is None

    def keeps(self, layer: int, group: str) -> bool:
        """Whether the LoRA module of `group` on stack layer `layer` applies its update."""
        if self.kept is None:
            return True
        for name, layers in self.kept:
            if name in (EVERY, group):
                return layer in layers
        return False

    def layers_of(self, group: str) -> tuple[int, ...] | None:
        """The layers `group` keeps (None: all of them)."""
        if self.kept is None:
            return None
        return next((layers for name, layers in self.kept if name in (EVERY, group)), ())

    def prefix_boundary(self) -> int | None:
        """b when this is LoRA on layers 0..b of every group; None for any other selection."""
        if self.kept is None or len(self.kept) != 1 or self.kept[0][0] != EVERY:
            return None
        layers = self.kept[0][1]
        return len(layers) - 1 if layers == tuple(range(len(layers))) else None

    def restricted_to(self, pairs: Iterable[tuple[int, str]]) -> "Selection":
        """The same selection stated on the adapter's own (layer, group) pairs: full when it keeps all of them.

        Two selections that keep the same modules of this adapter then have the same key, e.g. b = 29 and b = 40
        on a 30-layer model, or {"attention": 9, "mlp": 9} and the prefix b = 9.
        """
        pairs = sorted(set(pairs))
        kept = [(layer, group) for layer, group in pairs if self.keeps(layer, group)]
        if kept == pairs:
            return Selection.full()
        groups = sorted({group for _, group in pairs})
        by_group = {g: tuple(layer for layer, group in kept if group == g) for g in groups}
        if len(set(by_group.values())) == 1:
            return Selection(((EVERY, next(iter(by_group.values()))),))
        return Selection(tuple(sorted(by_group.items())))

    # -- identity and display ----------------------------------------------
    def to_json(self) -> dict | None:
        return None if self.kept is None else {group: list(layers) for group, layers in self.kept}

    @classmethod
    def from_json(cls, value: dict | None) -> "Selection":
        if value is None:
            return cls.full()
        return cls(tuple(sorted((group, tuple(sorted(layers))) for group, layers in value.items())))

    def key(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    def describe(self) -> str:
        """For people: "every LoRA layer", "LoRA on layers 0..12", "attention 0..20, mlp 0..9"."""
        if self.kept is None:
            return "every LoRA layer"
        if len(self.kept) == 1 and self.kept[0][0] == EVERY:
            layers = self.kept[0][1]
            return "no LoRA layer" if not layers else f"LoRA on layers {layer_ranges(layers)}"
        return ", ".join(f"{group} {layer_ranges(layers)}" for group, layers in self.kept)


# -- from the command line ---------------------------------------------------

MAX_LAYER = 100_000  # a layer set is built element by element: refuse numbers no model reaches

def parse_layers(text: str, flag: str = "--layers") -> tuple[int, ...]:
    """A layer set as written on the command line: "0-9,12,15" -> (0, 1, ..., 9, 12, 15).

    Ranges are inclusive; order and repeats do not matter. Refused: an empty set, a part that is not a whole
    number or a range a-b with a <= b, a negative layer.
    """
    layers: set[int] = set()
    for part in str(text).replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
            raise LoraboundError(f"{flag} {text!r} is not a layer set; write layers and ranges such as 0-9,12,15")
        high = int(match[2] or match[1])
        if high >= MAX_LAYER:
            raise LoraboundError(f"{flag} {text!r} names layer {high}, beyond any model; select layers below "
                                 f"{MAX_LAYER} (the model's layers are 0..L-1)")
        layers.update(range(int(match[1]), high + 1))
    return tuple(sorted(layers))


def per_group_over(boundaries: Mapping[str, int], pairs: Iterable[tuple[int, str]]) -> Selection:
    """Selection.per_group for the groups named; every other module group of the adapter (its (layer, group)
    `pairs`) keeps all of its LoRA. So "--boundary-mlp 9" alone drops MLP LoRA above layer 9 and nothing else."""
    given = Selection.per_group(boundaries)
    others = {}
    for layer, group in sorted(set(pairs)):
        if group not in boundaries:
            others.setdefault(group, []).append(layer)
    return Selection(tuple(sorted(list(given.kept) + [(g, tuple(layers)) for g, layers in others.items()])))


def check_boundary(boundary: int, num_layers: int) -> None:
    """Refuse a boundary outside -1 (the base model) .. num_layers - 1 (the full adapter)."""
    if not -1 <= boundary <= num_layers - 1:
        raise LoraboundError(
            f"boundary {boundary} is outside -1..{num_layers - 1} for this {num_layers}-layer model; "
            f"pass --boundary between -1 (base model) and {num_layers - 1} (full adapter)"
        )
