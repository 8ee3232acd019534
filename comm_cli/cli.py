"""What `comm-train` and `comm-eval` share: where the configs live, how a user's mistake is
reported (one line, non-zero exit), and logging that only the main process writes.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from comm_cli.errors import CommError

EXIT_USER_ERROR = 2


def config_dir() -> str:
    """Absolute path of the shipped Hydra configs: ``comm_cli/conf`` inside an installed wheel,
    the top-level ``conf/`` of a checkout (editable installs included). Absolute, so the console
    scripts work from any directory."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise RuntimeError(
        f"comm's configs are missing: neither {package / 'conf'} nor {package.parent / 'conf'} exists"
    )


def resolve_output_dir(cfg) -> None:
    """``output_dir: null`` means Hydra's run directory (``outputs/<name>``, or the sweep job's)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    if cfg.output_dir is None:
        with open_dict(cfg):
            cfg.output_dir = HydraConfig.get().runtime.output_dir


def is_main_process() -> bool:
    """Rank 0 (of the whole job) as Accelerate/torchrun announce it through the environment."""
    return os.environ.get("RANK", "0") == "0"


def setup_logging(log_file: Path | None = None, main_process: bool | None = None) -> None:
    """INFO to stdout on the main process (WARNING elsewhere), plus ``log_file`` (appended, so a
    resumed run keeps its history) on the main process."""
    main_process = is_main_process() if main_process is None else main_process
    root = logging.getLogger()
    for handler in list(root.handlers):  # Hydra's or an earlier job's
        root.removeHandler(handler)
        if getattr(handler, "_comm", False):
            handler.close()
    root.setLevel(logging.INFO if main_process else logging.WARNING)
    fmt = logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    stream._comm = True
    root.addHandler(stream)
    if log_file is not None and main_process:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, mode="a")
        file_handler.setFormatter(fmt)
        file_handler._comm = True
        root.addHandler(file_handler)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def reset_accelerate_state() -> None:
    """Forget the process-wide Accelerate state, so that the next job in this process (a Hydra
    sweep's next run, a test) builds a fresh Accelerator with its own settings."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def run_reporting_errors(program: str, fn: Callable[[], object]) -> object:
    """Run ``fn``; a CommError becomes one line on stderr and exit status 2."""
    try:
        return fn()
    except CommError as err:
        print(f"{program}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def _dataclass_of(annotation):
    """The dataclass inside an annotation such as ``ModelSpec`` or ``ModelSpec | None``."""
    import dataclasses
    import typing

    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def schema_keys(schema: type, prefix: str = "") -> tuple[set[str], set[str]]:
    """(every dotted key of a dataclass schema, the keys that are free-form dicts)."""
    import dataclasses
    import typing

    keys, free = set(), set()
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        full = f"{prefix}{f.name}"
        keys.add(full)
        annotation = hints[f.name]
        child = _dataclass_of(annotation)
        if typing.get_origin(annotation) in (dict, list):
            free.add(full)  # free keys / indices: Hydra and the schema judge what is below
        elif child is not None:
            sub_keys, sub_free = schema_keys(child, f"{full}.")
            keys |= sub_keys
            free |= sub_free
        elif annotation is typing.Any:
            free.add(full)
    return keys, free


def check_override_keys(program: str, argv: list[str], schema: type, groups: set[str]) -> None:
    """Reject a misspelt key (``optimizer.lrr=1``) with a one-line message and a suggestion,
    before Hydra composes anything. Group choices (``anchor=...``), appends (``+key``), deletions
    (``~key``) and ``hydra.*`` keys are left to Hydra."""
    known, free = schema_keys(schema)
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0]
        if key.startswith(("+", "~", "hydra.", "hydra/")) or "@" in key or "/" in key:
            continue
        if key in groups or key in known or any(key.startswith(f"{p}.") for p in free):
            continue
        suggestion = difflib.get_close_matches(key, sorted(known | groups), n=1)
        hint = f" (did you mean '{suggestion[0]}'?)" if suggestion else ""
        print(
            f"{program}: error: unknown config key '{key}'{hint}: check its spelling; "
            f"`{program} --cfg job` prints every key",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_USER_ERROR)
