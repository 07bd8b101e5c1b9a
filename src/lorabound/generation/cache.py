"""Generation per variant through one engine (transformers or vLLM), each variant's outputs cached as JSONL in
OUT/generations under a key of everything that determines them, so a resumed or repeated command reuses them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data import Example, Task
from ..formatting import slug
from ..lora.selection import Selection
from ..lora.masking import parts_outside_layers
from ..lora.variants import Variant, adapter_fingerprint
from ..model import find_layer_stack, resolve_model_dir
from ..options import GenerationOptions, ModelOptions, VLLMOptions
from ..runtime import distributed
from ..runtime.files import input_identity, read_jsonl, write_text_atomic
from .decode import eos_token_ids
from .engines import HFEngine, VLLMEngine, check_engine


BASE, FULL = "base model", "full adapter"


def variant_name(boundary: int | None, top: int) -> str:
    """"full adapter" at or above the adapter's top LoRA layer, "base model" below 0, else "pruned (b=N)"."""
    if boundary is None or boundary >= top:
        return FULL
    if boundary < 0:
        return BASE
    return f"pruned (b={boundary})"


def boundary_variant(boundary: int | None, top: int) -> Variant:
    return Variant.at_boundary(variant_name(boundary, top), boundary)


@dataclass
class Generated:
    texts: list[str]
    file: str | None  # the JSONL holding them, relative to the output folder (None: not saved)


def model_identity(model_options: ModelOptions) -> dict:
    """What identifies the loaded model in a cache key: its spec, dtype, device and its files' identity."""
    return {"model": model_options.model, "dtype": model_options.dtype, "device": model_options.device,
            "files": input_identity(model_options.model)}


def generate_cached(engine, task: Task, examples: list[Example], requests: list[Variant], split: str,
                     out: Path | None, generation: GenerationOptions, model_id: dict, adapter,
                     pairs: list[tuple[int, str]], progress) -> dict[str, Generated]:
    """Outputs per variant name, reusing finished files; the rest are generated in one engine call.

    The file is OUT/generations/SPLIT-NAME-KEY.jsonl. KEY hashes everything that determines the outputs: the
    variant's identity (adapter content, the modules it keeps of the adapter's (layer, group) `pairs`), the model's
    identity, the prompts and the generation settings; the name is only there to help a reader, so two variants
    never share a file. Only rank 0 writes.
    """
    prompts = [task.prompt(e) for e in examples]
    fingerprint = adapter_fingerprint(adapter)
    outputs, missing = {}, []
    for request in {r.name: r for r in requests}.values():
        key = hashlib.sha256(json.dumps({"variant": request.key(fingerprint, pairs), "model": model_id, "split": split,
                                         "prompts": prompts, "generation": asdict(generation)},
                                        sort_keys=True).encode()).hexdigest()
        relative = f"generations/{split}-{slug(request.name, empty='')[-40:].strip('-') or 'variant'}-{key[:12]}.jsonl"
        path = out / relative if out is not None else None
        # The same variant under another name (b = 29 and b = 40, a per-group selection equal to a prefix) wrote
        # a file with the same key: reuse it.
        for found in ([path] + sorted(out.glob(f"generations/{split}-*-{key[:12]}.jsonl"))) if out else []:
            rows = read_jsonl(found, "delete it and rerun the same command to generate it again") \
                if found.is_file() else None
            if rows and rows[0].get("key") == key and len(rows) == len(examples):
                outputs[request.name] = Generated([r["output"] for r in rows], str(found.relative_to(out)))
                break
        else:
            missing.append((request, key, relative, path))
    if missing:
        generated = engine.generate([request for request, *_ in missing], prompts, f"generate {split}", progress)
        for request, key, relative, path in missing:
            texts = generated[request.name]
            if path is not None and distributed.is_main():
                rows = [{"key": key, "index": i, "input": e.input, "references": list(e.references), "output": t}
                        for i, (e, t) in enumerate(zip(examples, texts))]
                write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            outputs[request.name] = Generated(texts, relative if path is not None else None)
        distributed.barrier()
    return outputs


class SelectionGenerator:
    """Validation (or test) outputs per Selection, through the engine and its cache like every variant; the
    full adapter and prefixes under their usual names, so their files are shared with `auto`."""

    def __init__(self, engine, peft_model, task, examples, out, generation, model_id, adapter, pairs, progress,
                 split: str = "validation"):
        self.engine, self.model, self.task, self.examples, self.split = engine, peft_model, task, examples, split
        self.out, self.generation, self.model_id = out, generation, model_id
        self.adapter, self.pairs, self.progress = adapter, pairs, progress

    def texts(self, selections: list[Selection]) -> dict[Selection, list[str]]:
        top = max(layer for layer, _ in self.pairs)
        requests = {}
        for s in selections:
            b = top if s.is_full else s.prefix_boundary()
            if b == -1 and parts_outside_layers(self.model):
                b = None  # no LoRA layer, but the adapter's other parts on: not the base model
            requests[s] = (boundary_variant(b, top) if b is not None
                           else Variant(f"selection {s.describe()}", selection=s))
        generated = generate_cached(self.engine, self.task, self.examples, list(requests.values()), self.split,
                                     self.out, self.generation, self.model_id, self.adapter, self.pairs,
                                     self.progress)
        return {s: generated[request.name].texts for s, request in requests.items()}


def check_engine_options(generation: GenerationOptions, model_options: ModelOptions, adapters: list,
                  vllm: VLLMOptions | None) -> None:
    """Refuse what the generation engine cannot run, before the model is loaded."""
    model_dir = resolve_model_dir(model_options.model) if generation.engine == "vllm" else ""
    check_engine(generation.engine, model_dir=model_dir, adapters=adapters, options=vllm or VLLMOptions(),
                 trust_remote_code=model_options.trust_remote_code)


def make_engine(generation: GenerationOptions, vllm: VLLMOptions | None, peft_model, tokenizer,
                 model_options: ModelOptions, adapter, out: Path | None):
    """The engine that generates every variant; vLLM's pruned exports go to OUT/vllm-adapters (removed after)."""
    if generation.engine == "vllm":
        return VLLMEngine(resolve_model_dir(model_options.model), adapter, tokenizer,
                          num_layers=find_layer_stack(peft_model).num_layers,
                          max_new_tokens=generation.max_new_tokens, stop_at_newline=generation.stop_at_newline,
                          dtype=model_options.dtype, options=vllm, eos_ids=eos_token_ids(peft_model, tokenizer),
                          scratch=out / "vllm-adapters" if out is not None else None,
                          trust_remote_code=model_options.trust_remote_code,
                          layers_path=find_layer_stack(peft_model).layers_path)
    return HFEngine(peft_model, tokenizer, max_new_tokens=generation.max_new_tokens,
                    batch_size=generation.generation_batch_size, stop_at_newline=generation.stop_at_newline,
                    load_adapter=lambda folder: model_options.load(folder)[0])
