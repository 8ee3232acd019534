"""Fault injection for the crash tests, through the environment.

COMM_FAULT_KILL_AT_STEP=N    SIGKILL this process right after step N's optimizer step
COMM_FAULT_KILL_IN_SAVE=N    SIGKILL it half-way through writing step N's checkpoint
COMM_FAULT_STEP_SECONDS=S    make every step last at least S seconds, so that a test can
                             signal a run that is surely still training
COMM_FAULT_SETUP_SECONDS=S   pause S seconds half-way through building the augment-state cache
                             (its states written, its manifest not), so that a test can stop a
                             start-up in the middle of a build
COMM_FAULT_MISSING_MODEL_ON=I  process I loads its anchor from a directory that does not exist,
                             as on a node where the model's files are missing
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from pathlib import Path

KILL_AT_STEP = "COMM_FAULT_KILL_AT_STEP"
KILL_IN_SAVE = "COMM_FAULT_KILL_IN_SAVE"
STEP_SECONDS = "COMM_FAULT_STEP_SECONDS"
SETUP_SECONDS = "COMM_FAULT_SETUP_SECONDS"
MISSING_MODEL_ON = "COMM_FAULT_MISSING_MODEL_ON"

logger = logging.getLogger(__name__)


def kill_if_asked(variable: str, step: int) -> None:
    """SIGKILL this process when ``variable`` names this step."""
    if os.environ.get(variable) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def step_seconds() -> float:
    """The least time a step should take (0: no delay)."""
    return float(os.environ.get(STEP_SECONDS, "0") or 0)


def pause_in_setup(where: str) -> None:
    """Sleep COMM_FAULT_SETUP_SECONDS (if set), saying so in the log a test waits on."""
    seconds = float(os.environ.get(SETUP_SECONDS, "0") or 0)
    if seconds:
        logger.info("%s: pausing %s s %s", SETUP_SECONDS, seconds, where)
        time.sleep(seconds)


def with_missing_model(cfg, process_index: int):
    """``cfg``, or on the process COMM_FAULT_MISSING_MODEL_ON names a copy whose anchor lies in a
    directory that does not exist."""
    if os.environ.get(MISSING_MODEL_ON) != str(process_index):
        return cfg
    missing = str(Path(cfg.anchor.name_or_path) / "missing-on-this-node")
    return dataclasses.replace(cfg, anchor=dataclasses.replace(cfg.anchor, name_or_path=missing))
