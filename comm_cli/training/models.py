"""Building what a method trains: the CALM composition, LoRA on the anchor, or the whole anchor.

All checks a user's config can fail (mapping out of range, head count, tokenizers that disagree)
run from the model configs and tokenizers, before any weights load.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from comm_cli.compose import ComposedModel, CompositionConfig, check_config
from comm_cli.compose.alignment import ReadPlan
from comm_cli.compose.blocks import hidden_size, num_layers
from comm_cli.compose.bridge import bridge_parameter_count
from comm_cli.compose.loading import load_causal_lm, load_model_config, load_tokenizer  # noqa: F401
from comm_cli.compose.masks import positions_from_mask
from comm_cli.compose.specs import AugmentSpec, ModelSpec
from comm_cli.compose.tokenizers import load_tokenizers, plan_reading
from comm_cli.errors import ConfigError
from comm_cli.losses import kept_logits_loss, loss_mask, loss_targets, next_token_loss
from comm_cli.output_head import keeps_loss_logits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalmPlan:
    """What a CALM run resolves from its config and the tokenizers before its model loads (the
    config itself is only read): where each model's tokenizer comes from (an augmenting model
    that ships none: its spec's ``tokenizer``, unset), how each augmenting model reads text
    ("shared": the anchor's ids, "aligned": its own tokens), and the readers that line its tokens
    up (``reading``; None when every augment reads the anchor's ids)."""

    anchor_tokenizer: str
    augment_tokenizers: list[str | None]
    token_paths: list[str]
    reading: ReadPlan | None


def augment_model_specs(cfg) -> list[ModelSpec]:
    """The augmenting models of a train/eval config: ``augment``, then ``extra_augments``."""
    return [cfg.augment] + [entry.model for entry in cfg.extra_augments]


def composition_config(cfg, plan: CalmPlan | None = None) -> CompositionConfig:
    """The composition described by a train/eval config (``augment`` plus ``extra_augments``);
    with a ``plan``, each model's tokenizer source and each augment's token path as resolved."""
    anchor, models = cfg.anchor, augment_model_specs(cfg)
    mappings = [cfg.mapping] + [entry.mapping for entry in cfg.extra_augments]
    paths = requested_token_paths(cfg)
    if plan is not None:
        anchor = dataclasses.replace(anchor, tokenizer=plan.anchor_tokenizer)
        models = [dataclasses.replace(m, tokenizer=t) for m, t in zip(models, plan.augment_tokenizers)]
        paths = plan.token_paths
    augments = [
        AugmentSpec(model=model, mapping=mapping, tokens=tokens)
        for model, mapping, tokens in zip(models, mappings, paths)
    ]
    return CompositionConfig(anchor=anchor, augments=augments, bridge=cfg.bridge, mask_mode=cfg.mask_mode)


def requested_token_paths(cfg) -> list[str]:
    """How each augmenting model is asked to read text ("auto" | "shared" | "aligned"):
    ``augment_tokens`` for the first, ``extra_augments[i].tokens`` for the others."""
    extra = [getattr(entry, "tokens", None) or "auto" for entry in cfg.extra_augments]
    return [getattr(cfg, "augment_tokens", None) or "auto", *extra]


def plan_calm(cfg, anchor_tokenizer, sample_texts) -> CalmPlan:
    """How each model of a CALM config reads text: each augmenting model reads the anchor's token
    ids when the tokenizers read identically, else its own tokens lined up through characters.
    In causal mode every aligned tokenizer gets its settle rule (or the run stops in one line);
    one the rule is not argued for is checked on ``sample_texts`` here and on every example when
    the data is tokenized (``plan_alignment``, ``tokenize_split``)."""
    specs = augment_model_specs(cfg)
    tokenizers = load_tokenizers(cfg.anchor, specs, override=cfg.tokenizer, anchor_tokenizer=anchor_tokenizer)
    names = [f"augment {i} ({spec.name_or_path})" for i, spec in enumerate(specs)]
    reading = plan_reading(
        anchor_tokenizer, tokenizers.augments, names, requested_token_paths(cfg), cfg.mask_mode, sample_texts
    )
    readers = reading.augment_readers if reading is not None else [None] * len(specs)
    return CalmPlan(
        anchor_tokenizer=tokenizers.anchor_source,
        augment_tokenizers=tokenizers.augment_sources,
        token_paths=["aligned" if reader is not None else "shared" for reader in readers],
        reading=reading,
    )


def sample_texts(rows, data_cfg, n: int = 64) -> list[str]:
    """Texts of the first ``n`` rows (each field, and prompt + completion joined) for comparing
    tokenizers and checking the settle rule."""
    from comm_cli.data.loading import text_fields

    fields = [f for f in text_fields(data_cfg) if f in rows.column_names]
    texts = []
    for i in range(min(n, len(rows))):
        values = [rows[i][f] for f in fields if isinstance(rows[i][f], str)]
        texts += values + (["".join(values)] if len(values) > 1 else [])
    return texts


def build_calm(cfg, plan: CalmPlan | None = None, device=None) -> ComposedModel:
    config = composition_config(cfg, plan)
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


def _lora_target_names(anchor: nn.Module, targets) -> list[str]:
    """``targets`` as module names: PEFT's default for the architecture (None) or every linear
    layer inside the decoder layers ("all-linear"), as PEFT itself resolves them."""
    if isinstance(targets, list):
        return targets
    if targets == "all-linear":
        return sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, m in anchor.named_modules()
                if isinstance(m, nn.Linear) and ".layers." in f".{name}"
            }
        )
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    names = defaults.get(anchor.config.model_type)
    if not names:
        raise ConfigError(
            f"method.lora.layers needs method.lora.target_modules for model type '{anchor.config.model_type}' "
            "(PEFT has no default for it): e.g. method.lora.target_modules=[all-linear]"
        )
    return list(names)


