"""The key-value experiment's config sections and the settings that decide its specialists.

``data.kv`` says which examples the generator makes; ``kv`` (top level) says where the two
specialists are cached and how they are built. The experiment's plugin (``plugin.py``) registers
both sections with comm's schema, so a misspelt key is still rejected by name. The specialists'
settings hash names their cache directory (``${comm_kv_hash:${kv.specialists}}``): specialists
built with other settings live elsewhere, and a saved composition that names ``<kv.dir>/anchor``
keeps pointing at the weights it was trained with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

# Bump when the training recipe changes in a way the settings do not show, so that cached
# specialists built by older code are rebuilt rather than reused.
RECIPE_VERSION = 2

# The same for the encoder augment's recipe alone (``augment.kind == "encoder"``), so changing it
# rebuilds the encoder builds and leaves the causal builds' hashes as they are. 2: ModernBERT
# (pre-LN, rotary positions) with init std width**-0.5, in place of a post-LN BERT at std 0.02.
ENCODER_RECIPE_VERSION = 2


@dataclass
class KVTaskConfig:
    """The synthetic key-value arithmetic task (paper section 4.1), generated in memory.

    The keys, values and split come from the specialists' ``world.json`` (``kv.dir``)."""

    task: str = "kv_arithmetic"  # arithmetic | lookup | kv_arithmetic | kv_substitution | kv_prefixed
    key_split: str = "composition"  # the keys drawn from: composition | heldout | all
    # Training only: this fraction of examples is plain numeric arithmetic, so the bridges learn
    # to leave the anchor's own skill alone where there is no key.
    arithmetic_fraction: float = 0.0
    train_examples: int = 96000
    validation_examples: int = 512
    eval_examples: int = 500  # examples of an evaluation task (lookup: every key of the split, up to this)


@dataclass
class AugmentSettings:
    """The augmenting model (Qwen2-style) and how it memorises the keys."""

    width: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    steps: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 40
    weight_decay: float = 0.0
    pairs_per_line: int = 8
    # "causal" (Qwen2-style, next-token loss on the values) or "encoder" (ModernBERT, masked-LM on
    # the values: the variant composed in prompt mode).
    kind: str = "causal"
    # encoder: a masked value is shown as [MASK] or, this often, as one of the characters that
    # follow a key in a prompt ("+-=" or a letter), so that the encoder's state right after a key
    # in ``abc+xyz-def=`` predicts the key's value (BERT's random replacement, made frequent).
    replace_fraction: float = 0.5


@dataclass
class AnchorSettings:
    """The anchor (Llama-style) and how it learns arithmetic after random prefixes."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 512
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    prefix_fraction: float = 0.5
    max_prefix_length: int = 15
    # Of the prefixes, this fraction is shaped like a key expression (``qzr+bta=``), see kv.random_prefix.
    shaped_prefix_fraction: float = 0.5


@dataclass
class KVSpecialistSettings:
    """Everything that decides the specialists. Defaults are the demo's real sizes;
    ``KVSpecialistSettings.tiny()`` is a seconds-long build for tests."""

    seed: int = 0
    num_keys: int = 500
    key_length: int = 3
    composition_fraction: float = 0.2
    # Composition keys hold every value equally often (KVWorld.create(balanced=True)). Measured
    # (docs/experiments/key_value.md): a random split of world seed 0 gave value 4 only 4 of the 100 composition keys,
    # and held-out expressions needing a 4 failed 40% of the time against 7% or less for the rest.
    balanced_split: bool = True
    min_operands: int = 2
    max_operands: int = 3
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    anchor: AnchorSettings = field(default_factory=AnchorSettings)
    eval_examples: int = 500
    # The anchor's tokenizer: "char" (shared with the augment) or "bpe" (trained on the anchor's
    # own pretraining text, ``bpe_vocab_size`` tokens: the cross-tokenizer variant).
    anchor_tokenizer: str = "char"
    bpe_vocab_size: int = 160
    # Not part of the settings hash: how many processes build the two specialists (2: side by
    # side, 1: one after the other). Each trains with exactly one torch thread either way, so
    # the weights do not depend on this or on the machine's thread settings.
    processes: int = 2

    @classmethod
    def tiny(cls, seed: int = 0) -> KVSpecialistSettings:
        """Small models and a few steps: the layout and behaviour of a real build in seconds,
        not its accuracy."""
        return cls(
            seed=seed,
            num_keys=40,
            augment=AugmentSettings(width=16, intermediate=32, heads=2, kv_heads=1, steps=6, batch_size=8),
            anchor=AnchorSettings(width=32, intermediate=64, heads=2, kv_heads=2, steps=6, batch_size=8),
            eval_examples=16,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> KVSpecialistSettings:
        data = dict(data)
        data.pop("num_threads", None)  # written by comm before the build was single-threaded
        augment = AugmentSettings(**data.pop("augment", {}))
        anchor = AnchorSettings(**data.pop("anchor", {}))
        return cls(augment=augment, anchor=anchor, **data)

    def hash(self) -> str:
        """A short stable hash of what decides the weights (the recipe version included). Options
        added after a release leave the hash alone at their default, so builds stay reused."""
        data = self.to_dict()
        data.pop("processes")
        for section, key, default in _LATER_OPTIONS:
            where = data[section] if section else data
            if where.get(key) == default:
                where.pop(key)
        data["recipe_version"] = RECIPE_VERSION
        if self.augment.kind == "encoder":
            data["encoder_recipe_version"] = ENCODER_RECIPE_VERSION
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# (section, key, default) of settings added after RECIPE_VERSION 2.
_LATER_OPTIONS = (
    (None, "anchor_tokenizer", "char"),
    (None, "balanced_split", False),
    (None, "bpe_vocab_size", 160),
    ("augment", "kind", "causal"),
    ("augment", "replace_fraction", 0.5),
)


@dataclass
class KVConfig:
    """Where the key-value experiment's two specialists are cached, and how they are built."""

    # One directory per settings hash under the cache (COMM_CACHE_DIR, else ~/.cache/comm).
    dir: str = "${oc.env:COMM_CACHE_DIR,${oc.env:HOME,.}/.cache/comm}/kv_specialists/${comm_kv_hash:${kv.specialists}}"
    build: bool = True  # build them on first use when missing
    specialists: KVSpecialistSettings = field(default_factory=KVSpecialistSettings)


def settings_hash(node) -> str:
    """``${comm_kv_hash:${kv.specialists}}``: the hash of the specialists' settings."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else node
    return KVSpecialistSettings.from_dict(data).hash()
