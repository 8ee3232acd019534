"""The composition core: plain PyTorch, no Hydra, Accelerate or W&B."""

from comm_cli.compose.blocks import cache_kwarg, find_blocks, hidden_size, num_layers
from comm_cli.compose.bridge import Bridge
from comm_cli.compose.bridge_inputs import CompositionCache
from comm_cli.compose.checks import check_config
from comm_cli.compose.composed import ComposedModel, CompositionOutput
from comm_cli.compose.generation import GenerationOutput, generate
from comm_cli.compose.mapping import resolve_connections
from comm_cli.compose.saving import CONFIG_NAME, WEIGHTS_NAME
from comm_cli.compose.specs import AugmentSpec, BridgeConfig, CompositionConfig, MappingSpec, ModelSpec

__all__ = [
    "AugmentSpec",
    "Bridge",
    "BridgeConfig",
    "CONFIG_NAME",
    "ComposedModel",
    "CompositionCache",
    "CompositionConfig",
    "CompositionOutput",
    "GenerationOutput",
    "MappingSpec",
    "ModelSpec",
    "WEIGHTS_NAME",
    "cache_kwarg",
    "check_config",
    "find_blocks",
    "generate",
    "hidden_size",
    "num_layers",
    "resolve_connections",
]
