"""Finding the decoder blocks of a Hugging Face causal LM.

The bridges hook into the output of anchor decoder layers and read the output of augment
decoder layers, so comm needs each model's ``nn.ModuleList`` of decoder layers. Known
architectures are listed by ``model_type``; others are tried against common paths, and a user
can always name the path (``block_path``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from comm_cli.errors import UnsupportedModelError

# model_type -> dotted path of the decoder layers inside the *ForCausalLM module.
KNOWN_BLOCK_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "qwen2_moe": "model.layers",
    "qwen3": "model.layers",
    "qwen3_moe": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi": "model.layers",
    "phi3": "model.layers",
    "olmo": "model.layers",
    "olmo2": "model.layers",
    "granite": "model.layers",
    "cohere": "model.layers",
    "stablelm": "model.layers",
    "starcoder2": "model.layers",
    "smollm3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_bigcode": "transformer.h",
    "gptj": "transformer.h",
    "codegen": "transformer.h",
    "bloom": "transformer.h",
    "falcon": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}

# Bidirectional encoders (augments in prompt mode only): model_type -> paths of their layers in
# the base model (AutoModel / T5EncoderModel) or in a *ForMaskedLM wrapper.
ENCODER_BLOCK_PATHS: dict[str, tuple[str, ...]] = {
    "bert": ("encoder.layer", "bert.encoder.layer"),
    "roberta": ("encoder.layer", "roberta.encoder.layer"),
    "xlm-roberta": ("encoder.layer", "roberta.encoder.layer"),
    "camembert": ("encoder.layer", "roberta.encoder.layer"),
    "electra": ("encoder.layer", "electra.encoder.layer"),
    "deberta-v2": ("encoder.layer", "deberta.encoder.layer"),
    "distilbert": ("transformer.layer", "distilbert.transformer.layer"),
    "modernbert": ("layers", "model.layers"),
    "t5": ("encoder.block",),
    "mt5": ("encoder.block",),
    "umt5": ("encoder.block",),
}
# Encoders whose position ids count from the padding index: they build them from input_ids
# themselves (padding-aware), so comm must not pass its own.
_OWN_POSITION_IDS = ("roberta", "xlm-roberta", "camembert")

# Tried in order for a model_type not listed above.
FALLBACK_BLOCK_PATHS = (
    "model.layers",
    "transformer.h",
    "model.decoder.layers",
    "gpt_neox.layers",
    "transformer.blocks",
    "transformer.layers",
    "model.language_model.layers",
)


@dataclass
class Blocks:
    """A model's decoder layers and where they live (so they can be truncated in place)."""

    layers: nn.ModuleList
    parent: nn.Module
    attr: str
    path: str


def text_config(config):
    """The decoder config of a (possibly multimodal) config."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def num_layers(config) -> int:
    """Decoder depth read from a model config (GPT-2's n_layer maps to num_hidden_layers)."""
    cfg = text_config(config)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(cfg, name, None) is not None:
            return int(getattr(cfg, name))
    raise UnsupportedModelError(
        f"cannot read the number of layers from {type(config).__name__}: it has no num_hidden_layers / n_layer"
    )


def hidden_size(config) -> int:
    """Width of the residual stream (what a decoder layer outputs)."""
    cfg = text_config(config)
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, name, None) is not None:
            return int(getattr(cfg, name))
    raise UnsupportedModelError(f"cannot read the hidden size from {type(config).__name__}")


def attention_heads(config) -> int | None:
    """The model's number of attention (query) heads, when its config names it."""
    cfg = text_config(config)
    for name in ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"):
        if isinstance(getattr(cfg, name, None), int):
            return int(getattr(cfg, name))
    return None


def bridge_heads(requested: int | None, anchor_config) -> int:
    """The bridges' head count: ``requested``, or (None) the anchor's own attention heads as in
    the paper; an anchor whose head count does not divide its width (head_dim set apart, as in
    Gemma) gets the largest divisor of its width below its head count."""
    if requested is not None:
        return requested
    width, heads = hidden_size(anchor_config), attention_heads(anchor_config) or 1
    return max(h for h in range(1, heads + 1) if width % h == 0)


