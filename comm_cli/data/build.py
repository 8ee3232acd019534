"""From a data config to tokenised train/validation splits, for comm-train and comm-eval.

Real datasets go through ``datasets.load_dataset`` (``loading.py``); the key-value arithmetic
task is generated in memory from the specialists' world (their keys, values and split), so the
composition trains only on the composition keys.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets

from comm_cli.data import kv_arithmetic as kv
from comm_cli.data.loading import load_splits
from comm_cli.data.tokenize import tokenize_split
from comm_cli.errors import DataError

logger = logging.getLogger(__name__)

SYNTHETIC = ("kv_arithmetic",)


def load_world(kv_dir: str | Path) -> kv.KVWorld:
    path = Path(kv_dir) / "world.json"
    if not path.is_file():
        raise DataError(
            f"the key-value world {path} does not exist: build the specialists first (kv.build=true)"
        )
    return kv.KVWorld.load(path)


def kv_split(task: str, n: int, seed: int, world: kv.KVWorld, key_split: str) -> datasets.Dataset:
    if task == "lookup" and n >= len(world.split_keys(key_split)):
        rows = kv.lookup_all(world, key_split)  # every key once
    else:
        rows = kv.sample_examples(task, n, seed, world=world, split=key_split)
    return datasets.Dataset.from_list(rows)


def _synthetic_world(data_cfg, kv_dir):
    if data_cfg.synthetic not in SYNTHETIC:
        raise DataError(f"data.synthetic '{data_cfg.synthetic}' is not one of {list(SYNTHETIC)}")
    if kv_dir is None:
        raise DataError("the key-value task needs kv.dir (where the specialists and their world.json live)")
    return load_world(kv_dir)


def raw_splits(data_cfg, kv_dir: str | Path | None = None, seed: int = 0) -> datasets.DatasetDict:
    """Untokenised "train" (and "validation" when there is one) rows."""
    if data_cfg.synthetic is None:
        return load_splits(data_cfg)
    world = _synthetic_world(data_cfg, kv_dir)
    splits = {"train": _mixed_split(data_cfg.kv, data_cfg.kv.train_examples, seed, world)}
    if data_cfg.kv.validation_examples:
        # A different seed: fresh expressions over the same keys.
        splits["validation"] = _mixed_split(
            data_cfg.kv, data_cfg.kv.validation_examples, seed + 1_000_003, world
        )
    return datasets.DatasetDict(splits)


def _mixed_split(kv_cfg, n: int, seed: int, world: kv.KVWorld) -> datasets.Dataset:
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


def eval_rows(
    data_cfg, kv_dir: str | Path | None = None, seed: int = 0, limit: int | None = None
) -> datasets.Dataset:
    """The rows an evaluation task scores: ``data.split`` of a real dataset, or
    ``kv.eval_examples`` fresh examples of a synthetic task (a seed no training split uses)."""
    if data_cfg.synthetic is None:
        rows = load_splits(data_cfg)["train"]
    else:
        world = _synthetic_world(data_cfg, kv_dir)
        rows = kv_split(
            data_cfg.kv.task, data_cfg.kv.eval_examples, seed + 2_000_029, world, data_cfg.kv.key_split
        )
    if limit is not None and limit < len(rows):
        rows = rows.select(range(limit))
    return rows


def tokenized_splits(raw: datasets.DatasetDict, tokenizer, data_cfg) -> dict[str, datasets.Dataset]:
    """Tokenise every split; truncation is reported by ``tokenize_split``."""
    out = {}
    for name, split in raw.items():
        tokenized, stats = tokenize_split(split, tokenizer, data_cfg)
        if stats.num_kept == 0:
            raise DataError(
                f"the {name} split has no example left after tokenisation (max_length={data_cfg.max_length}): "
                "raise data.max_length or check the fields"
            )
        out[name] = tokenized.with_format("python")
        logger.info(
            "%s split: %d examples (%d truncated, %d dropped)",
            name,
            stats.num_kept,
            stats.num_truncated,
            stats.num_dropped,
        )
    return out
