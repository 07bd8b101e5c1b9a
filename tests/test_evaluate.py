"""Metrics, the paired bootstrap, and batched generation (against a naive one-prompt greedy loop)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import sacrebleu
import torch

from lorabound.errors import LoraboundError
from lorabound.metrics.scores import (COMBINED, MetricOptions, UnicodeTokenizer, available_bleu_tokenizers,
                                      describe_significance, paired_test, score, score_from_stats, segment_stats)
from lorabound.generation.decode import generate

SENTENCES = [
    "the cat sat on the mat", "a dog ran across the busy road", "we had fish and chips for dinner",
    "the train left the station at noon", "she plays the violin every morning", "rain is expected later today",
    "the museum opens at nine on sundays", "he forgot his keys in the car", "birds sing loudly in the spring",
    "the soup was too hot to eat", "our team won the final match", "coffee tastes better with fresh milk",
]


# --------------------------------------------------------------------------------------------
# score
# --------------------------------------------------------------------------------------------

def test_identical_texts_score_100():
    result = score(SENTENCES[:3], [[s] for s in SENTENCES[:3]])
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL"):
        assert result[key] == pytest.approx(100.0), key
    assert result["n"] == 3
    assert "nrefs:1" in result["bleu_signature"] and "nc:6" in result["chrf_signature"]


def test_disjoint_texts_score_0():
    result = score(["aaa bbb"], [["ccc ddd"]])
    for key in ("bleu", "rouge1", "rouge2", "rougeL", "chrf"):
        assert result[key] == pytest.approx(0.0), key


def test_hypothesis_equal_to_second_reference_scores_100():
    hyp = "the museum opens at nine on sundays"
    result = score([hyp], [["completely unrelated words here", hyp]])
    for key in ("bleu", "chrf", "rougeL"):
        assert result[key] == pytest.approx(100.0), key


def test_uneven_reference_counts_do_not_count_missing_refs_as_empty():
    # A short hypothesis: an empty padding reference (length 0) would be the "closest" reference length and
    # lift the brevity penalty. Repeating an example's own reference changes nothing in BLEU, so the right
    # answer for the uneven case is the score with the single reference duplicated.
    hyps = ["cat", "a dog ran across the road"]
    uneven = [["the cat sat"], ["a dog ran across the busy road", "a dog crossed the road"]]
    duplicated = [["the cat sat", "the cat sat"], uneven[1]]
    right = score(hyps, duplicated)
    got = score(hyps, uneven)
    assert got["bleu"] == pytest.approx(right["bleu"])
    assert got["chrf"] == pytest.approx(right["chrf"])
    assert got["rougeL"] == pytest.approx(right["rougeL"])
    wrong = sacrebleu.corpus_bleu(hyps, [["the cat sat", uneven[1][0]], ["", uneven[1][1]]]).score
    assert wrong != pytest.approx(right["bleu"])  # the case really tells the two paddings apart


def test_score_rejects_bad_input():
    with pytest.raises(LoraboundError):
        score(["a", "b"], [["a"]])
    with pytest.raises(LoraboundError):
        score(["a"], [[]])
    with pytest.raises(LoraboundError):
        score([], [])


# Real sentences in scripts rouge-score's own tokenizer (which keeps only [a-z0-9]) reduces to nothing.
NON_LATIN = {
    "russian": ["Кошка сидела на ковре у окна.", "Поезд ушёл со станции ровно в полдень.",
                "Мы ели рыбу с картошкой на ужин."],
    "chinese": ["猫坐在窗边的垫子上。", "火车正午离开了车站。", "我们晚饭吃了鱼和薯条。"],
    "greek": ["Η γάτα κάθισε στο χαλί δίπλα στο παράθυρο.", "Το τρένο έφυγε από τον σταθμό το μεσημέρι."],
    "arabic": ["جلست القطة على السجادة بجانب النافذة.", "غادر القطار المحطة عند الظهر."],
}


@pytest.mark.parametrize("language", sorted(NON_LATIN))
def test_identical_non_latin_text_scores_100(language):
    from rouge_score import rouge_scorer

    sentences = NON_LATIN[language]
    options = MetricOptions(bleu_tokenize="zh" if language == "chinese" else "13a")
    result = score(sentences, [[s] for s in sentences], options)
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL"):
        assert result[key] == pytest.approx(100.0), key
    # What lorabound scored before: rouge-score's default tokenizer finds no tokens at all.
    old = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert all(old.score(s, s)["rougeL"].fmeasure == 0.0 for s in sentences)


@pytest.mark.parametrize("language", sorted(NON_LATIN))
def test_non_latin_rouge_tells_better_from_worse(language):
    sentences = NON_LATIN[language]
    tokens = [UnicodeTokenizer().tokenize(s) for s in sentences]
    # Keep the first half of each sentence's tokens, then a word of another script: a partial match.
    joiner = "" if language == "chinese" else " "
    half = [joiner.join(t[: len(t) // 2]) + " zzz" for t in tokens]
    worse = score(half, [[s] for s in sentences])["rougeL"]
    assert 0.0 < worse < 100.0


def test_chinese_bleu_needs_a_chinese_tokenizer():
    sentences = NON_LATIN["chinese"]
    default = score(sentences, [[s] for s in sentences])
    chinese = score(sentences, [[s] for s in sentences], MetricOptions(bleu_tokenize="zh"))
    assert default["bleu"] < 1.0  # 13a sees each unspaced sentence as one word: no 2-grams, BLEU ~ 0
    assert chinese["bleu"] == pytest.approx(100.0)
    assert "tok:zh" in chinese["bleu_signature"] and "tok:13a" in default["bleu_signature"]
    assert chinese["rouge_signature"].startswith("rouge-score:") and "tok:unicode" in chinese["rouge_signature"]


def test_unicode_tokenizer_is_rouge_scores_own_on_english():
    from rouge_score import tokenizers

    texts = SENTENCES + ["Running quickly, the runners' shoes (size 10.5) weren't dry!", "A-B_c  D\tE"]
    default = tokenizers.DefaultTokenizer(use_stemmer=True)
    for text in texts:
        assert UnicodeTokenizer().tokenize(text) == default.tokenize(text), text
    assert UnicodeTokenizer().tokenize("Les chats sont allés") == ["les", "chat", "sont", "allés"]  # no stemming off ASCII


def test_unicode_tokenizer_splits_unspaced_scripts_and_keeps_marks():
    tokenizer = UnicodeTokenizer()
    assert tokenizer.tokenize("猫坐在垫子上。Hello 世界") == ["猫", "坐", "在", "垫", "子", "上", "hello", "世", "界"]
    assert tokenizer.tokenize("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]  # Devanagari vowel signs stay in the word
    assert tokenizer.tokenize("ＡＢＣ１２３") == ["abc123"]  # full-width forms are NFKC-normalised


def test_metric_options_refuse_unknown_or_missing_tokenizers():
    with pytest.raises(LoraboundError, match="--bleu-tokenize 'spm' is not a tokenizer .* choose one of 13a"):
        MetricOptions(bleu_tokenize="spm")
    assert {"13a", "intl", "zh", "char", "none"} <= set(available_bleu_tokenizers())
    if "ja-mecab" not in available_bleu_tokenizers():
        with pytest.raises(LoraboundError, match=r"pip install 'sacrebleu\[ja\]'"):
            MetricOptions(bleu_tokenize="ja-mecab")


# --------------------------------------------------------------------------------------------
# paired bootstrap
# --------------------------------------------------------------------------------------------

def _damaged(text: str) -> str:
    words = text.split()
    return " ".join(words[: len(words) // 2] + ["zzz"] * (len(words) - len(words) // 2))


def test_identical_systems_have_no_difference():
    refs = [[s] for s in SENTENCES]
    hyps = [_damaged(s) for s in SENTENCES]
    for metric in ("bleu", "rougeL", COMBINED):
        result = paired_test(hyps, list(hyps), refs, metric=metric, n_resamples=200)
        assert result["mean_diff"] == 0.0
        assert result["p_value"] == 1.0
        assert result["ci_low"] == 0.0 and result["ci_high"] == 0.0


def test_a_system_better_on_every_example_is_significant():
    refs = [[s] for s in SENTENCES * 3]
    better = [s for s in SENTENCES * 3]
    worse = [_damaged(s) for s in SENTENCES * 3]
    for metric in ("bleu", "rougeL", COMBINED):
        result = paired_test(better, worse, refs, metric=metric, n_resamples=1000, seed=1)
        assert result["p_value"] < 0.01, metric
        assert result["ci_low"] > 0, metric
        assert result["a_score"] > result["b_score"]
        assert result["mean_diff"] > 0
        reverse = paired_test(worse, better, refs, metric=metric, n_resamples=1000, seed=1)
        assert reverse["ci_high"] < 0 and reverse["p_value"] < 0.01


def test_bootstrap_is_deterministic_for_a_seed():
    refs = [[s] for s in SENTENCES]
    a = [_damaged(s) if i % 2 else s for i, s in enumerate(SENTENCES)]
    b = [_damaged(s) if i % 3 else s for i, s in enumerate(SENTENCES)]
    first = paired_test(a, b, refs, n_resamples=300, seed=7)
    assert paired_test(a, b, refs, n_resamples=300, seed=7) == first
    assert paired_test(a, b, refs, n_resamples=300, seed=8)["mean_diff"] != first["mean_diff"]
    assert first["n"] == len(SENTENCES) and first["n_resamples"] == 300 and first["seed"] == 7


MIXED = [s if i % 3 else s.upper() for i, s in enumerate(SENTENCES)] + NON_LATIN["russian"] \
    + NON_LATIN["chinese"] + NON_LATIN["greek"] + NON_LATIN["arabic"] + ["", "x", "a b . c , d !"]


@pytest.mark.parametrize("tokenize", ["13a", "intl", "zh", "char", "none"])
def test_bleu_statistics_give_sacrebleus_corpus_score_exactly(tokenize):
    from sacrebleu.metrics import BLEU

    hyps = [_damaged(s) if i % 2 else s[::-1] if i % 5 == 0 else s for i, s in enumerate(MIXED)]
    refs = [[s, MIXED[(i + 1) % len(MIXED)]] if i % 4 else [s] for i, s in enumerate(MIXED)]
    n = len(hyps)
    options = MetricOptions(bleu_tokenize=tokenize)
    stats = segment_stats("bleu", hyps, refs, options)

    def corpus(idx):
        sub_refs = [refs[i] for i in idx]
        depth = max(len(r) for r in sub_refs)
        streams = [[r[k] if k < len(r) else None for r in sub_refs] for k in range(depth)]
        return BLEU(tokenize=tokenize).corpus_score([hyps[i] for i in idx], streams).score

    assert score_from_stats("bleu", stats.sum(axis=0), n) == corpus(range(n))
    # a resample with repeated examples: the summed statistics give the corpus score of the repeated corpus
    idx = [0, 0, 3, 5, 5, 5, 11, 2, n - 1, n - 4, n - 4]
    assert score_from_stats("bleu", stats[idx].sum(axis=0), len(idx)) == corpus(idx)
    result = paired_test(hyps, MIXED, refs, n_resamples=10, options=options)
    assert result["a_score"] == corpus(range(n))
    assert result["a_score"] == score(hyps, refs, options)["bleu"]


def test_rouge_and_combined_bootstrap_agree_with_score():
    hyps = [_damaged(s) if i % 2 else s[::-1] for i, s in enumerate(SENTENCES)]
    refs = [[s, SENTENCES[(i + 1) % len(SENTENCES)]] for i, s in enumerate(SENTENCES)]
    scores = score(hyps, refs)
    rouge = paired_test(hyps, SENTENCES, refs, metric="rougeL", n_resamples=50, seed=3)
    bleu = paired_test(hyps, SENTENCES, refs, metric="bleu", n_resamples=50, seed=3)
    both = paired_test(hyps, SENTENCES, refs, metric=COMBINED, n_resamples=50, seed=3)
    assert rouge["a_score"] == pytest.approx(scores["rougeL"])
    assert both["a_score"] == pytest.approx((scores["bleu"] + scores["rougeL"]) / 2)
    # the same resamples for both metrics: the combined difference is the mean of the two, resample by resample
    assert both["mean_diff"] == pytest.approx((bleu["mean_diff"] + rouge["mean_diff"]) / 2)


def test_chrf_bootstrap_is_refused_plainly():
    with pytest.raises(LoraboundError, match="unknown paired-test metric 'chrf'; choose one of bleu, rougeL"):
        paired_test(["a"], ["b"], [["a"]], metric="chrf")
    with pytest.raises(LoraboundError, match="no per-example statistics for 'chrf'"):
        segment_stats("chrf", ["a"], [["a"]])
    with pytest.raises(LoraboundError, match="no score from statistics for 'chrf'"):
        score_from_stats("chrf", np.zeros(3), 1)


def test_describe_significance_is_honest_both_ways():
    drop = {"metric": "bleu", "a_score": 40.0, "b_score": 41.2, "mean_diff": -1.2, "ci_low": -2.3,
            "ci_high": -0.1, "p_value": 0.03}
    text = describe_significance(drop, "pruned (b=14)", "full adapter")
    assert text.startswith("pruned (b=14) scores 1.2 BLEU lower than full adapter")
    assert "-2.3 to -0.1" in text and "p = 0.030" in text
    assert "statistically significant at the 5% level" in text and "not" not in text
    same = dict(drop, a_score=41.6, ci_low=-0.8, ci_high=1.6, p_value=0.41, metric="rougeL")
    text = describe_significance(same, "pruned (b=14)", "full adapter")
    assert "0.4 ROUGE-L higher" in text and "not statistically significant (p = 0.41)" in text
    tiny = dict(drop, p_value=0.0001)
    assert "p < 0.001" in describe_significance(tiny, "x", "y")


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------

WORDS = ["<pad>", "<eos>", "<unk>", "\n", "the", "cat", "dog", "sat", "on", "mat", "a", "red", "blue",
         "ran", "far", "and", "big", "small"]


@pytest.fixture(scope="module")
def tiny():
    """A random 2-layer Llama and a word-level tokenizer in which "\\n" is a token of its own."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|[^\s]+"), behavior="removed", invert=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=None, eos_token_id=1, initializer_range=0.5)
    model = LlamaForCausalLM(config).eval()
    return model, tokenizer


