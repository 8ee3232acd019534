"""The composition's forward pass: masks, padding, frozen bases, what runs and what trains."""

from __future__ import annotations

import pytest
import torch

from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
from tests.conftest import tiny_model

VOCAB = 64


def compose(anchor_family="llama", augment_family="gpt2", mask_mode="causal", zero_init=False, **bridge):
    anchor = tiny_model(anchor_family, width=48, layers=4)
    augment = tiny_model(augment_family, seed=1, width=32, layers=4)
    composed = ComposedModel.from_models(
        anchor,
        augment,
        MappingSpec(pairs=[[0, 0], [1, 2]]),
        BridgeConfig(num_heads=4, zero_init_output=zero_init, **bridge),
        mask_mode=mask_mode,
    )
    return composed, anchor


def random_ids(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pair", [("llama", "gpt2"), ("opt", "qwen3"), ("gpt_neox", "gemma2")])
def test_no_future_leak_in_causal_mode(pair):
    composed, _ = compose(*pair)
    ids = random_ids(2, 12)
    base = composed(ids).logits
    for t in (1, 5, 11):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] - 3 + 7) % (VOCAB - 3) + 3
        logits = composed(changed).logits
        assert torch.equal(logits[:, :t], base[:, :t]), f"position {t} leaked into earlier positions"
        assert not torch.allclose(logits[:, t:], base[:, t:])


def _padded(rows, side, pad=0):
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        n = len(row)
        sl = slice(0, n) if side == "right" else slice(length - n, length)
        ids[i, sl] = torch.tensor(row)
        mask[i, sl] = 1
    return ids, mask


