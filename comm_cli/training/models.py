"""Building what a method trains: the CALM composition, LoRA on the anchor, or the whole anchor.

All checks a user's config can fail (mapping out of range, head count, tokenizers that disagree)
run from the model configs and tokenizers, before any weights load.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from comm_cli.compose import ComposedModel, CompositionConfig, check_config
from comm_cli.compose.blocks import hidden_size
from comm_cli.compose.bridge import bridge_parameter_count
from comm_cli.compose.loading import load_causal_lm, load_model_config
from comm_cli.compose.masks import positions_from_mask
from comm_cli.compose.specs import AugmentSpec, ModelSpec
from comm_cli.errors import ConfigError, ModelLoadError, TokenizerMismatchError

logger = logging.getLogger(__name__)

# Text that exercises letters, digits, punctuation and spaces when comparing tokenizers.
_PROBE_TEXTS = ("Hello world, 123 + 456 = 579.", "def f(x):\n    return x * 2", "abc+xyz-def=4+7-3=8")


def composition_config(cfg) -> CompositionConfig:
    """The composition described by a train/eval config (``augment`` plus ``extra_augments``)."""
    augments = [AugmentSpec(model=cfg.augment, mapping=cfg.mapping)]
    augments += [AugmentSpec(model=entry.model, mapping=entry.mapping) for entry in cfg.extra_augments]
    return CompositionConfig(anchor=cfg.anchor, augments=augments, bridge=cfg.bridge, mask_mode=cfg.mask_mode)


_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _declares_generic_tokenizer(name_or_path: str) -> bool:
    """A local directory whose tokenizer_config.json declares the generic `tokenizers` backend.

    transformers' AutoTokenizer swaps in the model type's own tokenizer class for some types
    (qwen2, phi3, ...) even when the directory declares a generic one, which silently re-tokenises
    a custom tokenizer (e.g. the key-value experiment's character tokenizer saved beside a Qwen2
    model). The declared class is what the directory means."""
    import json
    from pathlib import Path

    path = Path(name_or_path) / "tokenizer_config.json"
    if not path.is_file() or not (Path(name_or_path) / "tokenizer.json").is_file():
        return False
    try:
        return json.loads(path.read_text()).get("tokenizer_class") in _GENERIC_TOKENIZER_CLASSES
    except (OSError, ValueError):
        return False


def load_tokenizer(name_or_path: str, spec: ModelSpec | None = None, what: str = "tokenizer"):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # A GGUF spec reads its tokenizer from the same file as its weights.
    gguf = {"gguf_file": spec.gguf_file} if spec is not None and spec.gguf_file else {}
    try:
        if not gguf and _declares_generic_tokenizer(name_or_path):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(name_or_path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                name_or_path,
                revision=spec.revision if spec else None,
                trust_remote_code=spec.trust_remote_code if spec else False,
                **gguf,
            )
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"cannot load the {what} from '{name_or_path}' ({str(err).splitlines()[0]}): "
            "set tokenizer=<directory or hub id> to one that has tokenizer files"
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_shared_tokenizer(anchor_tokenizer, augment_tokenizer, texts, augment_name: str) -> None:
    """The anchor and augment must read the same ids for the same text: both models see one
    ``input_ids`` tensor, and the masks align positions by column."""
    for text in list(_PROBE_TEXTS) + list(texts):
        a = anchor_tokenizer(text, add_special_tokens=False)["input_ids"]
        b = augment_tokenizer(text, add_special_tokens=False)["input_ids"]
        if a != b:
            raise TokenizerMismatchError(
                f"the anchor and augmenting model '{augment_name}' tokenise {text[:40]!r} differently "
                f"({a[:8]}... vs {b[:8]}...): this release needs models that share a tokenizer; pick an "
                "augmenting model of the anchor's family"
            )


def check_tokenizers(cfg, anchor_tokenizer, sample_texts) -> None:
    for spec in [cfg.augment] + [entry.model for entry in cfg.extra_augments]:
        try:
            augment_tokenizer = load_tokenizer(spec.name_or_path, spec, "augmenting model's tokenizer")
        except ModelLoadError:
            logger.warning(
                "the augmenting model %s ships no tokenizer: assuming it shares the anchor's",
                spec.name_or_path,
            )
            continue
        check_shared_tokenizer(anchor_tokenizer, augment_tokenizer, sample_texts, spec.name_or_path)


def build_calm(cfg, device=None) -> ComposedModel:
    config = composition_config(cfg)
    model = ComposedModel.from_config(config, device=device)
    if cfg.trainer.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def calm_parameter_budget(cfg) -> int:
    """Trainable parameters CALM would have with this config, from the model configs only."""
    config = composition_config(cfg)
    connections = check_config(config)
    anchor_dim = hidden_size(load_model_config(config.anchor, "anchor model"))
    total = 0
    for spec, pairs in zip(config.augments, connections):
        augment_dim = hidden_size(load_model_config(spec.model, "augmenting model"))
        total += len(pairs) * bridge_parameter_count(augment_dim, anchor_dim, config.bridge)
    return total


def _lora_targets(names):
    """PEFT's target_modules: None (its default for the architecture), ["all-linear"] (every linear
    layer but the LM head) or module names."""
    if not names:
        return None
    names = list(names)
    return "all-linear" if names == ["all-linear"] else names


def build_lora(cfg, device=None) -> nn.Module:
    """PEFT LoRA on the anchor; rank matched to the CALM bridges' parameter count unless set."""
    from peft import LoraConfig, get_peft_model

    anchor = load_causal_lm(cfg.anchor, "anchor model", device)
    lora = cfg.method.lora

    def make(r: int):
        return LoraConfig(
            r=r,
            lora_alpha=lora.alpha if lora.alpha is not None else 2 * r,
            lora_dropout=lora.dropout,
            target_modules=_lora_targets(lora.target_modules),
            task_type="CAUSAL_LM",
        )

    r = lora.r
    if r is None:
        budget = calm_parameter_budget(cfg)
        probe = get_peft_model(anchor, make(1))
        per_rank = sum(p.numel() for p in probe.parameters() if p.requires_grad)
        anchor = probe.unload()
        r = max(1, round(budget / per_rank))
        logger.info(
            "LoRA rank %d matches the bridges' %d trainable parameters (%d per rank)", r, budget, per_rank
        )
    elif r < 1:
        raise ConfigError(f"method.lora.r must be >= 1, got {r}")
    model = get_peft_model(anchor, make(r))
    return model


