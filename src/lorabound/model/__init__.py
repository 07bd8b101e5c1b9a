"""The model stage: specs and loading, GGUF conversion, layer discovery, LoRA adapters.

- :mod:`.loading`: model specs (``smollm2-135m`` | folder | ``.gguf`` | hub id) and :func:`load_model`;
- :mod:`.gguf`: GGUF files converted once into a safetensors folder in the cache;
- :mod:`.layers`: :func:`find_layer_stack` finds the blocks, final norm and head of any causal LM;
- :mod:`.adapters`: :func:`load_adapter` checks a LoRA adapter folder against the model, then wraps it.
"""

from .adapters import (ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_SAFETENSORS, adapter_tensor_names,
                       adapter_tensor_shapes, adapter_weights_file, check_adapter_consistency, check_adapter_files,
                       check_adapter_matches, check_every_tensor_used, check_finite_tensors, check_lora_config,
                       load_adapter, read_adapter_config, read_adapter_tensors)
from .gguf import DEFAULT_MODEL, load_gguf_model
from .layers import (KNOWN_FINAL_NORM_NAMES, KNOWN_LAYER_PATHS, SUPPORTED_LAYOUTS, LayerStack, apply_head,
                     find_layer_stack, head_only_at, layers_path_of_names, module_layer_index, unwrap_model)
from .loading import (DTYPES, EMBEDDED_GGUF, EMBEDDED_PACKAGE, EMBEDDED_PIP, check_adapter_fits_config,
                      check_sequence_room, config_position_limit, embedded_gguf_path, load_model,
                      load_tokenizer, model_layers_path, model_num_layers,
                      model_paths, position_limit, resolve_model_dir)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_PICKLE",
    "ADAPTER_SAFETENSORS",
    "adapter_tensor_names",
    "adapter_tensor_shapes",
    "adapter_weights_file",
    "check_adapter_consistency",
    "check_adapter_files",
    "check_adapter_matches",
    "check_every_tensor_used",
    "check_finite_tensors",
    "check_lora_config",
    "load_adapter",
    "read_adapter_config",
    "read_adapter_tensors",
    "DEFAULT_MODEL",
    "load_gguf_model",
    "KNOWN_FINAL_NORM_NAMES",
    "KNOWN_LAYER_PATHS",
    "SUPPORTED_LAYOUTS",
    "LayerStack",
    "apply_head",
    "find_layer_stack",
    "head_only_at",
    "layers_path_of_names",
    "module_layer_index",
    "unwrap_model",
    "DTYPES",
    "check_adapter_fits_config",
    "EMBEDDED_GGUF",
    "EMBEDDED_PACKAGE",
    "EMBEDDED_PIP",
    "embedded_gguf_path",
    "check_sequence_room",
    "config_position_limit",
    "position_limit",
    "load_model",
    "load_tokenizer",
    "model_layers_path",
    "model_num_layers",
    "model_paths",
    "resolve_model_dir",
]
