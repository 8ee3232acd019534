"""The anchor's frozen prefix, computed once: replayed states give the computed loss and
gradients, the prefix is never run while replaying, a prepare-only run builds the cache that
later runs read, and a training run with it follows the same curve (CALM and LoRA)."""

from __future__ import annotations

import pytest
import torch

from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
from comm_cli.compose.masks import positions_from_mask
from comm_cli.compose.prefix import AnchorPrefix, decoder_layers, prefix_states, trainable_prefix_length
from comm_cli.errors import ConfigError
from tests.conftest import tiny_model
from tests.helpers import base_args, build_workspace, max_abs_diff, run_train, trainable_weights


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


@pytest.mark.parametrize("pairs", [[[0, 1], [2, 3]], [[2, 3]]])
def test_replayed_prefix_gives_the_computed_loss_and_gradients(pairs):
    lowest = min(b for _, b in pairs)
    anchor, augment = tiny_model("llama", width=48, layers=4), tiny_model("qwen2", seed=1, width=32, layers=3)
    model = ComposedModel.from_models(
        anchor, augment, MappingSpec(pairs=pairs), BridgeConfig(zero_init_output=False)
    )
    ids, mask, labels = _batch()

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(ids, mask, labels=labels, return_logits=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    live_loss, live_grads = loss_and_grads()
    layers = decoder_layers(model.anchor)
    states = prefix_states(
        model.anchor,
        layers,
        lowest + 1,
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions_from_mask(mask),
    )
    prefix = AnchorPrefix(layers, lowest + 1)
    prefix.probe(model.anchor)
    ran = []
    for layer in list(layers)[: lowest + 1]:
        layer.self_attn.register_forward_pre_hook(lambda m, a: ran.append(1))
    with prefix.given(states):
        replay_loss, replay_grads = loss_and_grads()
    assert not ran  # the replayed layers computed nothing (the bridge hook on the last still ran)
    torch.testing.assert_close(replay_loss, live_loss, atol=1e-6, rtol=0)
    for name in live_grads:
        torch.testing.assert_close(replay_grads[name], live_grads[name], atol=1e-6, rtol=1e-5)
    # outside given(), the layers compute again
    torch.testing.assert_close(model(ids, mask, labels=labels, return_logits=False).loss, live_loss)


def test_lora_prefix_is_the_layers_below_the_first_adapted_one():
    from peft import LoraConfig, get_peft_model

    anchor = tiny_model("llama", width=48, layers=4)
    model = get_peft_model(
        anchor, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[2, 3])
    )
    layers = decoder_layers(model)
    assert trainable_prefix_length(layers, model.get_input_embeddings()) == 2
    ids, mask, labels = _batch(1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    states = prefix_states(
        model, layers, 2, input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)
    )
    prefix = AnchorPrefix(layers, 2)
    prefix.probe(model)
    with prefix.given(states):
        replayed = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    torch.testing.assert_close(replayed[mask.bool()], logits[mask.bool()], atol=1e-5, rtol=0)


def test_a_trained_embedding_leaves_no_prefix_and_a_prefix_is_installed_once():
    anchor = tiny_model("llama", width=48, layers=4)
    layers = decoder_layers(anchor)
    assert trainable_prefix_length(layers, anchor.get_input_embeddings()) == 0
    anchor.requires_grad_(False)
    assert trainable_prefix_length(layers, anchor.get_input_embeddings()) == 4
    with pytest.raises(ConfigError, match="1..4"):
        AnchorPrefix(layers, 5)
    AnchorPrefix(layers, 2)
    with pytest.raises(ConfigError, match="once"):
        AnchorPrefix(layers, 2)


COMMON = ["trainer.epochs=2", "trainer.max_steps=null", "trainer.save_every=null", "trainer.eval_every=null",
          "trainer.log_every=1"]  # fmt: skip


def _losses(run_dir):
    return [
        float(line.rsplit(" ", 1)[-1])
        for line in (run_dir / "train.log").read_text().splitlines()
        if " loss " in line and "step " in line and "validation" not in line
    ]


