"""The search layer: choosing what to keep from the analysis' curves and validation scores.

- :mod:`.boundary`: the boundary criteria (auto, knee, max-likelihood, bleu, rougeL, chrf) and goals;
- :mod:`.modules`: the per-module and greedy-drop searches over (layer, module group) selections.

Import the module you need; this package imports none of them.
"""

__all__ = ["boundary", "modules"]