PROMPTS = ["the cat", "a big red dog sat on the mat and ran far", "blue", "small cat sat", "the dog ran",
           "a red mat", "cat and dog and cat and dog on the blue mat", "far"]


def naive_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """One prompt, no padding, no cache: argmax of the full forward pass, token by token, until EOS."""
    return tokenizer.decode(naive_tokens(model, tokenizer, prompt, max_new_tokens), skip_special_tokens=True)


def naive_tokens(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    ids = tokenizer(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + new])).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return new


def test_batched_generation_matches_one_by_one_greedy(tiny):
    model, tokenizer = tiny
    raw = [naive_greedy(model, tokenizer, p, 12) for p in PROMPTS]
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3, progress=False)
    single = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=1, progress=False)
    expected = [r.split("\n", 1)[0].strip() for r in raw]
    assert batched.texts == expected
    assert single.texts == expected
    assert batched.n_prompt_truncated == 0
    assert any(expected), "the test model should produce some text"
    assert tokenizer.padding_side == "right" and tokenizer.truncation_side == "right"  # restored


def test_newline_stops_generation_early(tiny):
    model, tokenizer = tiny
    raw = {p: naive_greedy(model, tokenizer, p, 20) for p in PROMPTS}
    with_newline = [p for p, r in raw.items() if "\n" in r.strip()]
    assert with_newline, "the test model should emit a newline inside some output"
    prompt = with_newline[0]
    full = generate(model, tokenizer, [prompt], max_new_tokens=20, stop_at_newline=False, progress=False).texts[0]
    assert "\n" in full and full == raw[prompt].strip()

    calls = []
    hook = model.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        cut = generate(model, tokenizer, [prompt], max_new_tokens=20, progress=False).texts[0]
    finally:
        hook.remove()
    assert cut == raw[prompt].split("\n", 1)[0].strip()
    assert "\n" not in cut
    newline_id = tokenizer.convert_tokens_to_ids("\n")
    tokens_until_newline = naive_tokens(model, tokenizer, prompt, 20).index(newline_id) + 1
    assert len(calls) <= tokens_until_newline < 20  # stopped at the newline, not at max_new_tokens


