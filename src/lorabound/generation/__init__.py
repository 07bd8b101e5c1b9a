"""The generation layer: greedy decoding of every variant, behind one engine interface, cached by content.

- :mod:`.decode`: batched greedy generation with a row mask per variant;
- :mod:`.engines`: the transformers and vLLM engines;
- :mod:`.cache`: each variant's outputs cached under a key of everything that determines them.

Import the module you need; this package imports none of them.
"""

__all__ = ["decode", "engines", "cache"]
