"""The fast generation paths give the outputs of the plain ones.

- the token-id stop rule stops exactly where the text-based rule ("a newline after the first non-blank
  character") would;
- the greedy loop over the KV cache (finished rows leave the batch) gives model.generate's tokens;
- several LoRA variants in one batch (per-row module masks; boundaries, per-group selections, layer sets) give
  the outputs of separate runs.
"""

import copy
import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, StoppingCriteria,
                          StoppingCriteriaList)

from lorabound.generation import decode as generation, cache as generation_cache
from lorabound.generation.decode import StopRule, answer_line_ended, generate, generate_variants, newline_token_ids
from lorabound.lora.selection import Selection
from lorabound.lora.masking import adapter_pairs, keep_lora, keep_selection
from lorabound.lora.variants import Variant

from tiny import randomize_lora, tiny_llama, tiny_lora, tiny_tokenizer

PROMPTS = ["name: The Eagle, eatType: coffee shop", "Blue Spice is a cheap pub", "The", "food: French, area:",
           "Describe the restaurant.\nData: name: Blue Spice\nText:", "riverside", "a cheap pub in the city centre.",
           "name: Blue"]


# ---------------------------------------------------------------------------
# The stop rule on token ids
# ---------------------------------------------------------------------------

def _stops_text_rule(tokenizer, ids: list[int]) -> int | None:
    """The old rule: decode everything so far after every token; the first step at which the line has ended."""
    for k in range(1, len(ids) + 1):
        if answer_line_ended(tokenizer.decode(ids[:k], skip_special_tokens=True)):
            return k
    return None


def _stops_id_rule(rule: StopRule, ids: list[int]) -> int | None:
    for k in range(1, len(ids) + 1):
        if rule.done(ids[:k]):
            return k
    return None


def _tricky_pieces(tokenizer) -> list[list[int]]:
    """Token runs that make the rule hard: blank lines, odd whitespace, multi-byte characters cut in pieces."""
    texts = ["\n", "\n\n", " ", "  \n", "\t", "a", "The Eagle", " is", ".\n", "\u3000", "\u0085", "\u2028",
             "\u00a0", "é", "日本", "x\ny", "\r\n"]
    pieces = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    raw_bytes = [[i] for t in ("\u3000", "é", "\u0085") for i in tokenizer.encode(t, add_special_tokens=False)]
    special = [[tokenizer.eos_token_id]] if tokenizer.eos_token_id is not None else []
    return pieces + raw_bytes + special


def test_newline_ids_are_the_tokens_that_decode_to_a_newline():
    tokenizer = tiny_tokenizer()
    ids = newline_token_ids(tokenizer)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert len(newline) == 1 and newline[0] in ids
    assert tokenizer.encode("a", add_special_tokens=False)[0] not in ids
    assert all("\n" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("seed", range(3))
def test_id_rule_stops_where_the_text_rule_does(seed):
    tokenizer = tiny_tokenizer()
    rule = StopRule(tokenizer, eos_ids=[], stop_at_newline=True)
    pieces = _tricky_pieces(tokenizer)
    rng = random.Random(seed)
    stopped = 0
    for _ in range(300):
        ids = [i for _ in range(rng.randint(1, 8)) for i in rng.choice(pieces)]
        expected = _stops_text_rule(tokenizer, ids)
        assert _stops_id_rule(rule, ids) == expected, (ids, tokenizer.decode(ids))
        stopped += expected is not None
    assert 30 < stopped < 270, "the sequences should both stop and run on"


def test_leading_blank_lines_do_not_stop_a_row():
    tokenizer = tiny_tokenizer()
    rule = StopRule(tokenizer, eos_ids=[], stop_at_newline=True)
    ids = [i for t in ("\n", " \n", "\u3000", "\n", "Blue", "\n") for i in tokenizer.encode(t, add_special_tokens=False)]
    assert _stops_id_rule(rule, ids) == len(ids)  # only the newline after "Blue"


# ---------------------------------------------------------------------------
# The greedy loop against model.generate
# ---------------------------------------------------------------------------

def _hf_texts(model, tokenizer, prompts, max_new_tokens):
    """model.generate, one prompt at a time, with the old text-based stopping check: the reference outputs."""
    texts = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)])

        class TextStop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                text = tokenizer.decode(input_ids[0, ids.shape[1]:], skip_special_tokens=True)
                return torch.tensor([answer_line_ended(text)])

        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id,
                                 stopping_criteria=StoppingCriteriaList([TextStop()]))
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        texts.append(text.lstrip().split("\n", 1)[0].strip())
    return texts


