"""A variant: one model the evaluation generates with, as a small value that engines, caches and reports share.

A variant is the base model alone, the loaded adapter with some of its LoRA modules kept (a Selection: a
boundary, per-group boundaries, a layer set), or another adapter folder on the same base model. Its name is for
people; :meth:`Variant.key` holds only what determines the variant's outputs (the adapter's content and the
modules it keeps, stated on the adapter's own (layer, group) pairs), so two variants with similar names never
share cached results and two names (or two selections) for the same model do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import LoraboundError
from ..model import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_SAFETENSORS
from ..runtime.files import sha256_file
from .selection import Selection


@dataclass(frozen=True)
class Variant:
    name: str                                  # shown in tables; never part of a key
    selection: Selection | None = field(default_factory=Selection.full)  # kept LoRA; None: the base model
    adapter: Path | None = None                # another adapter folder, used as it is (selection not applied)

    @classmethod
    def at_boundary(cls, name: str, boundary: int | None) -> "Variant":
        """LoRA kept on layers 0..boundary; below 0: the base model (no adapter at all). `boundary` None is no
        boundary (the full adapter, as when --boundary is left out); it is a boundary, not a selection: a Variant's
        selection None is always the base model."""
        if boundary is None:
            return cls(name)
        return cls(name, Selection.prefix(boundary) if boundary >= 0 else None)

    @property
    def is_base(self) -> bool:
        return self.adapter is None and self.selection is None

    def identity(self, fingerprint: str | None, pairs: Iterable[tuple[int, str]]) -> dict:
        """What the outputs depend on besides model, prompts and settings: the adapter's content (`fingerprint`:
        adapter_fingerprint of the loaded adapter) and the modules kept of its (layer, module group) `pairs`."""
        if self.adapter is not None:
            return {"adapter": adapter_fingerprint(self.adapter), "selection": None}
        if self.selection is None:
            return {"adapter": None, "selection": None}
        return {"adapter": fingerprint, "selection": self.selection.restricted_to(pairs).to_json()}

    def key(self, fingerprint: str | None, pairs: Iterable[tuple[int, str]]) -> str:
        """sha256 of :meth:`identity` (the caller adds the model, data and settings)."""
        return hashlib.sha256(json.dumps(self.identity(fingerprint, pairs), sort_keys=True).encode()).hexdigest()


def adapter_fingerprint(folder: str | Path) -> str:
    """sha256 over the adapter's config and weights files: changes whenever either file's content does."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoraboundError(f"adapter folder {folder} does not exist; "
                             "pass the folder written by PEFT's save_pretrained")
    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_SAFETENSORS, ADAPTER_PICKLE):
        if (folder / name).is_file():
            digest.update(f"{name}:{sha256_file(folder / name)}\n".encode())
    return digest.hexdigest()
