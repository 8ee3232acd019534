"""The training collators that read precomputed states instead of running frozen layers.

- ``augment_cache_collator`` (``trainer.cache_augment_states=true``): the augmenting models'
  states at the connected layers (``augment_cache.py``).
- ``anchor_prefix_collator`` (``trainer.cache_anchor_prefix=true``): the output of the anchor's
  frozen bottom layers (``anchor_prefix_cache.py``), which those layers then replay.

Each opens its cache when a complete one for exactly this data and these models is there, and
otherwise has the main process build it while the other processes of the node wait
(``main_process_first``), then find it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

from comm_cli.compose import ComposedModel
from comm_cli.errors import ConfigError

logger = logging.getLogger(__name__)


def with_example_ids(train):
    """The training split with an ``example_id`` column (what the cache collators index by)."""
    if "example_id" in train.column_names:
        return train
    return train.add_column("example_id", list(range(len(train))))


def _open_or_build(accelerator, open_cache: Callable, build: Callable, missing: str):
    """(the cache, whether it was there already): opened, or built by the main process."""
    with accelerator.main_process_first():
        cache = open_cache()
        if cache is not None:
            return cache, True
        if not accelerator.is_main_process:
            raise ConfigError(missing)
        return build(), False


def augment_cache_collator(
    collator, model, train, accelerator, trainer_cfg, bridge_dtype: str, run_dir: Path
):
    """Precompute (or reuse) the augmenting models' states over the training split (which has
    ``example_id``); returns the collator that adds them to each batch."""
    from comm_cli.compose.loading import torch_dtype
    from comm_cli.training.augment_cache import (
        AugmentStateCache,
        CachedStatesCollator,
        build_cache,
        data_fingerprint,
    )

    if not isinstance(model, ComposedModel):
        raise ConfigError(
            "trainer.cache_augment_states=true needs method=calm (only CALM has augmenting models)"
        )
    dtype = torch_dtype(bridge_dtype)
    directory = Path(trainer_cfg.cache_dir or run_dir / "augment_cache").expanduser()
    fingerprint = data_fingerprint(train, model, model.mask_mode, dtype)

    def build():
        model.to(accelerator.device)
        return build_cache(model, train, directory, fingerprint, dtype, batch_size=4 * trainer_cfg.batch_size,
                           progress=trainer_cfg.progress_bar)  # fmt: skip

    cache, reused = _open_or_build(
        accelerator,
        lambda: AugmentStateCache.open(directory, fingerprint),
        build,
        f"the augment-state cache in {directory} is missing on this node: use a shared cache_dir",
    )
    if reused:
        logger.info("reusing cached augment states in %s", directory)
    return CachedStatesCollator(collator, cache)


def _frozen_prefix_length(model, anchor, layers) -> int:
    """How many of the anchor's bottom layers no training step changes."""
    from comm_cli.compose.prefix import trainable_prefix_length

    if isinstance(
        model, ComposedModel
    ):  # the lowest bridge adds to its layer's output: that layer is frozen too
        return model.connected_anchor_layers[0] + 1
    return trainable_prefix_length(layers, anchor.get_input_embeddings())


def anchor_prefix_collator(collator, model, train, accelerator, trainer_cfg, anchor_spec, engine: str,
                           run_dir: Path):  # fmt: skip
    """Precompute (or reuse) the anchor's frozen bottom layers over the training split (which has
    ``example_id``); returns (the collator that adds their states to each batch, the
    ``AnchorPrefix`` that makes those layers replay them during training steps)."""
    from comm_cli.compose.prefix import AnchorPrefix, decoder_layers
    from comm_cli.training.anchor_prefix_cache import (
        AnchorPrefixCache,
        PrefixStatesCollator,
        build_cache,
        fingerprint,
    )

    if engine not in ("single", "ddp"):
        raise ConfigError(
            f"trainer.cache_anchor_prefix=true does not work with {engine} (it shards the "
            "anchor's layers): set trainer.cache_anchor_prefix=false or train without FSDP/DeepSpeed"
        )
    anchor = model.anchor if isinstance(model, ComposedModel) else model
    layers = decoder_layers(anchor)
    frozen = _frozen_prefix_length(model, anchor, layers)
    if frozen == 0:
        raise ConfigError(
            "trainer.cache_anchor_prefix=true, but training changes the anchor's embeddings or its "
            "first layer, so no frozen prefix exists: set trainer.cache_anchor_prefix=false"
        )
    length = frozen
    if trainer_cfg.anchor_prefix_layers is not None:
        if not 1 <= trainer_cfg.anchor_prefix_layers <= frozen:
            raise ConfigError(
                f"trainer.anchor_prefix_layers={trainer_cfg.anchor_prefix_layers}, but only the anchor's first "
                f"{frozen} layers are frozen in this run: give 1..{frozen} (or null for {frozen})"
            )
        length = trainer_cfg.anchor_prefix_layers
    spec = dataclasses.asdict(anchor_spec) if dataclasses.is_dataclass(anchor_spec) else dict(anchor_spec)
    # the states follow from the weights and the token ids (fingerprinted themselves); which
    # tokenizer made the ids is no part of them (a composition names it, LoRA does not)
    spec.pop("tokenizer", None)
    key = fingerprint(train, spec, length, next(anchor.parameters()).dtype)
    directory = Path(trainer_cfg.anchor_prefix_cache_dir or run_dir / "anchor_prefix_cache").expanduser()

    def build():
        model.to(accelerator.device)
        with accelerator.autocast():
            return build_cache(anchor, layers, length, train, directory, key, 4 * trainer_cfg.batch_size,
                               progress=trainer_cfg.progress_bar)  # fmt: skip

    cache, reused = _open_or_build(
        accelerator,
        lambda: AnchorPrefixCache.open(directory, key),
        build,
        f"the anchor prefix cache in {directory} is missing on this node: "
        "use a shared trainer.anchor_prefix_cache_dir",
    )
    if reused:
        logger.info("reusing the anchor's cached prefix states (%d layers) in %s", length, directory)
    prefix = AnchorPrefix(layers, length)
    prefix.probe(anchor)
    return PrefixStatesCollator(collator, cache), prefix
