"""The models a benchmark builds from its settings: a random Llama-style anchor and a random
Qwen2-style augment (built locally, nothing downloaded), composed with random bridges so that
every bridge computes from the first step."""

from __future__ import annotations

import argparse

import torch

from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec

PRESETS = {
    # width, layers, heads, kv heads, intermediate
    "default": {"anchor": (512, 8, 8, 8, 1376), "augment": (256, 8, 4, 2, 688), "vocab": 32000},
    "1b": {"anchor": (2048, 16, 32, 8, 8192), "augment": (896, 24, 14, 2, 4864), "vocab": 128256},
}


def with_values(args: argparse.Namespace, **values) -> argparse.Namespace:
    """The settings of a case: ``args`` with some values replaced (a vocab, a sequence length)."""
    return argparse.Namespace(**{**vars(args), **values})


def base_dtype(device: torch.device) -> torch.dtype:
    """bf16 bases on a GPU (as comm-train's mixed precision), float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_models(args, dtype, device):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    preset = PRESETS[args.preset]
    vocab = args.vocab or preset["vocab"]
    anchor_cfg = _config(LlamaConfig, preset["anchor"], vocab, args.anchor_width, args.anchor_layers)
    augment_cfg = _config(Qwen2Config, preset["augment"], vocab, args.augment_width, args.augment_layers)
    torch.manual_seed(0)
    with torch.device(device):  # initialise where the model will run (fast for ~1B on a GPU)
        anchor = AutoModelForCausalLM.from_config(anchor_cfg, dtype=dtype).eval()
        augment = AutoModelForCausalLM.from_config(augment_cfg, dtype=dtype).eval()
    return anchor, augment


def _config(config_class, shape, vocab: int, width: int | None, layers: int | None):
    """A transformers config from a preset's shape, ``--*-width`` / ``--*-layers`` overriding it."""
    preset_width, preset_layers, heads, kv_heads, intermediate = shape
    return config_class(
        vocab_size=vocab,
        hidden_size=width or preset_width,
        num_hidden_layers=layers or preset_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=4096,
    )


def mapping_and_bridge(args) -> tuple[MappingSpec, BridgeConfig]:
    """``--connections`` (spread evenly) or ``--every``; bridges whose output starts non-zero."""
    mapping = MappingSpec(count=args.connections) if args.connections else MappingSpec(every=args.every)
    return mapping, BridgeConfig(num_heads=args.bridge_heads, zero_init_output=False)


def compose(anchor, augment, mapping: MappingSpec, bridge: BridgeConfig):
    """The composition with random bridge weights (N(0, 0.02)) and AdamW over the bridges."""
    composed = ComposedModel.from_models(anchor, augment, mapping, bridge)
    for p in composed.bridges.parameters():
        p.data.normal_(0, 0.02)
    return composed, torch.optim.AdamW(composed.bridges.parameters(), lr=1e-4)
