"""The key-value experiment's config sections, as structured-config dataclasses.

``data.kv`` says which examples the generator makes; ``kv`` (top level) says where the two
specialists are cached and how they are built. ``comm_cli/schema.py`` puts them into the
train and eval schemas, so a misspelt key is still rejected by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from comm_cli.experiments.kv_arithmetic.specialists import SpecialistSettings


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
class KVSpecialistsConfig:
    """Where the key-value experiment's two specialists are cached, and how they are built."""

    dir: str = MISSING
    build: bool = True  # build them on first use when missing
    specialists: SpecialistSettings = field(default_factory=SpecialistSettings)
