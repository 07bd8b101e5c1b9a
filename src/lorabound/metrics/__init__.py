"""The metrics layer: scoring generations and comparing two variants on the same examples.

- :mod:`.scores`: BLEU / chrF (sacrebleu), ROUGE with a tokenizer for every script, and :class:`MetricOptions`;
- :mod:`.stats`: paired tests (sign-flip permutation, bootstrap intervals), non-inferiority and power.

Import the module you need; this package imports none of them.
"""

__all__ = ["scores", "stats"]
