"""A variant: one model the evaluation generates with, as a small value that caches and reports rely on.

A variant is the base model alone, or the base model with an adapter's LoRA kept on some of its layers.
Its name is for people; :meth:`Variant.key` holds only what determines the variant's outputs (the adapter's
content and the layers kept), so two variants with similar names never share cached results and two names
for the same model do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import LoraboundError
from .files import sha256_file
from .model import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_SAFETENSORS


@dataclass(frozen=True)
class Variant:
    name: str                                 # shown in tables; never part of a key
    adapter: str | None = None                # adapter_fingerprint of the adapter folder; None: no adapter at all
    kept_layers: tuple[int, ...] | None = None  # layers whose LoRA is kept; None: every layer the adapter has

    @classmethod
    def at_boundary(cls, name: str, adapter: str, boundary: int | None, adapter_layers: list[int]) -> "Variant":
        """The adapter with LoRA kept on layers 0..boundary (None, or any b from its top layer up: all of it)."""
        if boundary is None or boundary >= max(adapter_layers):
            return cls(name, adapter, None)
        return cls(name, adapter, tuple(layer for layer in adapter_layers if layer <= boundary))

    @property
    def is_base(self) -> bool:
        return self.adapter is None

    def key(self) -> str:
        """sha256 of what the variant's outputs depend on (with the model, data and settings the caller adds)."""
        kept = None if self.kept_layers is None else list(self.kept_layers)
        return hashlib.sha256(json.dumps({"adapter": self.adapter, "kept_layers": kept}).encode()).hexdigest()


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
