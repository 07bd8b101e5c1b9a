"""Model specs, loading, adapters and layer discovery.  (CONTRACT STUB: to be implemented)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

DEFAULT_MODEL = "smollm2-135m"


def load_model(spec: str = DEFAULT_MODEL, *, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False):
    """Return (model, tokenizer). spec: alias, local folder, .gguf file, or hub id. Tokenizer has a pad token."""
    raise NotImplementedError


def resolve_model_dir(spec: str) -> str:
    """A folder (or hub id) transformers can load: the alias and .gguf files are converted once into the cache."""
    raise NotImplementedError


@dataclass
class LayerStack:
    layers: nn.ModuleList      # the transformer blocks, 0 = nearest the embeddings
    layers_path: str           # dotted path from the base (unwrapped) model, e.g. "model.layers"
    final_norm: nn.Module | None
    lm_head: nn.Module
    logit_softcap: float | None  # Gemma-2/3 final_logit_softcapping, else None

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def find_layer_stack(model) -> LayerStack:
    """Works on a plain transformers model or a PeftModel wrapping one."""
    raise NotImplementedError


def load_adapter(model, adapter_dir: str | Path, *, allow_pickle: bool = False, is_trainable: bool = False):
    """Wrap `model` in a PeftModel with the LoRA adapter at `adapter_dir`, after validating it."""
    raise NotImplementedError
