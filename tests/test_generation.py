"""KV-cached generation must equal an uncached token-by-token decode of the same composition."""

from __future__ import annotations

import pytest
import torch

from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
from comm_cli.compose.generation import to_left_padding
from tests.conftest import tiny_model

PAD, EOS = 0, 2


def compose(mask_mode="causal"):
    anchor = tiny_model("llama", width=48, layers=4)
    augment = tiny_model("gpt_neox", seed=1, width=32, layers=3)
    return ComposedModel.from_models(
        anchor,
        augment,
        MappingSpec(every=1),
        BridgeConfig(num_heads=4, zero_init_output=False),
        mask_mode=mask_mode,
    )


def batch_of_two():
    """Two prompts of different lengths, left padded."""
    g = torch.Generator().manual_seed(3)
    long, short = torch.randint(3, 64, (7,), generator=g), torch.randint(3, 64, (4,), generator=g)
    ids = torch.full((2, 7), PAD)
    mask = torch.zeros(2, 7, dtype=torch.long)
    ids[0], mask[0] = long, 1
    ids[1, 3:], mask[1, 3:] = short, 1
    return ids, mask


@pytest.mark.parametrize("mask_mode", ["causal", "prompt"])
def test_cached_greedy_equals_uncached_decode(mask_mode):
    composed = compose(mask_mode)
    ids, mask = batch_of_two()
    kwargs = dict(max_new_tokens=8, eos_token_id=None, return_dict=True, output_scores=True)
    cached = composed.generate(ids, mask, **kwargs)
    uncached = composed.generate(ids, mask, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.new_tokens.shape == (2, 8)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mask_mode", ["causal", "prompt"])
def test_batched_generation_equals_one_row_at_a_time(mask_mode):
    composed = compose(mask_mode)
    ids, mask = batch_of_two()
    batched = composed.generate(ids, mask, max_new_tokens=6, eos_token_id=None)
    for row in range(2):
        alone = ids[row][mask[row].bool()][None]
        single = composed.generate(alone, max_new_tokens=6, eos_token_id=None)
        assert torch.equal(batched[row, -6:], single[0, -6:])


def test_uncached_decode_is_the_full_forward_argmax():
    """The reference itself: each step's token is the argmax of a plain full-sequence forward."""
    composed = compose()
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    out = composed.generate(ids, max_new_tokens=4, eos_token_id=None)
    for step in range(4):
        prefix = out[:, : 5 + step]
        assert composed(prefix).logits[0, -1].argmax() == out[0, 5 + step]


def test_right_padded_prompts_generate_like_left_padded():
    composed = compose()
    ids, mask = batch_of_two()
    right_ids, right_mask = torch.full_like(ids, PAD), torch.zeros_like(mask)
    right_ids[0], right_mask[0] = ids[0], 1
    right_ids[1, :4], right_mask[1, :4] = ids[1, 3:], 1
    assert torch.equal(to_left_padding(right_ids, right_mask, PAD)[0], ids)
    left = composed.generate(ids, mask, max_new_tokens=4, eos_token_id=None)
    right = composed.generate(right_ids, right_mask, max_new_tokens=4, eos_token_id=None)
    assert torch.equal(left, right)


def test_finished_rows_are_padded_after_eos():
    composed = compose()
    ids, mask = batch_of_two()
    first = composed.generate(ids, mask, max_new_tokens=6, eos_token_id=None)
    # declare row 0's second generated token an eos: row 0 stops there, row 1 goes on
    eos = int(first[0, 8])
    out = composed.generate(ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=PAD, return_dict=True)
    new = out.new_tokens
    stop = (new[0] == eos).nonzero()[0].item()
    assert torch.all(new[0, stop + 1 :] == PAD)


def test_sampling_is_reproducible_and_respects_top_k():
    composed = compose()
    ids, mask = batch_of_two()
    kwargs = dict(max_new_tokens=6, eos_token_id=None, do_sample=True, temperature=0.8, top_k=5, top_p=0.9)
    a = composed.generate(ids, mask, generator=torch.Generator().manual_seed(1), **kwargs)
    b = composed.generate(ids, mask, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(a, b)
    # top_k=1 sampling is greedy
    greedy = composed.generate(ids, mask, max_new_tokens=6, eos_token_id=None)
    top1 = composed.generate(
        ids,
        mask,
        max_new_tokens=6,
        eos_token_id=None,
        do_sample=True,
        top_k=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(greedy, top1)


def test_generation_restores_training_mode():
    composed = compose()
    composed.train()
    composed.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    assert composed.training and all(b.training for b in composed.bridges)
