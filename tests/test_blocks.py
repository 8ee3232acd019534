"""Decoder-block discovery across architectures, and the error for an unknown one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from comm_cli.compose import ComposedModel, MappingSpec, ModelSpec, find_blocks
from comm_cli.errors import ModelLoadError, UnsupportedModelError
from tests.conftest import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_are_found_for_every_supported_family(family):
    model = tiny_model(family, layers=3)
    blocks = find_blocks(model)
    assert len(blocks.layers) == 3
    assert blocks.layers is getattr(blocks.parent, blocks.attr)


class _OddConfig:
    model_type = "odd_lm"
    num_hidden_layers = 2
    hidden_size = 8


class OddForCausalLM(nn.Module):
    """A causal LM whose blocks live somewhere comm does not look."""

    def __init__(self):
        super().__init__()
        self.config = _OddConfig()
        self.trunk = nn.Module()
        self.trunk.stack = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])


def test_unsupported_model_names_its_class_and_the_fix():
    with pytest.raises(UnsupportedModelError) as err:
        find_blocks(OddForCausalLM())
    message = str(err.value)
    assert "OddForCausalLM" in message and "odd_lm" in message
    assert "block_path" in message


def test_block_path_points_comm_at_an_unknown_layout():
    model = OddForCausalLM()
    assert find_blocks(model, "trunk.stack").layers is model.trunk.stack
    with pytest.raises(UnsupportedModelError, match="block_path 'trunk.nope' does not name"):
        find_blocks(model, "trunk.nope")


def test_block_path_override_in_a_composition():
    anchor, augment = tiny_model("llama"), tiny_model("qwen2", seed=1)
    composed = ComposedModel.from_models(
        anchor,
        augment,
        MappingSpec(every=2),
        anchor_spec=ModelSpec("<in-memory>", block_path="model.layers"),
        augment_specs=[ModelSpec("<in-memory>", block_path="model.layers")],
    )
    assert composed.bridge_connections == [(0, 1, 1), (0, 3, 3)]


def test_unknown_model_path_is_a_clear_error(tmp_path):
    from comm_cli.compose.loading import load_causal_lm

    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="does not exist: give an existing model directory or a hub id"):
        load_causal_lm(ModelSpec(str(missing)), "anchor model")


def test_unknown_hub_id_is_a_clear_error():
    from comm_cli.compose.loading import load_model_config

    with pytest.raises(ModelLoadError, match="cannot load anchor model 'no-such-org/no-such-model'"):
        load_model_config(ModelSpec("no-such-org/no-such-model"), "anchor model")


@pytest.mark.parametrize("index", range(len(FAMILIES)))
def test_architecture_matrix(index):
    """Every family as anchor, the next family as augment, at a different width and depth."""
    anchor_family = FAMILIES[index]
    augment_family = FAMILIES[(index + 1) % len(FAMILIES)]
    anchor = tiny_model(anchor_family, width=48, layers=4, heads=4)
    augment = tiny_model(augment_family, seed=1, width=32, layers=3, heads=4)
    composed = ComposedModel.from_models(anchor, augment, MappingSpec(pairs=[[0, 1], [2, 3]]))
    for bridge in composed.bridges:
        bridge.reset_parameters(zero_init_output=False)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(index))
    out = composed(ids, labels=ids)
    assert out.logits.shape == (2, 9, 64)
    assert torch.isfinite(out.loss)
    with composed.bridges_disabled():
        plain = composed(ids).logits
    assert torch.equal(plain, anchor(ids).logits)
    assert not torch.allclose(out.logits, plain)
    # no future leak: a change at position 6 leaves positions < 6 unchanged
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1 - 3) % 61 + 3
    out2 = composed(changed)
    assert torch.allclose(out2.logits[:, :6], out.logits[:, :6], atol=1e-6)
    # cached greedy generation matches the uncached decode
    cached = composed.generate(
        ids[:, :5], max_new_tokens=4, eos_token_id=None, return_dict=True, output_scores=True
    )
    uncached = composed.generate(
        ids[:, :5], max_new_tokens=4, eos_token_id=None, use_cache=False, return_dict=True, output_scores=True
    )
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        assert torch.allclose(a, b, atol=1e-4)