def chatty(model, tokenizer, factor: float = 2.0):
    """Make newline, space and EOS likelier, so that rows stop at different steps (and some lines are blank)."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        for text in ("\n", " "):
            head.weight[tokenizer.encode(text, add_special_tokens=False)[0]] *= factor
        head.weight[tokenizer.eos_token_id] *= factor
    return model


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return chatty(tiny_llama(num_layers=3), tokenizer), tokenizer


def test_greedy_loop_equals_model_generate_with_rows_ending_apart(tiny, monkeypatch):
    model, tokenizer = tiny
    expected = _hf_texts(model, tokenizer, PROMPTS, 16)
    lengths = []
    real_done = StopRule.done
    monkeypatch.setattr(StopRule, "done", lambda self, ids: real_done(self, ids) and not lengths.append(len(ids)))
    got = generate(model, tokenizer, PROMPTS, max_new_tokens=16, batch_size=4, progress=False).texts
    assert got == expected
    assert len(set(lengths)) > 1, "rows should stop at different steps, so rows leave the batch"
    assert any(expected)


def test_generation_config_with_a_penalty_goes_through_model_generate(tiny):
    model, tokenizer = tiny
    penalised = copy.deepcopy(model)
    penalised.generation_config.repetition_penalty = 1.5
    assert generation._plain_greedy(model) and not generation._plain_greedy(penalised)
    expected = _hf_texts(penalised, tokenizer, PROMPTS[:4], 12)
    assert generate(penalised, tokenizer, PROMPTS[:4], max_new_tokens=12, batch_size=4, progress=False).texts == expected
    assert expected != _hf_texts(model, tokenizer, PROMPTS[:4], 12), "the penalty should change something"


# ---------------------------------------------------------------------------
# Several variants in one batch
# ---------------------------------------------------------------------------

VARIANTS = [Variant("base", None), Variant("b=0", Selection.layers([0])), Variant("b=1", Selection.layers([0, 1])),
            Variant("full")]


def _separate(model, tokenizer, variants, prompts, **settings):
    """One run per variant: the base model with the adapter off, a layer set with keep_lora (every module of those
    layers), any other Selection with keep_selection, the full adapter as loaded."""
    out = {}
    for v in variants:
        layers = v.selection.layers_of("attention") if v.selection is not None else None
        if v.selection is None:
            with model.disable_adapter():
                out[v.name] = generate(model, tokenizer, prompts, progress=False, **settings).texts
        elif v.selection.is_full:
            out[v.name] = generate(model, tokenizer, prompts, progress=False, **settings).texts
        elif v.selection == Selection.layers(layers or ()):
            with keep_lora(model, layers):
                out[v.name] = generate(model, tokenizer, prompts, progress=False, **settings).texts
        else:
            with keep_selection(model, v.selection):
                out[v.name] = generate(model, tokenizer, prompts, progress=False, **settings).texts
    return out


def _tiny_gpt2():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                                       eos_token_id=1, pad_token_id=0))
    return get_peft_model(model.eval(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]))


def _tiny_gemma():
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=8, sliding_window=4, eos_token_id=1, pad_token_id=0))
    return get_peft_model(model.eval(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_variants_in_one_batch_equal_separate_runs(arch, monkeypatch):
    tokenizer = tiny_tokenizer()
    if arch == "llama":
        model = tiny_lora(chatty(tiny_llama(num_layers=3), tokenizer))
    else:
        model = _tiny_gpt2() if arch == "gpt2" else _tiny_gemma()
        chatty(model, tokenizer)
        randomize_lora(model, seed=1, scale=0.5)
        model.eval()
    settings = dict(max_new_tokens=12, batch_size=3)
    assert generation._maskable_modules(model) is not None
    ends = []
    real_done = StopRule.done
    monkeypatch.setattr(StopRule, "done", lambda self, ids: real_done(self, ids) and not ends.append(len(ids)))
    batched = generate_variants(model, tokenizer, PROMPTS, VARIANTS, progress=False, **settings)
    separate = _separate(model, tokenizer, VARIANTS, PROMPTS, **settings)
    assert {k: r.texts for k, r in batched.items()} == separate
    assert len({tuple(t) for t in separate.values()}) == len(VARIANTS), "every variant should generate differently"
    assert len(set(ends)) > 1, "rows should leave the batch at different steps"


SELECTIONS = [Variant("base", None),
              Variant("attention 0..2, mlp 0", Selection.per_group({"attention": 2, "mlp": 0})),
              Variant("mlp 0..2", Selection.per_group({"mlp": 2})), Variant("layers 0,2", Selection.layers([0, 2])),
              Variant("full", Selection.full())]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_group_and_layer_set_variants_in_one_batch_equal_separate_runs(arch):
    """Per-module masks: variants that keep attention and MLP LoRA on different layers, or a non-contiguous
    layer set, share each batch and give the outputs of one run each with keep_selection."""
    tokenizer = tiny_tokenizer()
    if arch == "llama":
        model = tiny_lora(chatty(tiny_llama(num_layers=3), tokenizer))
    else:
        model = _tiny_gpt2()
        chatty(model, tokenizer)
        randomize_lora(model, seed=1, scale=0.5)
        model.eval()
    settings = dict(max_new_tokens=12, batch_size=4)
    batched = generate_variants(model, tokenizer, PROMPTS, SELECTIONS, progress=False, **settings)
    separate = {}
    for v in SELECTIONS:
        if v.selection is None:
            with model.disable_adapter():
                separate[v.name] = generate(model, tokenizer, PROMPTS, progress=False, **settings).texts
        elif v.selection.is_full:
            separate[v.name] = generate(model, tokenizer, PROMPTS, progress=False, **settings).texts
        else:
            with keep_selection(model, v.selection):
                separate[v.name] = generate(model, tokenizer, PROMPTS, progress=False, **settings).texts
    assert {k: r.texts for k, r in batched.items()} == separate
    assert len({tuple(t) for t in separate.values()}) == len(SELECTIONS), "every variant should generate differently"


def test_variants_one_by_one_when_masks_would_not_be_exact():
    tokenizer = tiny_tokenizer()
    model = tiny_lora(num_layers=3, use_dora=True)
    assert generation._maskable_modules(model) is None  # DoRA: the update is not lora_B(lora_A(x))
    batched = generate_variants(model, tokenizer, PROMPTS[:4], VARIANTS, max_new_tokens=8, batch_size=4,
                                progress=False)
    separate = _separate(model, tokenizer, VARIANTS, PROMPTS[:4], max_new_tokens=8, batch_size=4)
    assert {k: r.texts for k, r in batched.items()} == separate


def test_variant_masks_are_removed_and_adapters_restored():
    tokenizer = tiny_tokenizer()
    model = tiny_lora(num_layers=3)
    before = generate(model, tokenizer, PROMPTS[:3], max_new_tokens=8, progress=False).texts
    generate_variants(model, tokenizer, PROMPTS[:3], VARIANTS, max_new_tokens=8, progress=False)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    assert hooks == 0
    assert generate(model, tokenizer, PROMPTS[:3], max_new_tokens=8, progress=False).texts == before


def test_repeated_variant_names_are_refused():
    from lorabound.errors import LoraboundError

    with pytest.raises(LoraboundError, match="repeat"):
        generate_variants(tiny_lora(num_layers=2), tiny_tokenizer(), ["a"], [Variant("x", None), Variant("x")])


def test_variants_of_another_adapter_folder_or_old_spec_forms_are_refused(tmp_path):
    """Only selections of the loaded adapter share batches; the old (key, layers) tuples are no variants."""
    from lorabound.errors import LoraboundError

    model, tokenizer = tiny_lora(num_layers=2), tiny_tokenizer()
    with pytest.raises(LoraboundError, match="another adapter folder"):
        generate_variants(model, tokenizer, ["a"], [Variant("full"), Variant("other", adapter=tmp_path)])
    with pytest.raises(LoraboundError, match="takes lora.variants.Variant"):
        generate_variants(model, tokenizer, ["a"], [("full", None)])


@pytest.mark.parametrize("batched", [True, False])
def test_none_selection_is_the_base_model_never_the_full_adapter(batched):
    """Variant.selection None is the base model in generate_variants as everywhere: the outputs of the model with
    the adapter switched off, not those of the full adapter (which differ on this tiny LoRA)."""
    tokenizer = tiny_tokenizer()
    model = tiny_lora(chatty(tiny_llama(num_layers=3), tokenizer))
    settings = dict(max_new_tokens=8, batch_size=4)
    full = generate(model, tokenizer, PROMPTS, progress=False, **settings).texts
    with model.disable_adapter():
        base = generate(model, tokenizer, PROMPTS, progress=False, **settings).texts
    assert base != full, "the tiny adapter should change the outputs"
    both = generate_variants(model, tokenizer, PROMPTS, [Variant("none", None), Variant("full")], batched=batched,
                             progress=False, **settings)
    alone = generate_variants(model, tokenizer, PROMPTS, [Variant("none", None)], progress=False, **settings)
    assert both["none"].texts == base and alone["none"].texts == base
    assert both["full"].texts == full


# ---------------------------------------------------------------------------
# The real embedded model
# ---------------------------------------------------------------------------

@pytest.mark.real
def test_real_model_variants_in_one_batch_equal_separate_runs(real_model):
    model, tokenizer = real_model
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    randomize_lora(peft_model, seed=3, scale=0.02)
    peft_model.eval()
    prompts = ["Describe the restaurant.\nData: name: The Eagle, food: French\nText:", "The capital of France is",
               "List three colours:", "Translate to German: good morning\nGerman:", "2 + 2 ="]
    variants = [Variant("base", None), Variant("b=9", Selection.layers(range(10))),
                Variant("b=19", Selection.layers(range(20))), Variant("full")]
    settings = dict(max_new_tokens=16, batch_size=5)
    batched = generate_variants(peft_model, tokenizer, prompts, variants, progress=False, **settings)
    separate = _separate(peft_model, tokenizer, variants, prompts, **settings)
    assert {k: r.texts for k, r in batched.items()} == separate
    assert len({tuple(t) for t in separate.values()}) > 1
    assert separate["base"] == _hf_texts(model, tokenizer, prompts, 16)


@pytest.mark.real
def test_real_tokenizer_id_rule_stops_where_the_text_rule_does(real_model):
    _, tokenizer = real_model
    rule = StopRule(tokenizer, eos_ids=[], stop_at_newline=True)
    pieces = _tricky_pieces(tokenizer)
    rng = random.Random(0)
    for _ in range(300):
        ids = [i for _ in range(rng.randint(1, 8)) for i in rng.choice(pieces)]
        assert _stops_id_rule(rule, ids) == _stops_text_rule(tokenizer, ids), ids


def test_pipeline_generates_boundaries_that_name_one_variant_once(tmp_path, monkeypatch):
    from lorabound.generation import engines
    from lorabound.generation.engines import HFEngine
    from lorabound.pipeline import GenerationOptions

    from tiny import tiny_task

    model, tokenizer, task = tiny_lora(num_layers=2), tiny_tokenizer(), tiny_task()
    model.save_pretrained(tmp_path / "adapter")  # the cache key holds the adapter's content
    engine = HFEngine(model, tokenizer, max_new_tokens=4, batch_size=16, stop_at_newline=True)
    asked = []
    real = engines.generate_variants
    monkeypatch.setattr(engines, "generate_variants",
                        lambda m, t, p, variants, **k: asked.append([v.name for v in variants]) or real(m, t, p, variants, **k))

    def generate(boundaries):
        requests = {b: generation_cache.boundary_variant(b, 1) for b in boundaries}
        out = generation_cache.generate_cached(engine, task, task.examples[:3], list(requests.values()), "test", tmp_path,
                                        GenerationOptions(max_new_tokens=4), {"model": "tiny"}, tmp_path / "adapter",
                                        adapter_pairs(model), False)
        return {b: out[r.name].texts for b, r in requests.items()}

    texts = generate([None, 1, -1, 0])
    assert asked == [["full adapter", "base model", "pruned (b=0)"]]  # b = 1 is the top LoRA layer: the full adapter
    assert texts[None] == texts[1] and set(texts) == {None, 1, -1, 0}
    again = generate([0, -1])
    assert asked == [["full adapter", "base model", "pruned (b=0)"]]  # read back from the files
    assert again == {0: texts[0], -1: texts[-1]}


def test_equal_selections_share_cached_generations_and_different_ones_never_do(tmp_path, monkeypatch):
    """The cache key holds the selection stated on the adapter's own modules, not its name or how it was asked."""
    from lorabound.generation import engines
    from lorabound.generation.engines import HFEngine
    from lorabound.pipeline import GenerationOptions
    from lorabound.lora.variants import Variant

    from tiny import tiny_task

    model, tokenizer, task = tiny_lora(num_layers=3), tiny_tokenizer(), tiny_task()
    model.save_pretrained(tmp_path / "adapter")
    engine = HFEngine(model, tokenizer, max_new_tokens=4, batch_size=16, stop_at_newline=True)
    asked = []
    real = engines.generate
    monkeypatch.setattr(engines, "generate", lambda *a, **k: asked.append(1) or real(*a, **k))

    def generate(variant: Variant):
        out = generation_cache.generate_cached(engine, task, task.examples[:3], [variant], "test", tmp_path,
                                        GenerationOptions(max_new_tokens=4), {"model": "tiny"}, tmp_path / "adapter",
                                        adapter_pairs(model), False)
        return out[variant.name]

    first = generate(Variant.at_boundary("pruned (b=1)", 1))
    same = generate(Variant("attention 0..1, mlp 0..1", Selection.per_group({"attention": 1, "mlp": 1})))
    assert len(asked) == 1 and same.texts == first.texts  # read back, not generated again
    files = {first.file}
    for name, selection in [("attention 0..1", Selection.per_group({"attention": 1, "mlp": -1})),
                            ("mlp 0..1", Selection.per_group({"mlp": 1})), ("layers 0,2", Selection.layers([0, 2]))]:
        calls = len(asked)
        result = generate(Variant(name, selection))
        assert len(asked) == calls + 1 and result.file not in files  # a new variant: generated, its own file
        files.add(result.file)
        with keep_selection(model, selection):
            assert result.texts == generate_plain(model, tokenizer, task)


def generate_plain(model, tokenizer, task):
    return generate(model, tokenizer, [task.prompt(e) for e in task.examples[:3]], max_new_tokens=4,
                    progress=False).texts