def _lookup(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module] | None:
    parent: nn.Module = model
    parts = path.split(".")
    for part in parts[:-1]:
        parent = getattr(parent, part, None)
        if not isinstance(parent, nn.Module):
            return None
    target = getattr(parent, parts[-1], None)
    if not isinstance(target, nn.ModuleList):
        return None
    return parent, parts[-1], target


def find_blocks(model: nn.Module, block_path: str | None = None) -> Blocks:
    """Return the decoder layers of a *ForCausalLM model.

    Raises UnsupportedModelError naming the model class and how to point comm at its blocks.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    depth = num_layers(config) if config is not None else None
    if block_path is not None:
        candidates = [block_path]
    elif config is not None and is_encoder(config):
        candidates = list(ENCODER_BLOCK_PATHS[model_type])
    elif model_type in KNOWN_BLOCK_PATHS:
        candidates = [KNOWN_BLOCK_PATHS[model_type]]
    else:
        candidates = list(FALLBACK_BLOCK_PATHS)
    for path in candidates:
        found = _lookup(model, path)
        if found is None:
            continue
        parent, attr, layers = found
        if depth is not None and len(layers) != depth:
            continue
        return Blocks(layers=layers, parent=parent, attr=attr, path=path)
    cls = type(model).__name__
    if block_path is not None:
        raise UnsupportedModelError(
            f"block_path '{block_path}' does not name an nn.ModuleList of {depth} decoder layers in {cls}: "
            "set block_path to the dotted path of its decoder layers (print(model) shows it), e.g. model.layers"
        )
    raise UnsupportedModelError(
        f"cannot find the decoder blocks of {cls} (model_type '{model_type}'): set block_path to the dotted "
        "path of its nn.ModuleList of decoder layers, e.g. anchor.block_path=model.layers"
    )


def truncate_blocks(blocks: Blocks, keep: int) -> None:
    """Keep only the first ``keep`` decoder layers, in place: the later ones are never computed
    and their weights are freed."""
    if keep < len(blocks.layers):
        kept = nn.ModuleList(list(blocks.layers)[:keep])
        setattr(blocks.parent, blocks.attr, kept)
        blocks.layers = kept


def is_encoder(config) -> bool:
    """A bidirectional encoder (BERT, RoBERTa, XLM-R, ModernBERT, the encoder of T5/mT5): every
    token sees the whole text, so it can only be an augment in prompt mode. A BERT configured
    as a decoder (``is_decoder=True``) is causal and not one."""
    return getattr(config, "model_type", None) in ENCODER_BLOCK_PATHS and not getattr(
        config, "is_decoder", False
    )


def encoder_in_causal_mode(index: int, name: str) -> str:
    return (
        f"augment {index} ({name}) is a bidirectional encoder: every token of it sees the whole text, so in "
        "mask_mode=causal the anchor would read the future through it; use mask_mode=prompt (the encoder "
        "reads the prompt once)"
    )


def takes_position_ids(model: nn.Module) -> bool:
    """Whether comm should pass position ids (counted over real tokens, for padding invariance)."""
    if getattr(getattr(model, "config", None), "model_type", None) in _OWN_POSITION_IDS:
        return False
    return "position_ids" in inspect.signature(model.forward).parameters


def cache_kwarg(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes a KV cache: transformers renamed
    ``past_key_values`` to ``cache``; use whichever this version takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def recompute_in_backward(layers) -> None:
    """Make each of ``layers`` recompute its activations during backward instead of storing them
    (non-reentrant activation checkpointing, and only while autograd records). A layer already
    made so is left as it is."""
    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        if getattr(layer, "_comm_checkpointed", False):
            continue
        original = layer.forward

        def forward(*args, _original=original, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)
            return _original(*args, **kwargs)

        layer.forward = forward
        layer._comm_checkpointed = True
