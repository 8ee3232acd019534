"""Translation rows from FLORES-200-style files: ``data.synthetic=comm_cli.data.parallel_text``.

FLORES-200 ships each language as a plain-text file, one sentence per line, the files of a split
aligned line by line (``dev/eng_Latn.dev``, ``dev/swh_Latn.dev``, ...). Point
``data.data_files`` at a source and a target file::

    data:
      synthetic: comm_cli.data.parallel_text
      data_files: {source: flores200/devtest/eng_Latn.devtest, target: flores200/devtest/swh_Latn.devtest}

and every line pair becomes a prompt/completion row::

    prompt:      "Translate from eng_Latn to swh_Latn.\\neng_Latn: <source sentence>\\nswh_Latn:"
    completion:  " <target sentence>"

The language names are the file names' stems (FLORES codes); the completion starts with a space so
that BPE tokenizers read the sentence's first word as they do inside text. Generation should stop
at a newline (the task presets set ``stop: ["\\n"]``). The module is found through the config like
any generator (``comm_cli.data.build``): ``raw_splits`` for comm-train, ``eval_rows`` for comm-eval.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from comm_cli.errors import DataError

PROMPT = "Translate from {source_lang} to {target_lang}.\n{source_lang}: {source}\n{target_lang}:"


def read_pairs(data_files) -> tuple[list[dict], str, str]:
    """(rows, source language, target language) from ``{source: FILE, target: FILE}``."""
    if not hasattr(data_files, "get") or not data_files.get("source") or not data_files.get("target"):
        raise DataError(
            "FLORES-style data needs data.data_files={source: FILE, target: FILE} (aligned, one sentence a line)"
        )
    paths = {side: Path(str(data_files[side])).expanduser() for side in ("source", "target")}
    lines = {}
    for side, path in paths.items():
        if not path.is_file():
            raise DataError(f"the {side} file {path} does not exist: check data.data_files.{side}")
        lines[side] = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    if len(lines["source"]) != len(lines["target"]):
        raise DataError(
            f"{paths['source']} has {len(lines['source'])} lines and {paths['target']} {len(lines['target'])}: "
            "parallel files must be aligned line by line"
        )
    source_lang, target_lang = (paths[side].name.split(".")[0] for side in ("source", "target"))
    rows = [
        {
            "prompt": PROMPT.format(source_lang=source_lang, target_lang=target_lang, source=src.strip()),
            "completion": " " + tgt.strip(),
        }
        for src, tgt in zip(lines["source"], lines["target"])
        if src.strip() and tgt.strip()
    ]
    if not rows:
        raise DataError(f"{paths['source']} and {paths['target']} hold no sentence pair")
    return rows, source_lang, target_lang


def raw_splits(data_cfg, cfg=None, seed: int = 0) -> datasets.DatasetDict:
    """All pairs as "train", and a seeded ``validation_fraction`` of them as "validation"."""
    rows, _, _ = read_pairs(data_cfg.data_files)
    train = datasets.Dataset.from_list(rows)
    if data_cfg.validation_fraction > 0 and len(train) > 1:
        parts = train.train_test_split(test_size=data_cfg.validation_fraction, seed=data_cfg.seed)
        return datasets.DatasetDict({"train": parts["train"], "validation": parts["test"]})
    return datasets.DatasetDict({"train": train})


def eval_rows(data_cfg, cfg=None, seed: int = 0) -> datasets.Dataset:
    rows, _, _ = read_pairs(data_cfg.data_files)
    return datasets.Dataset.from_list(rows)
