"""What differs between Accelerate's engines when comm saves and restores training state.

A comm checkpoint holds what trains (the bridges; LoRA weights; the whole anchor for
``method=full``) and that state's optimizer state, never the frozen bases:

- one process, DDP: ``Accelerator.save_state``, whose model part is comm's pre-hook writing
  ``trainable.safetensors`` (Accelerate alone would write the whole model).
- FSDP2: ``save_state`` writes every shard of the model through DCP, frozen bases included,
  before any hook runs. So comm gathers the trained parameters itself (``full_tensor`` of those
  DTensors only), and the optimizer state through ``torch.distributed.checkpoint``'s full state
  dict (it covers the optimizer's parameters only, keyed by name), writes both on the main
  process, and lets Accelerate's ``save_accelerator_state`` write the scheduler and every rank's
  RNG state as it always does.
- DeepSpeed: its own engine checkpoint through ``save_state(exclude_frozen_parameters=True)``
  (the module's trained parameters and the ZeRO-partitioned optimizer state), plus
  ``trainable.safetensors`` from the pre-hook.

Accelerate 1.15 ignores an FSDP launch config on a machine without a GPU: the processes become a
plain MULTI_CPU group. ``enable_fsdp_on_cpu`` switches such a group to FSDP, so the very config a
GPU job uses runs on CPU over gloo; that is how the test suite exercises FSDP2.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from comm_cli.errors import ConfigError

TRAINABLE_WEIGHTS = "trainable.safetensors"
FSDP_OPTIMIZER = "optimizer.bin"


# ---------------------------------------------------------------------------------------------- which engine


def fsdp_requested() -> bool:
    """An ``accelerate launch`` with an FSDP config announces it through the environment."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def enable_fsdp_on_cpu(accelerator) -> None:
    """Make an FSDP launch on a machine without GPUs an FSDP job (see the module docstring)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type == DistributedType.MULTI_CPU and fsdp_requested():
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launch env
        accelerator.state.distributed_type = DistributedType.FSDP


def engine_name(accelerator) -> str:
    """fsdp2 | fsdp1 | deepspeed | ddp | single: what decides how state is saved."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return f"fsdp{accelerator.state.fsdp_plugin.fsdp_version}"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "single"


def check_supported(accelerator) -> None:
    if engine_name(accelerator) == "fsdp1":
        raise ConfigError(
            "FSDP version 1 is not supported (it cannot keep the frozen bases out of checkpoints): set "
            "fsdp_version: 2 in the accelerate config, as conf/accelerate/fsdp.yaml does"
        )


def name_wrap_blocks(model: nn.Module) -> None:
    """FSDP's TRANSFORMER_BASED_WRAP shards the classes a model lists in ``_no_split_modules``;
    a composition lists its bases' decoder blocks, so each block becomes its own FSDP unit."""
    if getattr(model, "_no_split_modules", None):
        return
    names: set[str] = set()
    for module in model.modules():
        if module is not model:
            names.update(getattr(module, "_no_split_modules", None) or [])
    if names:
        model._no_split_modules = sorted(names)


def reshard(model: nn.Module) -> None:
    """FSDP2 leaves the root unit's parameters (the bridges) unsharded after a forward pass
    without backward (validation): the module then holds plain tensors, not the DTensors the
    optimizer steps. Put every unit back in its sharded state. A no-op without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# ---------------------------------------------------------------------------------------------- trained params


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def gather_trainable(model: nn.Module, engine: str) -> dict[str, torch.Tensor]:
    """The full trained parameters on CPU, by name. Collective under FSDP2 and ZeRO-3: every
    rank must call it; only the trained parameters are gathered, never a frozen base."""
    named = _trainable(model)
    if engine == "deepspeed" and any(hasattr(p, "ds_id") for _, p in named):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {name: p.detach().to("cpu").clone().contiguous() for name, p in named}
    out = {}
    for name, p in named:
        tensor = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


@torch.no_grad()
def load_trainable(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Put full trained parameters back (each rank keeps its own shard under FSDP2)."""
    named = dict(_trainable(model))
    if set(state) != set(named):
        raise ConfigError(
            f"checkpoint {where} holds other trainable parameters than this model "
            f"({len(set(state) ^ set(named))} differ): resume with the config it was trained with"
        )
    for name, p in named.items():
        full = state[name].to(dtype=p.dtype)
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            shard = distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements)
            p.to_local().copy_(shard.to_local())
        else:
            p.copy_(full.to(p.device))


@contextlib.contextmanager
def whole_trainable(model: nn.Module, engine: str) -> Iterator[None]:
    """Inside: the trained parameters are whole tensors on every rank, for the final save
    (``save_pretrained`` on the main process). Collective: every rank enters.

    FSDP2: each sharded trained parameter is replaced by its full tensor for good (training is
    over). ZeRO-3: DeepSpeed gathers them for the duration of the block."""
    named = _trainable(model)
    if engine == "deepspeed" and any(hasattr(p, "ds_id") for _, p in named):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            yield
        return
    if engine.startswith("fsdp"):
        reshard(model)
        for name, p in named:
            if hasattr(p, "full_tensor"):
                owner_name, _, attr = name.rpartition(".")
                owner = model.get_submodule(owner_name) if owner_name else model
                owner._parameters[attr] = nn.Parameter(p.full_tensor().detach().clone(), requires_grad=True)
    yield


# ---------------------------------------------------------------------------------------------- FSDP2 state


def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def save_fsdp_state(accelerator, model, optimizer, out_dir: Path) -> None:
    """Trained parameters + their optimizer state (main process), scheduler and RNG (Accelerate).
    Collectives first, file writes after, so a write that fails cannot leave a rank waiting."""
    from accelerate.checkpointing import save_accelerator_state
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    reshard(model)
    trainable = gather_trainable(model, "fsdp2")
    optim_state = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if accelerator.is_main_process:
        save_file(trainable, str(out_dir / TRAINABLE_WEIGHTS))
        torch.save(optim_state, out_dir / FSDP_OPTIMIZER)
    save_accelerator_state(
        str(out_dir),
        [],
        [],
        accelerator._schedulers,
        accelerator._dataloaders,
        accelerator.process_index,
        accelerator.step,
        accelerator.scaler,
    )


def load_fsdp_state(accelerator, model, optimizer, in_dir: Path) -> None:
    from accelerate.checkpointing import load_accelerator_state
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    reshard(model)
    load_trainable(model, load_file(str(in_dir / TRAINABLE_WEIGHTS)), str(in_dir))
    optim_state = torch.load(in_dir / FSDP_OPTIMIZER, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, optim_state, options=_full_options())
    load_accelerator_state(
        str(in_dir),
        [],
        [],
        accelerator._schedulers,
        accelerator._dataloaders,
        accelerator.process_index,
        accelerator.scaler,
        "cpu",
    )


def reset_accelerate_state() -> None:
    """Forget the process-wide Accelerate state, so that the next job in this process (a Hydra
    sweep's next run, a test) builds a fresh Accelerator with its own settings."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
