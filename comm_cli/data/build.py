"""From a data config to tokenised train/validation splits, for comm-train and comm-eval.

Real datasets go through ``datasets.load_dataset`` (``loading.py``). A synthetic task
(``data.synthetic=NAME``) is generated in memory by a generator module: ``NAME`` is a
registered experiment (``comm_cli.registry``; its ``data`` module) or the dotted path of any
importable module. That module provides

    raw_splits(data_cfg, cfg, seed) -> DatasetDict   "train" (and "validation") rows
    eval_rows(data_cfg, cfg, seed) -> Dataset         the rows an evaluation task scores

where ``cfg`` is the whole typed config (an experiment reads its own section, e.g. ``kv.dir``).
The core never imports an experiment by name; it looks the module up in the registry.
"""

from __future__ import annotations

import logging

import datasets

from comm_cli.data.loading import load_splits
from comm_cli.data.tokenize import tokenize_split
from comm_cli.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def synthetic_source(name: str):
    """The generator module behind ``data.synthetic=name`` (a registered experiment's, or a
    module of yours named by its dotted path)."""
    from comm_cli.registry import data_source

    module = data_source(name)
    if not (hasattr(module, "raw_splits") and hasattr(module, "eval_rows")):
        raise DataError(
            f"data.synthetic={name}: module {module.__name__} has no raw_splits/eval_rows; point it at a "
            "generator module"
        )
    return module


def raw_splits(data_cfg, cfg=None, seed: int = 0) -> datasets.DatasetDict:
    """Untokenised "train" (and "validation" when there is one) rows."""
    if data_cfg.synthetic is None:
        return load_splits(data_cfg)
    return synthetic_source(data_cfg.synthetic).raw_splits(data_cfg, cfg, seed)


def eval_rows(data_cfg, cfg=None, seed: int = 0, limit: int | None = None) -> datasets.Dataset:
    """The rows an evaluation task scores: ``data.split`` of a real dataset, or fresh examples
    of a synthetic task."""
    if data_cfg.synthetic is None:
        splits = load_splits(data_cfg)
        if getattr(data_cfg, "held_out", False) and "validation" not in splits:
            raise ConfigError(
                "data.held_out=true needs a held-out part: set data.validation_fraction or data.validation_split"
            )
        rows = splits["validation" if getattr(data_cfg, "held_out", False) else "train"]
    else:
        rows = synthetic_source(data_cfg.synthetic).eval_rows(data_cfg, cfg, seed)
    if limit is not None and limit < len(rows):
        rows = rows.select(range(limit))
    return rows


def tokenized_splits(
    raw: datasets.DatasetDict, tokenizer, data_cfg, plan=None
) -> dict[str, datasets.Dataset]:
    """Tokenise every split (``plan``: how augments with their own tokenizers read each example);
    truncation is reported by ``tokenize_split``."""
    out = {}
    for name, split in raw.items():
        tokenized, stats = tokenize_split(split, tokenizer, data_cfg, split_name=name, plan=plan)
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
