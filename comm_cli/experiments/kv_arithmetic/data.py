"""The key-value experiment's data generator: ``data.synthetic=kv_arithmetic``.

The rows are generated in memory from the specialists' world (their keys, values and split), so
the composition trains only on the composition keys and is scored on the held-out ones. The
core's ``comm_cli.data.build`` finds this module by the name in ``data.synthetic`` and calls
``raw_splits`` / ``eval_rows``; ``data.kv`` holds the task's options, ``kv.dir`` the world.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from comm_cli.errors import DataError
from comm_cli.experiments.kv_arithmetic import tasks as kv
from comm_cli.experiments.kv_arithmetic.config import KVTaskConfig
from comm_cli.experiments.kv_arithmetic.world import KVWorld


def load_world(kv_dir: str | Path) -> KVWorld:
    path = Path(kv_dir) / "world.json"
    if not path.is_file():
        raise DataError(
            f"the key-value world {path} does not exist: build the specialists first (kv.build=true)"
        )
    return KVWorld.load(path)


def _world(cfg) -> KVWorld:
    kv_cfg = getattr(cfg, "kv", None)
    if kv_cfg is None or not getattr(kv_cfg, "dir", None):
        raise DataError(
            "the key-value task needs the kv section (kv.dir: where the specialists and their world.json "
            "live): add experiment=kv_arithmetic to comm-train, suite=kv_arithmetic to comm-eval, or kv={}"
        )
    return load_world(kv_cfg.dir)


def kv_split(task: str, n: int, seed: int, world: KVWorld, key_split: str) -> datasets.Dataset:
    if task == "lookup" and n >= len(world.split_keys(key_split)):
        rows = kv.lookup_all(world, key_split)  # every key once
    else:
        rows = kv.sample_examples(task, n, seed, world=world, split=key_split)
    return datasets.Dataset.from_list(rows)


def _task(data_cfg) -> KVTaskConfig:
    """``data.kv`` (its defaults when the config names the generator without the section)."""
    return getattr(data_cfg, "kv", None) or KVTaskConfig()


def raw_splits(data_cfg, cfg, seed: int = 0) -> datasets.DatasetDict:
    """Training rows ("train", and "validation" when ``data.kv.validation_examples`` > 0)."""
    world, task = _world(cfg), _task(data_cfg)
    splits = {"train": _mixed_split(task, task.train_examples, seed, world)}
    if task.validation_examples:
        # A different seed: fresh expressions over the same keys.
        splits["validation"] = _mixed_split(task, task.validation_examples, seed + 1_000_003, world)
    return datasets.DatasetDict(splits)


def _mixed_split(kv_cfg, n: int, seed: int, world: KVWorld) -> datasets.Dataset:
    """``n`` examples of the task, of which ``arithmetic_fraction`` are plain numeric arithmetic."""
    fraction = kv_cfg.arithmetic_fraction
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"data.kv.arithmetic_fraction must be in [0, 1), got {fraction}")
    n_arithmetic = round(fraction * n)
    split = kv_split(kv_cfg.task, n - n_arithmetic, seed, world, kv_cfg.key_split)
    if n_arithmetic:
        arithmetic = kv_split("arithmetic", n_arithmetic, seed + 7, world, "all")
        split = datasets.concatenate_datasets([split, arithmetic]).shuffle(seed=seed).flatten_indices()
    return split


def eval_rows(data_cfg, cfg, seed: int = 0) -> datasets.Dataset:
    """``data.kv.eval_examples`` fresh examples of the task (a seed no training split uses)."""
    world, task = _world(cfg), _task(data_cfg)
    return kv_split(task.task, task.eval_examples, seed + 2_000_029, world, task.key_split)
