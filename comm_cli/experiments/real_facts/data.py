"""The real-facts data generator: ``data.synthetic=real_facts``.

Rows are generated in memory from the world in ``facts.dir``: training rows only ever name the
people of ``data.facts.people`` (the composition people), validation rows the people of
``data.facts.validation_people`` (people the composition never trains on, so validation loss
measures what carries over to unseen people), evaluation rows ask the canonical question once
per person of ``data.facts.people``. The core's ``comm_cli.data.build`` finds this module by the
name in ``data.synthetic`` and calls ``raw_splits`` / ``eval_rows``.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from comm_cli.errors import DataError
from comm_cli.experiments.real_facts import tasks
from comm_cli.experiments.real_facts.config import FactsTaskConfig
from comm_cli.experiments.real_facts.world import FactsWorld

WORLD = "world.json"


def load_world(facts_dir: str | Path) -> FactsWorld:
    path = Path(facts_dir) / WORLD
    if not path.is_file():
        raise DataError(f"the real-facts world {path} does not exist: build it first (facts.build=true)")
    return FactsWorld.load(path)


def _world(cfg) -> FactsWorld:
    facts = getattr(cfg, "facts", None)
    if facts is None or not getattr(facts, "dir", None):
        raise DataError(
            "the real-facts task needs the facts section (facts.dir: where its world.json and specialists "
            "live): add experiment=real_facts to comm-train, suite=real_facts to comm-eval, or facts={}"
        )
    return load_world(facts.dir)


def raw_splits(data_cfg, cfg, seed: int = 0) -> datasets.DatasetDict:
    """ "train" rows about ``data.facts.people`` and "validation" rows (same task mix, other seed)
    about ``data.facts.validation_people``, drawn with ``data.facts.seed`` (default: ``seed``,
    the training seed)."""
    world = _world(cfg)
    f = getattr(data_cfg, "facts", None) or FactsTaskConfig()
    seed = seed if f.seed is None else f.seed
    train_people = world.split(f.people)
    rows = tasks.sample(dict(f.mix), f.train_examples, seed, world, train_people, f.two_hop_style)
    splits = {"train": datasets.Dataset.from_list(rows)}
    if f.validation_examples:
        people = world.split(f.validation_people)
        if set(people) & set(train_people):
            raise DataError(
                f"data.facts.validation_people={f.validation_people} shares people with data.facts.people="
                f"{f.people}: validate on people the composition does not train on"
            )
        rows = tasks.sample(
            dict(f.mix), f.validation_examples, seed + 1_000_003, world, people, f.two_hop_style
        )
        splits["validation"] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


def eval_rows(data_cfg, cfg, seed: int = 0) -> datasets.Dataset:
    """The canonical question of ``data.facts.eval_task`` once per person of
    ``data.facts.people`` (once per city of the world for ``skill``), in a fixed order."""
    world = _world(cfg)
    f = getattr(data_cfg, "facts", None) or FactsTaskConfig()
    rows = tasks.examples(f.eval_task, world, world.split(f.people), two_hop_style=f.two_hop_style)
    if f.eval_examples is not None:
        rows = rows[: f.eval_examples]
    return datasets.Dataset.from_list(rows)
