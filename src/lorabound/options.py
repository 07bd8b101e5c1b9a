"""The options every command shares: which data, which model, how to generate. Each field carries its help text;
validation.py holds the rule for each field, applied when an options object is made."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from .data import Splits, Task, load_task, split_task
from .errors import LoraboundError
from .model import (DEFAULT_MODEL, check_adapter_files, load_adapter, load_model, model_num_layers,
                    resolve_model_dir)
from .rules import check_arguments


def check_fields(options) -> None:
    """Every field of an options dataclass against its rule in validation.py."""
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
