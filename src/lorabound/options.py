"""The options the commands share: which data, which model, how to generate, vLLM's settings and LoRA training's.
Each field carries its help text; rules.py holds the rule for each field, applied when an options object is made.
Free of torch at import (the CLI's parser is built from these dataclasses): data and model load inside the
methods that need them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from typing import TYPE_CHECKING

from .errors import LoraboundError
from .rules import DEFAULT_MODEL, check_arguments

if TYPE_CHECKING:
    from .data import Splits, Task


def check_fields(options) -> None:
    """Every field of an options dataclass against its rule in rules.py."""
    check_arguments(**{f.name: getattr(options, f.name) for f in fields(options)})


@dataclass
class DataOptions:
    data: str = field(default="e2e", metadata={"help": "built-in task (e2e, webnlg, xsum) or a .jsonl/.csv file"})
    input_field: str = field(default="input", metadata={"help": "field holding the input, for user files"})
    target_field: str = field(default="target", metadata={"help": "field holding the reference(s), for user files"})
    template: str | None = field(default=None, metadata={"help": "prompt template with {input}, inline or a file"})
    train_size: int | None = field(default=None, metadata={"help": "training examples (default: all the rest)"})
    validation_size: int = field(default=40, metadata={"help": "validation examples (analysis and search)"})
    test_size: int = field(default=100, metadata={"help": "test examples (evaluation)"})
    seed: int = field(default=0, metadata={"help": "seed for the split (and everything else)"})
    max_length: int = field(default=256, metadata={"help": "max tokens of prompt + target"})
    disjoint_tests: bool = field(default=False, metadata={
        "help": "the test split is block number --seed of --test-size examples in one fixed order, so runs with "
                "different seeds never share a test example (independent test sets for a study)"})

    def __post_init__(self):
        check_fields(self)

    def load(self) -> tuple[Task, Splits]:
        from .data import load_task, split_task  # here: the options (and so the CLI's parser) stay free of torch

        task = load_task(self.data, input_field=self.input_field, target_field=self.target_field,
                         template=self.template)
        train = self.train_size
        if train is None:
            train = max(0, len(task.examples) - self.validation_size - self.test_size)
        return task, split_task(task, train=train, validation=self.validation_size, test=self.test_size,
                                seed=self.seed, disjoint_tests=self.disjoint_tests)


@dataclass
class ModelOptions:
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "smollm2-135m, a model folder, a .gguf file or a hub id"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run the model repository's own code"})
    allow_pickle: bool = field(default=False, metadata={"help": "allow a pickled adapter_model.bin (weights_only)"})

    def __post_init__(self):
        check_fields(self)

    def load(self, adapter: str | Path | None = None):
        from .model import check_adapter_files, load_adapter, load_model  # here: the options stay free of torch

        if adapter is not None:  # before the model (it may be large): the adapter, and its layers against the model's
            check_adapter_files(adapter, allow_pickle=self.allow_pickle, num_layers=self._num_layers())
        model, tokenizer = load_model(self.model, dtype=self.dtype, device=self.device,
                                      trust_remote_code=self.trust_remote_code)
        if adapter is not None:
            model = load_adapter(model, adapter, allow_pickle=self.allow_pickle, model_name=self.model)
        model.eval()
        return model, tokenizer

    def _num_layers(self) -> int | None:
        """The model's layer count from its local config alone; None for a hub id (no second trip to the network)
        or where the config cannot be read (load_model then says why)."""
        from .model import model_num_layers, resolve_model_dir  # here: the options stay free of torch

        try:
            if not Path(resolve_model_dir(self.model)).is_dir():
                return None
            return model_num_layers(self.model, trust_remote_code=self.trust_remote_code)
        except LoraboundError:
            return None




@dataclass
class GenerationOptions:
    max_new_tokens: int = field(default=64, metadata={"help": "tokens generated per example at most"})
    # 32 rather than 16: 11% faster on 2 cores with the same outputs (README, Measurements).
    generation_batch_size: int = field(default=32, metadata={"help": "examples per generation batch"})
    stop_at_newline: bool = field(default=True, metadata={"help": "stop at the end of the answer line"})
    engine: str = field(default="hf", metadata={"help": "generation engine: hf (transformers) or vllm"})

    def __post_init__(self):
        check_fields(self)


@dataclass
class VLLMOptions:
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs that split each layer (tensor parallelism)"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM: share of GPU memory it may take"})
    max_model_len: int | None = field(default=None, metadata={"help": "vLLM: longest prompt + output in tokens; "
                                                              "None: the model's"})
    max_lora_rank: int | None = field(default=None, metadata={"help": "vLLM: largest LoRA rank it reserves; "
                                                              "None: the adapters' largest rank"})
    max_loras: int = field(default=4, metadata={"help": "vLLM: adapters batched together at once"})
    distributed_executor_backend: str | None = field(default=None, metadata={
        "help": "vLLM: mp (one node) or ray (several nodes, a running Ray cluster); None: vLLM's choice"})

    def __post_init__(self):
        check_fields(self)


@dataclass
class TrainSettings:
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: list[str] | str = field(default="all-linear", metadata={
        "help": "modules to adapt: a list of names (q_proj v_proj ...) or all-linear"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha / sqrt(r)"})
    use_dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA (DoRA)"})
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW peak learning rate"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training pairs (may be fractional)"})
    batch_size: int = field(default=8, metadata={"help": "pairs per optimiser step"})
    max_length: int = field(default=256, metadata={"help": "tokens per prompt + target; longer targets are cut"})
    warmup: float = field(default=0.1, metadata={"help": "share of steps with a linearly rising learning rate"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation, shuffling and dropout"})
    checkpoint_every: int = field(default=10, metadata={"help": "steps between resumable checkpoints"})
    early_stopping: int = field(default=0, metadata={
        "help": "stop when the validation loss has not improved for this many evaluations, and save the adapter "
                "of the lowest validation loss (0: off; --epochs is then the most it trains)"})
    eval_every: int | None = field(default=None, metadata={
        "help": "steps between validation-loss evaluations for --early-stopping (none: once an epoch)"})

    def __post_init__(self):
        check_fields(self)
