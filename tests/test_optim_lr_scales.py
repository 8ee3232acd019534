"""Parameter groups with their own learning-rate multiples (optimizer lr_scales)."""

from __future__ import annotations

import pytest
import torch

from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
from comm_cli.errors import ConfigError
from comm_cli.schema import OptimizerConfig, SchedulerConfig
from comm_cli.training.optim import build_optimizer, build_scheduler, parameter_groups
from tests.conftest import tiny_model


def composition():
    anchor = tiny_model("llama", width=48, layers=4)
    augment = tiny_model("gpt2", seed=1, width=32, layers=4)
    config = BridgeConfig(num_heads=4, zero_init_output=False, norm=True)
    return ComposedModel.from_models(anchor, augment, MappingSpec(pairs=[[0, 0], [1, 2]]), config)


def optimizer_config(lr_scales=None):
    cfg = OptimizerConfig(name="adamw", lr=1e-3)
    if lr_scales is not None:
        cfg.lr_scales = lr_scales  # what optimizer.lr_scales sets where the config has the key
    return cfg


def test_without_scales_the_groups_are_decay_and_no_decay():
    model = composition()
    groups = parameter_groups(model.named_parameters(), 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all("lr" not in g for g in groups)
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim < 2 for p in groups[1]["params"])


def test_the_first_adam_step_moves_scaled_weights_by_their_multiple():
    """Adam's first step moves every weight by lr * sign(gradient): W_Q by 3e-3, W_K by 1e-3."""
    model = composition()
    optimizer = build_optimizer(model, optimizer_config({"q_proj": 3.0}))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    moved = {
        n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if n in before
    }
    for name, delta in moved.items():
        expected = 3e-3 if ".q_proj." in name else 1e-3
        assert delta == pytest.approx(expected, rel=1e-3), name


def test_the_schedule_scales_every_group_alike():
    model = composition()
    optimizer = build_optimizer(model, optimizer_config({"q_proj": 3.0, "k_proj": 3.0}))
    scheduler = build_scheduler(optimizer, SchedulerConfig(name="cosine", warmup_steps=2), 10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    rates = sorted({round(g["lr"] / scheduler.get_last_lr()[0], 6) for g in optimizer.param_groups})
    assert rates == [1.0, 3.0]


def test_a_scale_that_names_no_parameter_is_refused():
    with pytest.raises(ConfigError, match="q_prj"):
        build_optimizer(composition(), optimizer_config({"q_prj": 3.0}))
    with pytest.raises(ConfigError, match="> 0"):
        build_optimizer(composition(), optimizer_config({"q_proj": 0.0}))
