"""The bridge's initialisation and attention-scale options: what each promises at step 0."""

from __future__ import annotations

import math

import pytest
import torch

from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
from comm_cli.compose.bridge import Bridge, bridge_parameter_count
from comm_cli.compose.diagnostics import BridgeProbe, gradient_norms
from comm_cli.errors import ConfigError
from tests.conftest import tiny_model


def compose(**bridge):
    anchor = tiny_model("llama", width=48, layers=4)
    augment = tiny_model("gpt2", seed=1, width=32, layers=4)
    config = BridgeConfig(**{"num_heads": 4, **bridge})
    return ComposedModel.from_models(anchor, augment, MappingSpec(pairs=[[0, 0], [1, 2]]), config), anchor


def ids(length=10, seed=0):
    return torch.randint(3, 64, (2, length), generator=torch.Generator().manual_seed(seed))


def step0_gradients(model):
    tokens = ids()
    logits = model(tokens).logits
    logits.logsumexp(-1).mean().backward()
    return logits, gradient_norms(model)


@pytest.mark.parametrize(
    "options",
    [
        {"zero_init_output": False, "zero_init_value": True},
        {"zero_init_output": False, "gate": True, "gate_init": 0.0},
        {"qk_norm": True},
        {"logit_scale": 0.25},
    ],
)
def test_every_zero_start_is_the_anchor_at_step_0(options):
    model, anchor = compose(**options)
    logits, _ = step0_gradients(model)
    assert torch.equal(logits, anchor(ids()).logits)


def test_zero_value_start_sends_the_first_gradient_to_w_v_only():
    model, _ = compose(zero_init_output=False, zero_init_value=True)
    _, grads = step0_gradients(model)
    for g in grads:
        assert g["v"] > 0
        assert g["o"] == g["q"] == g["k"] == g["proj"] == 0.0


def test_gate_start_sends_the_first_gradient_to_the_gate_only():
    model, _ = compose(zero_init_output=False, gate=True)
    _, grads = step0_gradients(model)
    for g in grads:
        assert g["gate"] > 0
        assert g["o"] == g["q"] == g["k"] == g["v"] == 0.0


def test_gate_init_scales_the_output():
    plain, _ = compose(zero_init_output=False)
    gated, _ = compose(zero_init_output=False, gate=True, gate_init=0.3)
    for a, b in zip(plain.bridges, gated.bridges):
        b.load_state_dict({**a.state_dict(), "gate": b.gate.detach()})
    with torch.no_grad(), BridgeProbe(plain) as p, BridgeProbe(gated) as g:
        plain(ids())
        gated(ids())
    # the first bridge's inputs are the same in both (the second reads states the first changed)
    torch.testing.assert_close(g.calls[0]["output"], p.calls[0]["output"] * math.tanh(0.3))


def test_small_output_gain_scales_w_o():
    torch.manual_seed(0)
    full = Bridge(32, 48, BridgeConfig(num_heads=4, zero_init_output=False))
    torch.manual_seed(0)
    small = Bridge(32, 48, BridgeConfig(num_heads=4, zero_init_output=False, output_init_gain=0.01))
    torch.testing.assert_close(small.o_proj.weight, 0.01 * full.o_proj.weight)
    torch.testing.assert_close(small.q_proj.weight, full.q_proj.weight)  # nothing else moves


def test_qk_norm_bounds_the_attention_logits_whatever_the_input_scale():
    bridge = Bridge(32, 48, BridgeConfig(num_heads=4, qk_norm=True, rotary=False))
    states = 1000.0 * torch.randn(1, 7, 48)
    keys, _ = bridge.keys_values(1000.0 * torch.randn(1, 7, 32), torch.arange(7)[None])
    queries = bridge.queries(states, torch.arange(7)[None])
    logits = (queries @ keys.transpose(-1, -2)) * bridge.scale
    assert logits.abs().max() <= math.sqrt(bridge.head_dim) + 1e-4
    assert bridge_parameter_count(32, 48, BridgeConfig(num_heads=4, qk_norm=True)) == sum(
        p.numel() for p in bridge.parameters()
    )


def test_logit_scale_multiplies_the_logits():
    torch.manual_seed(0)
    one = Bridge(32, 48, BridgeConfig(num_heads=4))
    torch.manual_seed(0)
    flat = Bridge(32, 48, BridgeConfig(num_heads=4, logit_scale=1e-6))
    states, augment = torch.randn(1, 6, 48), torch.randn(1, 6, 32)
    positions = torch.arange(6)[None]
    keys, _ = one.keys_values(augment, positions)
    sharp = one.attention_weights(states, keys, positions, is_causal=True)
    uniform = flat.attention_weights(states, keys, positions, is_causal=True)
    expected = torch.tril(torch.ones(6, 6)) / torch.arange(1, 7)[:, None]
    torch.testing.assert_close(uniform[0, 0], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(sharp[0, 0], expected, atol=1e-2)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"gate": True}, "never trains"),
        ({"zero_init_value": True}, "zero_init_output=false"),
        ({"logit_scale": 0.0}, "logit_scale"),
    ],
)
def test_options_that_cannot_train_are_refused(options, words):
    with pytest.raises(ConfigError, match=words):
        BridgeConfig(**options)
