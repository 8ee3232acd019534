"""Per-bridge diagnostics: what they measure on compositions whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
from comm_cli.compose.diagnostics import BridgeProbe, gradient_norms, summarise, weight_norms
from tests.conftest import tiny_model

VOCAB = 64


def compose(mask_mode="causal", **bridge):
    anchor = tiny_model("llama", width=48, layers=4)
    augment = tiny_model("gpt2", seed=1, width=32, layers=4)
    config = BridgeConfig(**{"num_heads": 4, "zero_init_output": False, **bridge})
    return ComposedModel.from_models(anchor, augment, MappingSpec(pairs=[[0, 0], [1, 2]]), config, mask_mode)


def random_ids(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mask_mode", ["causal", "prompt"])
def test_attention_weights_reproduce_the_bridge_output(mask_mode):
    model = compose(mask_mode)
    ids = random_ids(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: queries without keys, masked keys
    with torch.no_grad(), BridgeProbe(model) as probe:
        model(ids, mask)
    for bridge, call in zip(model.bridges, probe.calls):
        weights = bridge.attention_weights(
            call["anchor_states"], call["keys"], call["positions"], call["attn_mask"], call["is_causal"]
        )
        mixed = (weights @ call["values"]).transpose(1, 2).reshape(*call["anchor_states"].shape[:2], -1)
        expected = bridge.o_proj(mixed)
        if call["query_valid"] is not None:
            expected = expected * call["query_valid"][..., None]
        torch.testing.assert_close(expected, call["output"], atol=1e-5, rtol=1e-4)


def test_zero_output_start_reads_nothing_and_only_the_output_gets_a_gradient():
    """The plateau's mechanism: at step 0 the bridges add nothing, and W_O is the only weight of
    the attention that the loss moves."""
    model = compose(zero_init_output=True)
    ids = random_ids(2, 10)
    with BridgeProbe(model) as probe:
        logits = model(ids).logits
    logits.logsumexp(-1).mean().backward()
    for reading, grads in zip(probe.readings(), gradient_norms(model)):
        assert reading["output_ratio"] == 0.0
        assert grads["o"] > 0
        assert grads["q"] == grads["k"] == grads["v"] == grads["proj"] == 0.0
    assert all(norms["o"] == 0.0 for norms in weight_norms(model))


def test_uniform_attention_has_entropy_one_and_answer_mass_one_over_visible_keys():
    model = compose()
    for bridge in model.bridges:
        torch.nn.init.zeros_(bridge.q_proj.weight)  # every score 0: uniform over visible keys
    length = 6
    ids = random_ids(1, length)
    answer = torch.zeros(1, length, dtype=torch.bool)
    answer[0, 0] = True
    with torch.no_grad(), BridgeProbe(model) as probe:
        model(ids)
    reading = probe.readings(answer_keys=answer)[0]
    assert reading["entropy"] == pytest.approx(1.0, abs=1e-6)
    # causal: query i sees keys 0..i, so uniform attention puts 1/(i+1) on key 0
    expected = sum(1 / (i + 1) for i in range(length)) / length
    assert reading["answer_mass"] == pytest.approx(expected, abs=1e-6)
    assert reading["answer_mass_best_head"] == pytest.approx(expected, abs=1e-6)
    only_last = torch.zeros(1, length, dtype=torch.bool)
    only_last[0, -1] = True
    last = probe.readings(answer_keys=answer, answer_queries=only_last)[0]
    assert last["answer_mass"] == pytest.approx(1 / length, abs=1e-6)


def test_a_head_on_the_answer_has_mass_one_and_entropy_zero():
    model = compose(rotary=False, num_heads=1)
    ids = random_ids(1, 5)
    answer = torch.zeros(1, 5, dtype=torch.bool)
    answer[0, 0] = True
    with torch.no_grad():
        states = model.augment_states(0, ids, torch.ones_like(ids), torch.arange(5)[None])
        for bridge, (_, layer, _) in zip(model.bridges, model.bridge_connections):
            keys, _ = bridge.keys_values(states[layer], torch.arange(5)[None])
            # queries along the answer key's direction, scaled up: all mass on key 0
            bridge.q_proj.weight.zero_()
            bridge.scale = 1e4 / keys[0, 0, 0].norm().item() ** 2
            bridge.query_norm = None
            bridge.q_proj.bias = torch.nn.Parameter(keys[0, 0, 0].clone())
    with torch.no_grad(), BridgeProbe(model) as probe:
        model(ids)
    for reading in probe.readings(answer_keys=answer):
        assert reading["answer_mass"] == pytest.approx(1.0, abs=1e-4)
        # query 0 sees one key and is left out of the entropy
        assert reading["entropy"] == pytest.approx(0.0, abs=1e-3)


def test_padding_does_not_change_the_readings():
    model = compose()
    row = random_ids(1, 7)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], 1)
    padded_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    with torch.no_grad(), BridgeProbe(model) as probe:
        model(row)
    plain = probe.readings()
    with torch.no_grad(), BridgeProbe(model) as probe:
        model(padded, padded_mask)
    for a, b in zip(plain, probe.readings(query_mask=padded_mask)):
        assert a["output_ratio"] == pytest.approx(b["output_ratio"], rel=1e-4)
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-4)


def test_gate_and_flat_summary():
    model = compose(gate=True)
    for bridge in model.bridges:
        bridge.gate.data.fill_(0.5)
    with torch.no_grad(), BridgeProbe(model) as probe:
        model(random_ids(1, 4))
    readings = probe.readings()
    assert readings[0]["gate"] == pytest.approx(math.tanh(0.5))
    flat = summarise(readings)
    assert flat["bridge1/gate"] == pytest.approx(math.tanh(0.5))
    assert "bridge0/answer_mass" not in flat  # no answer positions named: not measured
    assert BridgeProbe(model).readings() == [None, None]  # nothing ran under it


def test_answer_keys_per_query():
    """Each query may have its own answer key (the n-th digit reads the n-th key): uniform
    attention puts 1/(i+1) on any one key that query i sees."""
    model = compose()
    for bridge in model.bridges:
        torch.nn.init.zeros_(bridge.q_proj.weight)
    ids = random_ids(1, 6)
    answer = torch.zeros(1, 6, 6, dtype=torch.bool)
    answer[0, 3, 1] = answer[0, 5, 4] = True  # query 3 reads key 1, query 5 reads key 4
    with torch.no_grad(), BridgeProbe(model) as probe:
        model(ids)
    reading = probe.readings(answer_keys=answer)[0]
    assert reading["answer_mass"] == pytest.approx((1 / 4 + 1 / 6) / 2, abs=1e-6)
