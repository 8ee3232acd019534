"""Logging that only the main process writes: comm's own lines on the console, everything in
the run's log file. Low-level, so that the training and evaluation loops and the command-line
entry points all set it up the same way.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def is_main_process() -> bool:
    """Rank 0 (of the whole job) as Accelerate/torchrun announce it through the environment."""
    return os.environ.get("RANK", "0") == "0"


# Libraries whose INFO lines are detail for the log file, not the console (Accelerate prints six
# lines per checkpoint; comm prints one of its own).
_FILE_ONLY_INFO = ("accelerate", "deepspeed", "torch.distributed")


class _ConsoleFilter(logging.Filter):
    """Keep the console to comm's own lines: other libraries' INFO goes to the log file only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not any(record.name == n or record.name.startswith(f"{n}.") for n in _FILE_ONLY_INFO)


def setup_logging(
    log_file: Path | None = None,
    main_process: bool | None = None,
    console=None,
    level: int = logging.INFO,
) -> None:
    """``level`` (INFO) to stdout on the main process (WARNING elsewhere), plus ``log_file``
    (appended, so a resumed run keeps its history) on the main process. Accelerate's and
    DeepSpeed's INFO lines go to the file only. ``console``: another stream than stdout (the
    commands whose stdout is their output, such as comm-generate's jsonl, log to stderr)."""
    main_process = is_main_process() if main_process is None else main_process
    root = logging.getLogger()
    for handler in list(root.handlers):  # Hydra's or an earlier job's
        root.removeHandler(handler)
        if getattr(handler, "_comm", False):
            handler.close()
    root.setLevel(level if main_process else logging.WARNING)
    fmt = logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(console or sys.stdout)
    stream.setFormatter(fmt)
    stream.addFilter(_ConsoleFilter())
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
