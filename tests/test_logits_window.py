"""Training computes logits only from the first column that carries loss: the summed loss and
the gradients it gives must be those of the full logits."""

from __future__ import annotations

import torch

from comm_cli.compose import ComposedModel, MappingSpec
from comm_cli.losses import IGNORE_INDEX, next_token_loss
from comm_cli.training.models import batch_logits, first_loss_column
from tests.conftest import tiny_model


def _batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0  # right padding
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 6:10], labels[1, 8:], labels[2, 5:] = ids[0, 6:10], ids[1, 8:], ids[2, 5:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "augment_attention_mask": mask}


def test_first_loss_column_is_the_earliest_prediction_with_a_label():
    batch = _batch()
    assert first_loss_column(batch["labels"]) == 4  # position 4 predicts row 2's first label at 5
    assert first_loss_column(torch.full((2, 5), IGNORE_INDEX)) == 0


def test_loss_and_bridge_gradients_from_the_window_equal_the_full_logits():
    batch = _batch()
    composed = ComposedModel.from_models(
        tiny_model("llama"), tiny_model("qwen2", seed=1, width=16), MappingSpec(every=2)
    )
    for bridge in composed.bridges:
        torch.nn.init.normal_(bridge.o_proj.weight, std=0.05)
    start = first_loss_column(batch["labels"])
    results = []
    for keep_from in (0, start):
        composed.zero_grad()
        logits = batch_logits(composed, batch, composed=True, keep_from=keep_from)
        assert logits.shape[1] == batch["input_ids"].shape[1] - keep_from
        loss = next_token_loss(logits, batch["labels"][:, keep_from:], reduction="sum")
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in composed.bridge_parameters()]))
    (full, full_grads), (window, window_grads) = results
    torch.testing.assert_close(window, full)
    for a, b in zip(window_grads, full_grads):
        torch.testing.assert_close(a, b)
    plain = tiny_model("llama")
    whole = next_token_loss(batch_logits(plain, batch, composed=False), batch["labels"], reduction="sum")
    part = batch_logits(plain, batch, composed=False, keep_from=start)
    torch.testing.assert_close(next_token_loss(part, batch["labels"][:, start:], reduction="sum"), whole)