def _lora_layers(layers, count: int) -> list[int] | None:
    """``method.lora.layers`` checked against the anchor's ``count`` decoder layers."""
    if layers is None:
        return None
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < count]
    if not layers or bad:
        raise ConfigError(
            f"method.lora.layers={layers}: the anchor has decoder layers 0..{count - 1}; "
            "list indices in that range (or null for every layer)"
        )
    return sorted(set(layers))


def build_lora(cfg, device=None) -> nn.Module:
    """PEFT LoRA on the anchor; rank matched to the CALM bridges' parameter count unless set."""
    from peft import LoraConfig, get_peft_model

    anchor = load_causal_lm(cfg.anchor, "anchor model", device)
    lora = cfg.method.lora
    layers = _lora_layers(lora.layers, num_layers(anchor.config))
    targets = _lora_targets(lora.target_modules)
    if layers is not None:  # PEFT takes layers_to_transform with a list of module names only
        targets = _lora_target_names(anchor, targets)

    def make(r: int):
        return LoraConfig(
            r=r,
            lora_alpha=lora.alpha if lora.alpha is not None else 2 * r,
            lora_dropout=lora.dropout,
            target_modules=targets,
            layers_to_transform=layers,
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


def build_model(cfg, plan: CalmPlan | None = None, device=None) -> nn.Module:
    """What ``method.name`` trains; ``plan`` (CALM): what ``plan_calm`` resolved."""
    name = cfg.method.name
    if name == "calm":
        return build_calm(cfg, plan, device)
    if name == "lora":
        return build_lora(cfg, device)
    if name == "full":
        return build_full(cfg, device)
    raise ConfigError(f"method.name '{name}' is not one of calm, lora, full")


def composed_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The arguments of a composition's forward that a collated batch holds."""
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "augment_attention_mask": batch["augment_attention_mask"],
        "augment_states": batch.get("augment_states"),
        "anchor_ends": batch.get("anchor_ends"),
        "augment_inputs": batch.get("augment_inputs"),
    }


def batch_logits(model: nn.Module, batch: dict[str, torch.Tensor], composed: bool) -> torch.Tensor:
    """Teacher-forced logits of a collated batch, for a composition (``composed``, possibly
    wrapped by Accelerate) or a plain causal LM. Positions count only real tokens, so a padded
    row scores as it would alone."""
    if composed:
        return model(**composed_inputs(batch)).logits
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=positions_from_mask(batch["attention_mask"]),
    ).logits


def batch_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], composed: bool, reduction: str = "sum"
) -> torch.Tensor:
    """Teacher-forced next-token loss of a collated batch over its loss-carrying labels (summed by
    default, for normalising by the tokens of a whole global batch), without logits where no
    loss is: a composition applies the anchor's head at the loss positions only, in chunks; a
    plain causal LM (LoRA, full fine-tuning, a base model under evaluation) is asked for the
    logits of those positions only (``logits_to_keep``), through its own forward, so wrappers
    (DDP, FSDP, PEFT) and heads with extras work unchanged."""
    labels = batch["labels"]
    if composed:
        return model(
            **composed_inputs(batch), labels=labels, return_logits=False, loss_reduction=reduction
        ).loss
    if not keeps_loss_logits(model):
        return next_token_loss(batch_logits(model, batch, composed=False), labels, reduction)
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=positions_from_mask(batch["attention_mask"]),
        logits_to_keep=loss_mask(labels),
    ).logits
    return kept_logits_loss(logits, loss_targets(labels.to(logits.device)), reduction)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes (bridges, LoRA weights, or the whole anchor for method=full)."""
    return {
        name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad
    }