@pytest.mark.parametrize("method", ["calm", "lora"])
def test_training_with_the_cached_prefix_follows_the_same_curve_and_runs_share_it(
    tmp_path_factory, tmp_path, method
):
    ws = build_workspace(tmp_path_factory.mktemp("ws"))
    extra = ["mapping=pairs", "mapping.every=null", "mapping.pairs=[[0,1],[1,3]]"] if method == "calm" else [
        "method=lora", "method.lora.layers=[2,3]", "method.lora.target_modules=[q_proj,v_proj]"]  # fmt: skip
    shared = tmp_path / "prefix_cache"
    cached = (
        COMMON + extra + ["trainer.cache_anchor_prefix=true", f"trainer.anchor_prefix_cache_dir={shared}"]
    )
    assert run_train(base_args(ws, tmp_path, "live") + COMMON + extra) == 0
    assert run_train(base_args(ws, tmp_path, "prep") + cached + ["trainer.prepare_only=true"]) == 0
    assert "cached the anchor's first 2 layers" in (tmp_path / "prep" / "train.log").read_text()
    assert (shared / "manifest.json").is_file()
    assert not (tmp_path / "prep" / "checkpoints").exists()  # prepared, no step taken
    assert not any((tmp_path / "prep" / d).exists() for d in ("composition", "adapter"))
    assert run_train(base_args(ws, tmp_path, "first") + cached) == 0
    assert (
        "reusing the anchor's cached prefix states (2 layers)"
        in (tmp_path / "first" / "train.log").read_text()
    )
    live, first = _losses(tmp_path / "live"), _losses(tmp_path / "first")
    assert len(live) == len(first) > 100
    assert max(abs(a - b) for a, b in zip(live, first)) < 1e-4
    weights = (
        "composition/composition_model.safetensors"
        if method == "calm"
        else "adapter/adapter_model.safetensors"
    )
    assert (
        max_abs_diff(
            trainable_weights(tmp_path / "live" / weights), trainable_weights(tmp_path / "first" / weights)
        )
        < 1e-4
    )


def test_a_prefix_longer_than_the_frozen_layers_is_one_clear_error(tmp_path_factory, tmp_path, capsys):
    ws = build_workspace(tmp_path_factory.mktemp("ws"))
    args = base_args(ws, tmp_path, "bad") + [
        "mapping=pairs", "mapping.every=null", "mapping.pairs=[[1,1]]", "trainer.cache_anchor_prefix=true", "trainer.anchor_prefix_layers=3"]  # fmt: skip
    assert run_train(args) != 0
    assert (
        "trainer.anchor_prefix_layers=3, but only the anchor's first 2 layers are frozen"
        in capsys.readouterr().err
    )
    full = base_args(ws, tmp_path, "full") + ["method=full", "trainer.cache_anchor_prefix=true"]
    assert run_train(full) != 0
    assert "no frozen prefix exists" in capsys.readouterr().err


def test_a_composition_and_lora_share_one_prefix_cache(tmp_path_factory, tmp_path):
    """What make demo-real relies on: a cache prepared by a CALM config serves a LoRA run."""
    ws = build_workspace(tmp_path_factory.mktemp("ws"))
    shared = tmp_path / "prefix_cache"
    common = ["trainer.max_steps=2", "trainer.cache_anchor_prefix=true", f"trainer.anchor_prefix_cache_dir={shared}",
              "trainer.anchor_prefix_layers=2"]  # fmt: skip
    calm = ["mapping=pairs", "mapping.every=null", "mapping.pairs=[[1,2]]", "trainer.prepare_only=true"]
    assert run_train(base_args(ws, tmp_path, "calm") + common + calm) == 0
    lora = ["method=lora", "method.lora.layers=[2,3]", "method.lora.target_modules=[q_proj,v_proj]"]
    assert run_train(base_args(ws, tmp_path, "lora") + common + lora) == 0
    assert (
        "reusing the anchor's cached prefix states (2 layers)"
        in (tmp_path / "lora" / "train.log").read_text()
    )
