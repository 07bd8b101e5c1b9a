"""The analysis layer: what each layer's LoRA does, measured teacher-forced on validation.

- :mod:`.curves`: the truncation, logit-lens and single-layer ablation curves, and the joint (Ba, Bm) curve;
- :mod:`.greedy`: the greedy removal path (drop the module whose removal costs least, again and again).

Import the module you need; this package imports none of them.
"""

__all__ = ["curves", "greedy"]
