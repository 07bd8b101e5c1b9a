"""The evaluation table: which variants are rows, why, their test scores, sizes and significance.

`evaluate` and `run` build it here: the base model, the full adapter, LoRA kept up to each boundary, chosen
selections and exported adapters, generated in one engine call (generation_cache), scored with sacrebleu and
rouge-score, each row compared with the full adapter by paired tests (evaluate.paired_tests); each row says where it comes from.
"""

from __future__ import annotations

from pathlib import Path

from .data import require_nonempty
from .errors import LoraboundError
from .generation.cache import (FULL, SelectionGenerator, boundary_variant, generate_cached, make_engine, model_identity,
                               variant_name)
from .lora.selection import Selection, check_boundary
from .lora.masking import adapter_pairs, lora_modules, lora_params_per_layer
from .lora.export import ADAPTER_WEIGHTS, AdapterFiles, exported_bytes
from .lora.variants import Variant
from .metrics.scores import MetricOptions, describe_significance, paired_tests, score
from .model import ADAPTER_PICKLE, find_layer_stack
from .decision.boundary import knee, knee_label, raises_probability
from .results import Evaluation, SelectionTest, VariantRow


REFERENCE_ORIGINS = {"base": "reference: no adapter", "full": "reference: every LoRA layer"}


def evaluate_variants(peft_model, tokenizer, task, splits, boundaries: list[int], out: Path, generation,
                      bootstrap: int, seed: int, progress, metric_options: MetricOptions | None = None, *, adapter,
                      model_id: dict, origins: dict[int, list[str]], engine=None, extras: list[Variant] = (),
                      selections: list[tuple[Selection, str]] = ()) -> Evaluation:
    """Base, full adapter, LoRA kept up to each b, each of `selections` (a Selection and where it comes from) and
    `extras` (exported adapters), all generated in one engine call. `origins`: b -> why that b is in the table."""
    require_nonempty(splits.test, "test")
    engine = engine or make_engine(generation, None, peft_model, tokenizer, None, None, out)
    num_layers = find_layer_stack(peft_model).num_layers
    for b in boundaries:
        check_boundary(b, num_layers)
    per_layer = lora_params_per_layer(peft_model)
    layers = sorted(per_layer)
    top = max(layers)  # the adapter's highest LoRA layer: any b from there up is the full adapter
    sizes = SizeOf(adapter, peft_model)
    wanted = [-1, None] + sorted({b for b in boundaries if 0 <= b < top})
    chosen = {selection.describe(): (selection, origin) for selection, origin in selections}
    references = [list(e.references) for e in splits.test]
    requests = [boundary_variant(b, top) for b in wanted] + [Variant(name, selection) for name, (selection, _)
                                                              in chosen.items()] + list(extras)
    generated = generate_cached(engine, task, splits.test, requests, "test", out, generation, model_id, adapter,
                                 adapter_pairs(peft_model), progress)
    outputs = {name: g.texts for name, g in generated.items()}
    variants = []
    for b in wanted:
        name = variant_name(b, top)
        metrics = score(outputs[name], references, metric_options)
        params = 0 if b == -1 else sum(n for layer, n in per_layer.items() if b is None or layer <= b)
        variants.append(_variant_row(name, b, metrics, params, sizes.at(b, top), generated[name].file,
                                     _origin(b, top, origins), None if b == -1 else _boundary_selection(b)))
        if b is None:
            signature, rouge_signature = metrics["bleu_signature"], metrics["rouge_signature"]
    for name, (selection, origin) in chosen.items():
        metrics = score(outputs[name], references, metric_options)
        params = sum(m.num_params() for m in lora_modules(peft_model) if selection.keeps(m.layer, m.group))
        variants.append(_variant_row(name, None, metrics, params, sizes.of(selection),
                                     generated[name].file, origin, selection))
    significance = []
    for row in variants:
        if row["name"] != FULL:
            tests = paired_tests(outputs[row["name"]], outputs[FULL], references, metrics=("bleu", "rougeL"),
                                 n_resamples=bootstrap, seed=seed, options=metric_options)
            for test in tests.values():
                significance.append({**test, "a": row["name"], "b": FULL,
                                     "sentence": describe_significance(test, row["name"], FULL)})
    for extra in extras:
        metrics = score(outputs[extra.name], references, metric_options)
        variants.append(_variant_row(extra.name, None, metrics, adapter_params(extra.adapter),
                                     file_size(extra.adapter), generated[extra.name].file,
                                     "exported adapter (--adapters)"))
    examples = [{"input": e.input, "references": list(e.references), "outputs": {n: t[i] for n, t in outputs.items()}}
                for i, e in enumerate(splits.test[:5])]
    return {"variants": variants, "significance": significance, "examples": examples, "bleu_signature": signature,
            "rouge_signature": rouge_signature, "lora_params_total": sum(per_layer.values())}


def _boundary_selection(b: int | None) -> Selection:
    return Selection.full() if b is None else Selection.prefix(b)


def _origin(b: int | None, top: int, origins: dict[int, list[str]]) -> str:
    """Why a row is in the table: its b's origins, the full adapter's for any b from the top layer up."""
    if b == -1:
        found = origins.get(-1, [])
        return "; ".join(found) if found else REFERENCE_ORIGINS["base"]
    if b is None:
        found = [text for given, texts in sorted(origins.items()) if given >= top for text in texts]
        return joined(found) if found else REFERENCE_ORIGINS["full"]
    return joined(origins.get(b, [])) or "asked"


