"""Load the train (and validation) split for ``comm-train`` / ``comm-eval`` through ``datasets``.

One code path for every source: a Hub name ("openai/gsm8k"), a builder name with local files
("json" + ``data_files``), local files alone (the builder is inferred from the extension), a local
directory of data files, or a directory written by ``Dataset.save_to_disk``. All of them end in
``datasets.load_dataset`` (or ``load_from_disk``), so Hub caching, revisions and configs behave as
users know them from other HF tools.

Whatever ``datasets`` itself reports badly (a glob that matches nothing raises ``StopIteration``, an
empty JSON Lines file too, a missing column surfaces later as a ``KeyError`` deep in ``map``) is
checked here first and raised as a one-line ``DataError`` that names the problem and the fix.
"""

from __future__ import annotations

import glob
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from comm_cli.errors import DataError

logger = logging.getLogger(__name__)

FORMATS = ("prompt_completion", "text")

# Builders we accept by name in ``path``; the ones that read plain local files.
BUILDERS = ("json", "csv", "parquet", "arrow", "text")

# Extension -> (builder, extra builder kwargs). Compressed files (".jsonl.gz") are named by the
# extension under the compression suffix; ``datasets`` decompresses them itself.
EXTENSIONS: dict[str, tuple[str, dict[str, Any]]] = {
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".ndjson": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".parquet": ("parquet", {}),
    ".arrow": ("arrow", {}),
    ".txt": ("text", {}),
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_GLOB_CHARS = ("*", "?", "[")


@dataclass
class DataConfig:
    """Where the data is and how to turn it into training examples.

    Only simple typed fields, so that a Hydra structured config can be built from it.
    ``data_files`` is typed ``Any`` because OmegaConf structured configs cannot hold the union it
    really is: ``str | list[str] | dict[str, str | list[str]] | None`` (a dict maps split names to
    files, as in ``datasets.load_dataset``).
    """

    path: str | None = None
    name: str | None = None
    data_files: Any = None
    split: str = "train"
    validation_split: str | None = None
    validation_fraction: float = 0.0
    seed: int = 0
    format: str = "prompt_completion"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    text_field: str = "text"
    max_length: int = 512
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    add_bos: bool = True
    add_eos: bool = True
    revision: str | None = None
    trust_remote_code: bool = False
    # evaluation only: score the held-out part (validation_split, or the seeded validation_fraction
    # carved off data.split exactly as training carved it) instead of data.split
    held_out: bool = False


def text_fields(cfg: DataConfig) -> list[str]:
    """The columns ``cfg.format`` reads: prompt and completion, or the text column."""
    if cfg.format == "prompt_completion":
        return [cfg.prompt_field, cfg.completion_field]
    if cfg.format == "text":
        return [cfg.text_field]
    raise DataError(f"unknown data.format {cfg.format!r}; use one of {', '.join(FORMATS)}")


def load_splits(cfg: DataConfig) -> datasets.DatasetDict:
    """Load ``cfg.split`` as "train" and, when configured, a "validation" split.

    The validation split is either ``cfg.validation_split`` (a split present in the data) or a
    seeded ``cfg.validation_fraction`` of the train split, carved off *before*
    ``max_train_examples`` applies, so changing the train budget never changes the validation set.
    ``max_train_examples`` / ``max_eval_examples`` keep the first N rows (after the carve-off,
    which shuffles the train split).

    Every configured text field is checked on every returned split; numeric columns (JSON numbers,
    CSV cells that look like numbers) are cast to strings, since completions such as "42" are
    text to the tokenizer.
    """
    _check_config(cfg)
    fields = text_fields(cfg)
    loaded = _load(cfg, fields)
    source = _describe_source(cfg)

    train = _pick_split(loaded, cfg.split, source, "data.split")
    validation = None
    if cfg.validation_split is not None:
        if cfg.validation_fraction > 0:
            logger.warning(
                "data.validation_split=%r is set, so data.validation_fraction=%s is ignored",
                cfg.validation_split,
                cfg.validation_fraction,
            )
        validation = _pick_split(loaded, cfg.validation_split, source, "data.validation_split")
    elif cfg.validation_fraction > 0:
        train, validation = _carve_validation(train, cfg.validation_fraction, cfg.seed, cfg.split, source)

    splits = {"train": train}
    if validation is not None:
        splits["validation"] = validation
    out = {}
    for key, dataset in splits.items():
        split_name = cfg.split if key == "train" else (cfg.validation_split or f"{cfg.split} (held-out part)")
        if len(dataset) == 0:
            raise DataError(
                f"the {split_name!r} split of {source} is empty; check the data files or data.split"
            )
        limit = cfg.max_train_examples if key == "train" else cfg.max_eval_examples
        if limit is not None and limit < len(dataset):
            dataset = dataset.select(range(limit))
        out[key] = ensure_text_fields(dataset, fields, f"the {split_name!r} split of {source}")
    return datasets.DatasetDict(out)


def ensure_text_fields(dataset: datasets.Dataset, fields: Sequence[str], where: str) -> datasets.Dataset:
    """Check that ``fields`` are columns of ``dataset`` holding text; cast numeric columns to text.

    A missing field is the most common config mistake with a new dataset, so the message lists
    the columns that do exist and the config key to set.
    """
    columns = list(dataset.column_names)
    for name in fields:
        if name not in columns:
            hint = ""
            if "text" in columns and len(fields) == 2:
                hint = " (for plain text set data.format=text)"
            raise DataError(
                f"field {name!r} is not a column of {where}; available columns: {', '.join(columns)}. "
                f"Set data.prompt_field / data.completion_field / data.text_field to one of them{hint}"
            )
        feature = dataset.features[name]
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            continue
        if isinstance(feature, datasets.Value) and feature.dtype != "null":
            # JSON numbers, CSV cells parsed as numbers: the tokenizer wants their text.
            dataset = dataset.cast_column(name, datasets.Value("string"))
            continue
        raise DataError(
            f"field {name!r} of {where} holds {feature}, not text; "
            "point the field option at a column of strings (or flatten the data first)"
        )
    return dataset


def _check_config(cfg: DataConfig) -> None:
    text_fields(cfg)  # validates the format
    if not 0.0 <= cfg.validation_fraction < 1.0:
        raise DataError(
            f"data.validation_fraction={cfg.validation_fraction} is outside [0, 1); "
            "use e.g. 0.05 to hold out 5% of the train split, or 0 for none"
        )
    if cfg.validation_split is not None and cfg.validation_split == cfg.split:
        raise DataError(
            f"data.validation_split and data.split are both {cfg.split!r}, so validation would score "
            "training examples; use another split or data.validation_fraction"
        )
    for key in ("max_train_examples", "max_eval_examples"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise DataError(f"data.{key}={value} must be a positive number of examples, or null for all")
    if cfg.max_length < 2:
        raise DataError(f"data.max_length={cfg.max_length} leaves nothing to predict; use at least 2 tokens")
    if cfg.path is None and cfg.data_files is None:
        raise DataError("no dataset given; set data.path (a Hub name or local path) or data.data_files")


def check_local_data(cfg: DataConfig) -> None:
    """What can be checked without reading any data: the config's values, and that every local
    file it names exists. The CLIs call this before a model is built or an experiment prepares
    anything, so a typo in a path costs a second, not a model load. A synthetic task
    (``data.synthetic``) names no files."""
    if getattr(cfg, "synthetic", None) is not None:
        return
    _check_config(cfg)
    path = os.path.expanduser(cfg.path) if cfg.path is not None else None
    base_dir = path if path is not None and os.path.isdir(path) else None
    data_files = _normalise_data_files(cfg.data_files, base_dir)
    if path is not None and base_dir is None and not os.path.isfile(path) and path not in BUILDERS:
        if _looks_like_local_file(path):
            raise DataError(f"data file {cfg.path!r} does not exist; check data.path")
        return  # a Hub dataset: only loading can tell
    if data_files is not None:
        _check_local_files(data_files)


def _load(cfg: DataConfig, fields: list[str]) -> datasets.DatasetDict:
    """Resolve ``cfg.path`` / ``cfg.data_files`` to a ``load_dataset`` call and run it."""
    path = os.path.expanduser(cfg.path) if cfg.path is not None else None
    base_dir = None
    if path is not None and os.path.isdir(path):
        if _is_saved_to_disk(path):
            return _load_from_disk(path)
        base_dir = path
    data_files = _normalise_data_files(cfg.data_files, base_dir)

    if path is not None and os.path.isfile(path):
        if data_files is not None:
            raise DataError(
                f"data.path {cfg.path!r} is a file and data.data_files is also set; give the file in one of them"
            )
        data_files = {"train": [path]}
        path = None
    elif path is not None and base_dir is None and path not in BUILDERS:
        if _looks_like_local_file(path):
            raise DataError(f"data file {cfg.path!r} does not exist; check data.path")
        if data_files is not None and _all_local_and_present(data_files):
            raise DataError(
                f"unknown builder {cfg.path!r} for local data.data_files; set data.path to one of "
                f"{', '.join(BUILDERS)}, or leave it empty to infer it from the file extension"
            )

    kwargs: dict[str, Any] = {}
    if path is None or path in BUILDERS:
        # Local files: check them ourselves (datasets raises StopIteration on an empty glob or file).
        if data_files is None:
            raise DataError(f"data.path={cfg.path!r} is a builder name; list the files in data.data_files")
        _check_local_files(data_files)
        builder, kwargs = _infer_builder(data_files, path)
        if builder == "csv":
            # Keep CSV cells as written: "007" stays "007" and "NA"/"null" stay text, not missing.
            kwargs = {**kwargs, "keep_default_na": False, "converters": {name: str for name in fields}}
        path = builder
    elif data_files is not None and base_dir is not None:
        _check_local_files(data_files)

    try:
        loaded = datasets.load_dataset(
            path,
            name=cfg.name,
            data_files=data_files,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            **kwargs,
        )
    except (
        datasets.exceptions.DatasetsError,
        FileNotFoundError,
        ConnectionError,
        ValueError,
        StopIteration,
    ) as err:
        raise _load_error(cfg, path, err) from err
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _load_error(cfg: DataConfig, path: str, err: BaseException) -> DataError:
    reason = _one_line(err)
    if "corresponds to no data" in reason:
        return DataError(f"{_describe_source(cfg)} contains no examples; check the data files")
    if path in BUILDERS:
        return DataError(
            f"cannot read {_describe_source(cfg)} with the {path!r} builder: {reason}; "
            "fix the file or set data.path to the right builder"
        )
    if os.path.isdir(os.path.expanduser(path)):
        return DataError(
            f"cannot load the local directory {path!r}: {reason}; point data.data_files at its files"
        )
    return DataError(
        f"cannot load dataset {cfg.path!r} (name={cfg.name!r}, revision={cfg.revision!r}): it is not a local "
        f"file or directory, and the Hub said: {reason}. Check the name, config and revision, the network "
        "or HF_HUB_OFFLINE, or use local files via data.data_files"
    )


def _one_line(err: BaseException, limit: int = 300) -> str:
    """The error's message on one line, cut to ``limit`` characters (datasets lists every extension it knows)."""
    text = " ".join(str(err).split())
    if err.__cause__ is not None and (not text or text.startswith("An error occurred")):
        text = f"{text} ({' '.join(str(err.__cause__).split())})".strip()
    text = text or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_saved_to_disk(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "dataset_dict.json")) or os.path.isfile(
        os.path.join(directory, "state.json")
    )


def _load_from_disk(directory: str) -> datasets.DatasetDict:
    loaded = datasets.load_from_disk(directory)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _normalise_data_files(data_files: Any, base_dir: str | None) -> dict[str, list[str]] | None:
    """Plain ``{split: [file, ...]}`` (OmegaConf containers included); a bare file or list is "train".

    Relative files under a local directory ``path`` are joined to it, as ``datasets`` would.
    """
    if data_files is None:
        return None
    if isinstance(data_files, str) or not isinstance(data_files, (Mapping, Sequence)):
        data_files = {"train": [data_files]}
    elif not isinstance(data_files, Mapping):
        data_files = {"train": list(data_files)}
    out: dict[str, list[str]] = {}
    for split, files in data_files.items():
        files = [files] if isinstance(files, str) else list(files)
        if not files:
            raise DataError(
                f"data.data_files lists no files for split {split!r}; add a file or remove the split"
            )
        resolved = []
        for file in files:
            file = str(file)
            if not _is_url(file):
                file = os.path.expanduser(file)
                if base_dir is not None and not os.path.isabs(file):
                    file = os.path.abspath(os.path.join(base_dir, file))
            resolved.append(file)
        out[str(split)] = resolved
    return out


def _is_url(file: str) -> bool:
    return "://" in file


def _is_glob(file: str) -> bool:
    return any(char in file for char in _GLOB_CHARS)


def _looks_like_local_file(path: str) -> bool:
    """A ``path`` that cannot be a Hub name: absolute, relative with ./ or ../, or a data file name."""
    if path.startswith(("/", "./", "../", "~")):
        return True
    if os.sep != "/" and os.sep in path:  # a Windows path; Hub names use "/"
        return True
    return _extension(path) in EXTENSIONS


def _all_local_and_present(data_files: dict[str, list[str]]) -> bool:
    files = [file for group in data_files.values() for file in group]
    return all(
        not _is_url(file) and (glob.glob(file) if _is_glob(file) else os.path.exists(file)) for file in files
    )


def _check_local_files(data_files: dict[str, list[str]]) -> None:
    """Every local file must exist and be non-empty; every glob must match something."""
    for split, files in data_files.items():
        for file in files:
            if _is_url(file):
                continue
            matches = sorted(glob.glob(file)) if _is_glob(file) else [file]
            if not matches:
                raise DataError(
                    f"no file matches {file!r} (data.data_files, split {split!r}); check the pattern"
                )
            for match in matches:
                if not os.path.exists(match):
                    raise DataError(f"data file {match!r} does not exist; check data.data_files")
                if os.path.isfile(match) and os.path.getsize(match) == 0:
                    raise DataError(
                        f"data file {match!r} is empty; fill it or remove it from data.data_files"
                    )


def _extension(file: str) -> str:
    root, ext = os.path.splitext(file)
    if ext.lower() in _COMPRESSION_SUFFIXES:
        ext = os.path.splitext(root)[1]
    return ext.lower()


def _infer_builder(data_files: dict[str, list[str]], builder: str | None) -> tuple[str, dict[str, Any]]:
    """The builder for these files (from their extensions unless given) and its extra kwargs."""
    variants: dict[tuple, tuple[str, dict[str, Any]]] = {}
    for files in data_files.values():
        for file in files:
            ext = _extension(file)
            if ext in EXTENSIONS:
                name, kwargs = EXTENSIONS[ext]
                variants[(name, tuple(sorted(kwargs.items())))] = (name, kwargs)
            elif builder is None:
                raise DataError(
                    f"cannot tell the format of {file!r} from its extension; use one of "
                    f"{', '.join(EXTENSIONS)} or set data.path to one of {', '.join(BUILDERS)}"
                )
    if builder is None:
        if len(variants) != 1:
            raise DataError(
                "data.data_files mixes file formats; use one format per dataset, "
                "or set data.path to the builder that reads them all"
            )
        name, kwargs = next(iter(variants.values()))
        return name, dict(kwargs)
    # An explicit builder still takes the extension's extras (the TSV separator) when unambiguous.
    matching = [kwargs for name, kwargs in variants.values() if name == builder]
    return builder, dict(matching[0]) if len(matching) == 1 else {}


def _pick_split(loaded: datasets.DatasetDict, split: str, source: str, key: str) -> datasets.Dataset:
    if split not in loaded:
        raise DataError(
            f"split {split!r} is not in {source}; available splits: {', '.join(loaded)}. Set {key} to one of them"
        )
    return loaded[split]


def _carve_validation(
    train: datasets.Dataset, fraction: float, seed: int, split: str, source: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out ``ceil(fraction * n)`` shuffled rows of the train split (seeded, disjoint)."""
    num_validation = math.ceil(fraction * len(train))
    if len(train) == 0:
        raise DataError(f"the {split!r} split of {source} is empty; check the data files or data.split")
    if num_validation >= len(train):
        raise DataError(
            f"data.validation_fraction={fraction} of {len(train)} examples leaves none for training; "
            "use a smaller fraction or more data"
        )
    parts = train.train_test_split(test_size=num_validation, shuffle=True, seed=seed)
    return parts["train"], parts["test"]


def _describe_source(cfg: DataConfig) -> str:
    if cfg.path is not None and cfg.path not in BUILDERS:
        return f"dataset {cfg.path!r}" + (f" ({cfg.name})" if cfg.name else "")
    return f"data files {cfg.data_files!r}"