@pytest.mark.parametrize("mask_mode", ["causal", "prompt"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pair", [("llama", "qwen2"), ("gpt2", "opt")])
def test_padding_gives_the_unpadded_logits(pair, side, mask_mode):
    composed, _ = compose(*pair, mask_mode=mask_mode)
    rows = [random_ids(1, n, seed=n)[0].tolist() for n in (9, 5, 7)]
    ids, mask = _padded(rows, side)
    logits = composed(ids, mask).logits
    for i, row in enumerate(rows):
        alone = composed(torch.tensor([row])).logits[0]
        real = logits[i][mask[i].bool()]
        torch.testing.assert_close(real, alone, atol=1e-5, rtol=0)


def test_prompt_mode_padding_with_a_separate_prompt_mask():
    """Right-padded prompt/completion batch: the augment reads only each row's prompt."""
    composed, _ = compose("llama", "qwen2", mask_mode="prompt")
    examples = [
        (random_ids(1, 4, 1)[0].tolist(), random_ids(1, 5, 2)[0].tolist()),
        (random_ids(1, 7, 3)[0].tolist(), random_ids(1, 2, 4)[0].tolist()),
    ]
    ids, mask = _padded([p + c for p, c in examples], "right")
    prompt_mask = torch.zeros_like(mask)
    for i, (p, _) in enumerate(examples):
        prompt_mask[i, : len(p)] = 1
    logits = composed(ids, mask, augment_attention_mask=prompt_mask).logits
    for i, (p, c) in enumerate(examples):
        alone_ids = torch.tensor([p + c])
        alone_prompt = torch.tensor([[1] * len(p) + [0] * len(c)])
        alone = composed(alone_ids, augment_attention_mask=alone_prompt).logits[0]
        torch.testing.assert_close(logits[i, : len(p) + len(c)], alone, atol=1e-5, rtol=0)


def test_prompt_mode_sees_the_whole_prompt_but_no_completion_token():
    composed, _ = compose("llama", "qwen2", mask_mode="prompt")
    ids = random_ids(1, 10)
    prompt_mask = torch.tensor([[1] * 6 + [0] * 4])
    base = composed(ids, augment_attention_mask=prompt_mask).logits
    later_prompt = ids.clone()
    later_prompt[0, 5] = (later_prompt[0, 5] - 3 + 1) % (VOCAB - 3) + 3
    # every anchor position reads all prompt positions, so position 2 changes
    assert not torch.allclose(
        composed(later_prompt, augment_attention_mask=prompt_mask).logits[:, 2], base[:, 2]
    )
    completion = ids.clone()
    completion[0, 8] = (completion[0, 8] - 3 + 1) % (VOCAB - 3) + 3
    # a completion token is never read by the augment: positions before it are unchanged
    torch.testing.assert_close(
        composed(completion, augment_attention_mask=prompt_mask).logits[:, :8], base[:, :8], atol=0, rtol=0
    )


def test_bridges_off_is_the_anchor_bit_for_bit():
    composed, anchor = compose()
    ids = random_ids(3, 10)
    with composed.bridges_disabled():
        off = composed(ids).logits
    assert torch.equal(off, anchor(ids).logits)
    assert not torch.allclose(composed(ids).logits, off)


def test_zero_initialised_output_starts_as_the_anchor():
    composed, anchor = compose(zero_init=True)
    ids = random_ids(2, 8)
    assert torch.equal(composed(ids).logits, anchor(ids).logits)


def test_gate_starts_closed_and_receives_gradient():
    composed, anchor = compose(zero_init=False, gate=True)
    ids = random_ids(2, 8)
    out = composed(ids, labels=ids)
    assert torch.equal(out.logits, anchor(ids).logits)
    out.loss.backward()
    assert all(b.gate.grad is not None and b.gate.grad.abs() > 0 for b in composed.bridges)


def test_gradients_reach_every_bridge_parameter_and_no_base_parameter():
    composed, _ = compose()
    composed.train()
    ids = random_ids(2, 10)
    composed(ids, labels=ids).loss.backward()
    for name, param in composed.bridges.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for name, param in list(composed.anchor.named_parameters()) + list(composed.augments.named_parameters()):
        assert not param.requires_grad and param.grad is None, name


def test_bases_stay_frozen_and_in_eval_mode():
    composed, _ = compose()
    composed.train()
    assert composed.training and all(b.training for b in composed.bridges)
    assert not any(m.training for m in composed.anchor.modules())
    assert not any(m.training for m in composed.augments.modules())
    counts = composed.parameter_counts()
    assert counts["trainable"] == sum(p.numel() for p in composed.bridges.parameters())
    assert counts["frozen"] == sum(p.numel() for p in composed.anchor.parameters()) + sum(
        p.numel() for p in composed.augments.parameters()
    )


def test_the_augment_never_runs_past_its_last_connected_layer():
    anchor = tiny_model("llama", width=48)
    augment = tiny_model("qwen2", seed=1, width=32, layers=4)
    calls = {"layers": [0] * 4, "lm_head": 0}
    for i, layer in enumerate(augment.model.layers):
        layer.register_forward_pre_hook(
            lambda m, a, i=i: calls["layers"].__setitem__(i, calls["layers"][i] + 1)
        )
    augment.lm_head.register_forward_pre_hook(lambda m, a: calls.__setitem__("lm_head", calls["lm_head"] + 1))
    composed = ComposedModel.from_models(anchor, augment, MappingSpec(pairs=[[0, 1], [1, 3]]))
    ids = random_ids(2, 8)
    composed(ids)
    composed.generate(ids[:, :4], max_new_tokens=3, eos_token_id=None)
    assert calls["layers"][0] > 0 and calls["layers"][1] > 0
    assert calls["layers"][2] == 0 and calls["layers"][3] == 0
    assert calls["lm_head"] == 0
    assert len(composed.augments[0].layers) == 2  # the later layers are not even held


def test_several_augments_each_with_their_own_connections():
    anchor = tiny_model("llama", width=48, layers=4)
    first = tiny_model("qwen2", seed=1, width=32, layers=2)
    second = tiny_model("gpt2", seed=2, width=64, layers=3)
    composed = ComposedModel.from_models(
        anchor,
        [first, second],
        [MappingSpec(pairs=[[0, 1], [1, 3]]), MappingSpec(pairs=[[2, 1], [0, 2]])],
        BridgeConfig(num_heads=4, zero_init_output=False),
    )
    assert composed.bridge_connections == [(0, 0, 1), (0, 1, 3), (1, 2, 1), (1, 0, 2)]
    ids = random_ids(2, 9)
    out = composed(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in composed.bridges.parameters())
    # each augment contributes: switching one bridge's output off changes the logits
    with torch.no_grad():
        composed.bridges[2].o_proj.weight.zero_()
    assert not torch.allclose(composed(ids).logits, out.logits)
    cached = composed.generate(ids[:, :4], max_new_tokens=3, eos_token_id=None)
    assert torch.equal(
        cached, composed.generate(ids[:, :4], max_new_tokens=3, eos_token_id=None, use_cache=False)
    )


def test_float32_bridges_on_bfloat16_bases():
    anchor = tiny_model("llama", width=48).to(torch.bfloat16)
    augment = tiny_model("qwen2", seed=1, width=32).to(torch.bfloat16)
    composed = ComposedModel.from_models(
        anchor, augment, MappingSpec(every=2), BridgeConfig(zero_init_output=False)
    )
    assert all(p.dtype == torch.float32 for p in composed.bridges.parameters())
    ids = random_ids(2, 8)
    out = composed(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in composed.bridges.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    composed, _ = compose()
    ids = random_ids(2, 10)
    composed(ids, labels=ids).loss.backward()
    expected = [p.grad.clone() for p in composed.bridges.parameters()]
    composed.zero_grad()
    composed.enable_gradient_checkpointing()
    composed(ids, labels=ids).loss.backward()
    for got, want in zip((p.grad for p in composed.bridges.parameters()), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_rotary_off_reproduces_the_papers_plain_cross_attention():
    composed, _ = compose(rotary=False)
    ids = random_ids(2, 8)
    assert torch.isfinite(composed(ids).logits).all()
    assert not composed.bridges[0].rotary


def test_anchor_and_augment_of_different_dtypes():
    anchor = tiny_model("llama", width=48).to(torch.bfloat16)
    augment = tiny_model("opt", seed=1, width=32)  # float32
    composed = ComposedModel.from_models(
        anchor, augment, MappingSpec(count=2), BridgeConfig(zero_init_output=False)
    )
    ids = random_ids(2, 8)
    out = composed(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    cached = composed.generate(ids[:, :4], max_new_tokens=3, eos_token_id=None)
    assert cached.shape == (2, 7)


def test_bridge_heads_default_to_the_anchors_and_are_recorded(tmp_path):
    """num_heads=None (the general default) takes the anchor's attention heads, as the paper does;
    the saved config records the number, so loading rebuilds the same bridges."""
    from comm_cli.compose.saving import read_composition_config

    anchor = tiny_model("llama", width=48, layers=4)
    augment = tiny_model("gpt2", seed=1, width=32, layers=4)
    composed = ComposedModel.from_models(anchor, augment, MappingSpec(pairs=[[0, 0]]), BridgeConfig())
    heads = anchor.config.num_attention_heads
    assert composed.config.bridge.num_heads == heads and composed.bridges[0].num_heads == heads
    composed.save_pretrained(tmp_path / "c")
    assert read_composition_config(tmp_path / "c").bridge.num_heads == heads


def test_an_anchor_whose_heads_do_not_divide_its_width_gets_the_nearest_divisor():
    from types import SimpleNamespace

    from comm_cli.compose.blocks import bridge_heads

    gemma_like = SimpleNamespace(hidden_size=2304, num_attention_heads=7)  # 2304 % 7 != 0
    assert bridge_heads(None, gemma_like) == 6 and bridge_heads(5, gemma_like) == 5