def joined(reasons: list[str]) -> str:
    """Distinct reasons in order, one "for comparison: " in front of those that share it."""
    reasons = list(dict.fromkeys(reasons))
    lead = "for comparison: "
    compared = [r.removeprefix(lead) for r in reasons if r.startswith(lead)]
    rest = [r for r in reasons if not r.startswith(lead)]
    return "; ".join(rest + ([lead + "; ".join(compared)] if compared else []))


def _variant_row(name, boundary, metrics: dict, params, size: tuple[float | None, str | None], hypotheses_file,
                 origin: str, selection: Selection | None = None) -> VariantRow:
    """One row of the table. `selection`: the LoRA of the loaded adapter it keeps (None: the base model or another
    adapter folder, which are no selection of it): recorded as Selection.to_json() and in words."""
    mb, how = size
    kept = {} if selection is None else {"selection": selection.to_json(), "description": selection.describe()}
    return {"name": name, "boundary": boundary, "origin": origin, **kept, "lora_params": params, "adapter_mb": mb,
            "adapter_mb_source": how,
            "metrics": {k: metrics[k] for k in ("bleu", "rouge1", "rouge2", "rougeL", "chrf")},
            "hypotheses_file": hypotheses_file}


class SizeOf:
    """On-disk adapter sizes (MB) per variant, and how each was found.

    "file": the adapter's own weights file. "export": the exact size of the safetensors file a peft export at
    that b writes, tensors in their stored dtype (computed by serialising them, nothing written).
    "estimate": LoRA parameters x the loaded dtype's bytes, only where the weights cannot be read (pickles).
    """

    def __init__(self, adapter, peft_model):
        self.adapter, self.model = Path(adapter), peft_model
        try:
            self.files = AdapterFiles.read(adapter)
        except LoraboundError:
            self.files = None

    def at(self, b: int | None, top: int) -> tuple[float | None, str | None]:
        if b == -1:
            return None, None
        if b is None or b >= top:
            return file_size(self.adapter)
        return self.of(Selection.prefix(b))

    def of(self, selection: Selection) -> tuple[float | None, str | None]:
        """The size of a peft export of `selection` (see at)."""
        if self.files is not None:
            return exported_bytes(self.files, selection) / 1e6, "export"
        params = sum(m.num_params() for m in lora_modules(self.model) if selection.keeps(m.layer, m.group))
        element = next(p for n, p in self.model.named_parameters() if "lora_" in n).element_size()
        return params * element / 1e6, "estimate"


def adapter_params(folder) -> int:
    return AdapterFiles.read(folder).lora_params()


def file_size(folder) -> tuple[float, str]:
    """The adapter's weights file size in MB (safetensors, else the pickle), measured."""
    folder = Path(folder)
    weights = folder / ADAPTER_WEIGHTS if (folder / ADAPTER_WEIGHTS).is_file() else folder / ADAPTER_PICKLE
    return weights.stat().st_size / 1e6, "file"


def selection_on_test(found: dict, engine, peft_model, task, splits, out: Path, generation, model_options, adapter,
                      progress, bootstrap: int, seed: int, metric_options) -> SelectionTest:
    """The chosen selection on test against the full adapter and the prefix of the same size (paired tests).

    Generated through SelectionGenerator like the search's candidates, until the evaluation table takes
    Selections (the lead then makes it a row of that table)."""
    chosen = Selection.from_json(found["selection"])
    prefix = Selection.from_json(found["compared_prefix"]["selection"])
    generator = SelectionGenerator(engine, peft_model, task, splits.test, out, generation,
                                   model_identity(model_options), adapter, adapter_pairs(peft_model), progress,
                                   split="test")
    texts = generator.texts(list(dict.fromkeys([chosen, prefix, Selection.full()])))
    references = [list(e.references) for e in splits.test]
    result = {"selection": found["selection"], "describe": chosen.describe(),
              "metrics": {k: v for k, v in score(texts[chosen], references, metric_options).items()
                          if k in ("bleu", "rougeL", "chrf")}, "against": {}}
    for name, other in (("full adapter", Selection.full()), (f"prefix {prefix.describe()}", prefix)):
        if other == chosen:
            continue
        result["against"][name] = paired_tests(texts[chosen], texts[other], references, metrics=("bleu", "rougeL"),
                                               n_resamples=bootstrap, seed=seed, options=metric_options)
    return result


def run_origins(found: dict, curves: dict, knee_fraction: float, asked: list[int], top: int) -> dict[int, list[str]]:
    """The boundaries `run` evaluates on test, each with why: chosen, the knee, asked, and every candidate the
    search scored on validation (the test-side curve: whether any boundary beats the full adapter on held-out
    data, whatever rule picks one).

    A chosen selection that is no prefix (per-module, greedy-drop) is evaluated apart (selection_on_test); its
    prefix of the same size is a row here."""
    b = found["boundary"]
    chosen = ("given with --boundary" if found["criterion"] == "boundary"
              else f"chosen by the search ({found['criterion']})")
    if b is None:
        b, chosen = found["compared_prefix"]["boundary"], "for comparison: prefix of the same size as the selection"
    origins: dict[int, list[str]] = {b: [chosen]}
    truncation = curves["truncation"]
    knee_b = knee(truncation, knee_fraction)
    origins.setdefault(knee_b, []).append(
        f"for comparison: knee of the curve ({knee_fraction:.0%} of the gain)" if raises_probability(truncation)
        else f"for comparison: {knee_label(truncation, knee_fraction)}")
    for given in asked:
        origins.setdefault(given, []).append("for comparison: asked with --boundaries")
    for candidate in found.get("candidates") or []:
        c = candidate.get("boundary")
        if c is not None and 0 <= c < top and candidate.get("vs_full") is not None:
            origins.setdefault(c, []).append("for comparison: a validation candidate (the test-side curve)")
    return origins