def build_full(cfg, device=None) -> nn.Module:
    anchor = load_causal_lm(cfg.anchor, "anchor model", device)
    anchor.requires_grad_(True)
    if cfg.trainer.gradient_checkpointing:
        anchor.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return anchor


def build_model(cfg, device=None) -> nn.Module:
    name = cfg.method.name
    if name == "calm":
        return build_calm(cfg, device)
    if name == "lora":
        return build_lora(cfg, device)
    if name == "full":
        return build_full(cfg, device)
    raise ConfigError(f"method.name '{name}' is not one of calm, lora, full")


def first_loss_column(labels: torch.Tensor) -> int:
    """The column of the batch's first prediction that carries loss: logits before it are never
    needed (the prompt of a prompt/completion batch). 0 when no label is set."""
    from comm_cli.losses import IGNORE_INDEX

    columns = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    return int(columns[0]) if len(columns) else 0


def batch_logits(
    model: nn.Module, batch: dict[str, torch.Tensor], composed: bool, keep_from: int = 0
) -> torch.Tensor:
    """Teacher-forced logits of a collated batch, for a composition (``composed``, possibly
    wrapped by Accelerate) or a plain causal LM. Positions count only real tokens, so a padded
    row scores as it would alone. ``keep_from`` > 0 computes the LM head only from that column on
    (the head and its softmax over the vocabulary are a large part of a small model's step)."""
    keep = {"logits_to_keep": batch["input_ids"].shape[1] - keep_from} if keep_from else {}
    if composed:
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            augment_attention_mask=batch["augment_attention_mask"],
            augment_states=batch.get("augment_states"),
            **keep,
        ).logits
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=positions_from_mask(batch["attention_mask"]),
        **keep,
    ).logits


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes (bridges, LoRA weights, or the whole anchor for method=full)."""
    return {
        name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad
    }
