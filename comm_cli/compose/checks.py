"""Checks of a composition config that need the models' configs but none of their weights, so a
wrong mapping, head count or mask mode fails in one line before anything large loads."""

from __future__ import annotations

from comm_cli.compose.blocks import bridge_heads, encoder_in_causal_mode, hidden_size, is_encoder, num_layers
from comm_cli.compose.loading import load_model_config
from comm_cli.compose.mapping import augment_connections
from comm_cli.compose.specs import CompositionConfig
from comm_cli.errors import ConfigError


def check_config(config: CompositionConfig) -> list[list[tuple[int, int]]]:
    """Validate mappings and head count from the model configs only (no weights are loaded).
    Returns the resolved connections of each augment."""
    anchor_config = load_model_config(config.anchor, "anchor model")
    anchor_depth, anchor_dim = num_layers(anchor_config), hidden_size(anchor_config)
    heads = bridge_heads(config.bridge.num_heads, anchor_config)
    if anchor_dim % heads != 0:
        raise ConfigError(
            f"bridge.num_heads={heads} does not divide the anchor width {anchor_dim}: "
            f"pick a divisor of {anchor_dim}"
        )
    resolved = []
    for i, spec in enumerate(config.augments):
        augment_config = load_model_config(spec.model, f"augmenting model {i}")
        if is_encoder(augment_config) and config.mask_mode == "causal":
            raise ConfigError(encoder_in_causal_mode(i, spec.model.name_or_path))
        resolved.append(augment_connections(spec, i, num_layers(augment_config), anchor_depth))
    return resolved
