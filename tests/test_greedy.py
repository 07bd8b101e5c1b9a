"""Greedy drop: the removal path is the single-layer ablation re-measured after each removal, exactly."""

import pytest
import torch

from lorabound.analysis import curves as analysis
from lorabound.errors import LoraboundError
from lorabound.analysis.greedy import greedy_path, params_budget
from lorabound.lora.selection import Selection
from lorabound.lora.masking import keep_selection, lora_params_per_layer

from tiny import tiny_encoded, tiny_lora, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def direct_mean_prob(model, encoded, pad_token_id, layers) -> float:
    """Mean ground-truth probability with LoRA on `layers`, from whole-model forwards (float64 softmax)."""
    total, count = 0.0, 0
    for batch in analysis.batches(encoded, 3, pad_token_id):
        targets = analysis.Targets.from_labels(batch.labels)
        with keep_selection(model, Selection.layers(layers)):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = torch.log_softmax(logits[:, :-1][targets.rows, targets.positions].double(), -1)
        total += logp.gather(1, targets.tokens[:, None]).exp().sum().item()
        count += targets.tokens.numel()
    return total / count


def test_every_step_removes_the_layer_that_matters_least_and_scores_exactly(tok):
    model = tiny_lora(num_layers=4)
    encoded = tiny_encoded(tok)
    params = lora_params_per_layer(model)
    path = greedy_path(model, encoded, batch_size=3, pad_token_id=tok.pad_token_id, params_per_layer=params,
                       progress=False)
    steps = path["steps"]
    assert [s["kept"] for s in steps][0] == [0, 1, 2, 3] and steps[-1]["kept"] == []
    assert len(steps) == 5 and sorted(s["removed"] for s in steps[1:]) == [0, 1, 2, 3]
    for before, after in zip(steps, steps[1:]):
        # The removed layer is the one whose single-layer ablation, measured directly, leaves the most probability.
        direct = {layer: direct_mean_prob(model, encoded, tok.pad_token_id, [x for x in before["kept"] if x != layer])
                  for layer in before["kept"]}
        assert after["removed"] == max(direct, key=lambda layer: (direct[layer], layer))
        assert abs(after["mean_prob"] - direct[after["removed"]]) < 1e-6
        assert after["params_kept"] == sum(params[x] for x in after["kept"])
    assert abs(steps[0]["mean_prob"] - direct_mean_prob(model, encoded, tok.pad_token_id, [0, 1, 2, 3])) < 1e-6


def test_a_parameter_budget_stops_the_path_early(tok):
    model = tiny_lora(num_layers=4)
    params = lora_params_per_layer(model)
    path = greedy_path(model, tiny_encoded(tok), batch_size=8, pad_token_id=tok.pad_token_id,
                       params_per_layer=params, stop_at_params=params_budget(params, 0.5), progress=False)
    assert [len(s["kept"]) for s in path["steps"]] == [4, 3, 2]


def test_a_budget_below_every_layer_is_refused():
    with pytest.raises(LoraboundError, match="--keep-fraction 0.1 keeps fewer LoRA parameters than any one layer"):
        params_budget({0: 100, 1: 100, 2: 100, 3: 100}, 0.1)
    assert params_budget({0: 100, 1: 100, 2: 100, 3: 100}, 0.25) == 100


@pytest.mark.real
def test_real_model_greedy_path_matches_direct_ablation(real_model):
    """On SmolLM2-135M, LoRA on 4 of its 30 layers: the first removal is the layer whose direct single-layer
    ablation leaves the most probability, scored as a whole-model forward; a budget of half stops at 2 layers."""
    from tiny import real_sparse_lora

    model, tokenizer, encoded = real_sparse_lora(real_model, validation=3)
    params = lora_params_per_layer(model)
    path = greedy_path(model, encoded, batch_size=3, pad_token_id=tokenizer.pad_token_id, params_per_layer=params,
                       stop_at_params=params_budget(params, 0.5), progress=False)
    assert [len(s["kept"]) for s in path["steps"]] == [4, 3, 2]
    direct = {layer: direct_mean_prob(model, encoded, tokenizer.pad_token_id, [x for x in (0, 5, 17, 29) if x != layer])
              for layer in (0, 5, 17, 29)}
    first = path["steps"][1]
    assert first["removed"] == max(direct, key=lambda layer: (direct[layer], layer))
    assert abs(first["mean_prob"] - direct[first["removed"]]) < 1e-5
