"""lorabound: find the LoRA boundary layer, drop the adapter above it, and measure what that costs.

The public API, imported on first use (so `import lorabound` loads neither torch nor the model libraries):

- the commands, as functions with the CLI's names and defaults: train, analyze, search, prune, evaluate, run,
  demo, speed (lorabound.pipeline) and study (lorabound.studies.runner);
- their options and results: DataOptions, ModelOptions, GenerationOptions, TrainSettings (lorabound.options),
  MetricOptions (lorabound.metrics.scores), SearchSettings and SearchResult (lorabound.decision.boundary),
  TrainResult (lorabound.training);
- the values everything keys on: Selection (which LoRA modules are kept) and Variant (an adapter's selection,
  or no adapter);
- the one error type, LoraboundError.
"""

from importlib import import_module

__version__ = "0.1.0"

_WHERE = {
    **{name: "pipeline" for name in ("train", "analyze", "search", "prune", "evaluate", "run", "demo", "speed")},
    "study": "studies.runner",
    "DataOptions": "options", "ModelOptions": "options", "GenerationOptions": "options",
    "MetricOptions": "metrics.scores", "SearchSettings": "decision.boundary", "SearchResult": "decision.boundary",
    "TrainSettings": "options", "TrainResult": "training",
    "Selection": "lora.selection", "Variant": "lora.variants", "LoraboundError": "errors",
}
__all__ = ["__version__", *_WHERE]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'lorabound' has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(__all__)
