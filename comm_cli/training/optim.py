"""Optimizer and learning-rate schedule over the trainable parameters only.

Weight decay applies to matrices (projections), never to biases, norms or gates, as is usual
for transformers. ``lr_scales`` (``optimizer.lr_scales`` where the config has it) gives some
parameters their own learning rate, a multiple of ``optimizer.lr``: ``{"q_proj": 3, "k_proj": 3}``
trains every bridge's W_Q and W_K three times as fast (a key matches any dot-separated part of a
parameter's name, so it also works under DDP's ``module.`` prefix). The schedule scales every
group alike. Schedules come from ``transformers.get_scheduler``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from comm_cli.errors import ConfigError
from comm_cli.schema import OptimizerConfig, SchedulerConfig


def parameter_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    lr: float | None = None,
    lr_scales: Mapping[str, float] | None = None,
) -> list[dict]:
    """Trainable parameters in groups: with and without weight decay, and (``lr_scales``, which
    needs ``lr``) per learning-rate multiple. The first group always holds the decayed
    parameters at the plain learning rate (it may be empty)."""
    lr_scales = dict(lr_scales or {})
    if lr_scales and lr is None:
        raise ValueError("lr_scales needs the base lr")
    for key, scale in lr_scales.items():
        if not scale > 0:
            raise ConfigError(f"optimizer.lr_scales.{key}={scale}: a learning-rate multiple must be > 0")
    buckets: dict[tuple[bool, float], list[nn.Parameter]] = {(True, 1.0): []}
    matched = set()
    for name, param in named_params:
        if not param.requires_grad:
            continue
        parts = set(name.split("."))
        scale = 1.0
        for key, value in lr_scales.items():
            if key in parts:
                scale, matched = value, matched | {key}
        buckets.setdefault((param.ndim >= 2, scale), []).append(param)
    unmatched = sorted(set(lr_scales) - matched)
    if unmatched:
        raise ConfigError(
            f"optimizer.lr_scales names {unmatched}, which no trainable parameter's name contains: "
            "use parts of the names (e.g. q_proj, k_proj, v_proj, o_proj, proj, gate)"
        )
    groups = []
    for (decayed, scale), params in buckets.items():
        if not params and groups:
            continue
        group = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
        if scale != 1.0:
            group["lr"] = lr * scale
        groups.append(group)
    return groups


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """An optimizer over ``model``'s trainable parameters (``requires_grad``) only."""
    groups = parameter_groups(
        model.named_parameters(), cfg.weight_decay, cfg.lr, getattr(cfg, "lr_scales", None)
    )
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
