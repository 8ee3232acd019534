"""Optimizer and learning-rate schedule over the trainable parameters only.

Weight decay applies to matrices (projections), never to biases, norms or gates, as is usual
for transformers. Schedules come from ``transformers.get_scheduler``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from comm_cli.errors import ConfigError
from comm_cli.schema import OptimizerConfig, SchedulerConfig


def parameter_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, param in named_params:
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """An optimizer over ``model``'s trainable parameters (``requires_grad``) only."""
    groups = parameter_groups(model.named_parameters(), cfg.weight_decay)
    if not any(group["params"] for group in groups):
        raise ConfigError("the model has no trainable parameters: check method and the bridge settings")
    # cfg.name is one of schema.OPTIMIZERS: the schema's value rules checked it before any model loaded
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=cfg.lr, relative_step=False, scale_parameter=False, warmup_init=False)


def warmup_steps(cfg: SchedulerConfig, total_steps: int) -> int:
    if cfg.warmup_steps:
        return int(cfg.warmup_steps)
    return int(math.ceil(cfg.warmup_ratio * total_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int):
    from transformers import get_scheduler

    name = cfg.name  # one of schema.SCHEDULERS (checked before any model loaded)
    warmup = warmup_steps(cfg, total_steps)
    if name == "cosine" and cfg.min_lr_ratio > 0:
        return get_scheduler(
            "cosine_with_min_lr",
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total_steps,
            scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_ratio},
        )
    if name == "constant":
        name = "constant_with_warmup" if warmup else "constant"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
