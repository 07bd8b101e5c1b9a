"""The report layer: a run's results as documents.

- :mod:`.document`: report.json, report.md and a self-contained report.html with its plots;
- :mod:`.verdict`: the verdict's sentences and the report's notes.

Import the module you need; this package imports none of them.
"""

__all__ = ["document", "verdict"]
