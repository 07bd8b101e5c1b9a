"""The LoRA layer: which of an adapter's modules are kept, keeping them in memory, and exporting them.

- :mod:`.selection`: :class:`Selection`, the one value for a boundary b, a layer set or a boundary per module group;
- :mod:`.masking`: keeping a selection's LoRA in memory (exact, reversible context managers);
- :mod:`.export`: exporting a selection as a pruned adapter (peft, zero-fill or merged);
- :mod:`.variants`: :class:`Variant`, no adapter or an adapter's selection, keyed by content, never by name.

Import the module you need; this package imports none of them (so :mod:`.selection` stays free of torch).
"""

__all__ = ["export", "masking", "selection", "variants"]