def test_long_prompts_are_cut_from_the_left_and_counted(tiny):
    model, tokenizer = tiny
    prompts = ["the cat sat on the mat and the dog ran far", "blue mat"]
    result = generate(model, tokenizer, prompts, max_new_tokens=6, max_prompt_length=4, progress=False)
    assert result.n_prompt_truncated == 1
    kept = " ".join(prompts[0].split()[-4:])  # the last four words
    assert result.texts[0] == naive_greedy(model, tokenizer, kept, 6).split("\n", 1)[0].strip()
    assert result.texts[1] == naive_greedy(model, tokenizer, prompts[1], 6).split("\n", 1)[0].strip()


def test_generation_of_nothing(tiny):
    model, tokenizer = tiny
    assert generate(model, tokenizer, [], progress=False).texts == []


@pytest.mark.real
def test_real_model_batched_equals_single(real_model):
    model, tokenizer = real_model
    prompts = ["The capital of France is", "Translate to German: good morning\nGerman:",
               "List three colours:", "2 + 2 ="]
    batched = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=4, progress=False)
    single = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=1, progress=False)
    assert batched.texts == single.texts
    assert any(batched.texts)


def test_generation_through_a_peft_adapter(tiny):
    from peft import LoraConfig, get_peft_model

    base, tokenizer = tiny
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config).eval()
    expected = [naive_greedy(model, tokenizer, p, 8).split("\n", 1)[0].strip() for p in PROMPTS[:4]]
    got = generate(model, tokenizer, PROMPTS[:4], max_new_tokens=8, batch_size=4, progress=False)
    assert got.texts == expected
    with model.disable_adapter():  # the adapter really changes something
        plain = [naive_greedy(model, tokenizer, p, 8) for p in PROMPTS[:4]]
    assert plain != [naive_greedy(model, tokenizer, p, 8) for p in PROMPTS[:4]]


def test_generation_without_a_pad_token(tiny):
    model, tokenizer = tiny
    bare = copy.deepcopy(tokenizer)
    bare.pad_token = None
    assert bare.pad_token_id is None
    got = generate(model, bare, PROMPTS[:3], max_new_tokens=6, batch_size=3, progress=False)
    assert got.texts == [naive_greedy(model, tokenizer, p, 6).split("\n", 1)[0].strip() for p in PROMPTS[:3]]
    assert bare.pad_token is None  # left as it was
