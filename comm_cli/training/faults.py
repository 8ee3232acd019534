"""Fault injection for the crash tests, through the environment.

COMM_FAULT_KILL_AT_STEP=N    SIGKILL this process right after step N's optimizer step
COMM_FAULT_KILL_IN_SAVE=N    SIGKILL it half-way through writing step N's checkpoint
COMM_FAULT_STEP_SECONDS=S    make every step last at least S seconds, so that a test can
                             signal a run that is surely still training
"""

from __future__ import annotations

import os
import signal

KILL_AT_STEP = "COMM_FAULT_KILL_AT_STEP"
KILL_IN_SAVE = "COMM_FAULT_KILL_IN_SAVE"
STEP_SECONDS = "COMM_FAULT_STEP_SECONDS"


def kill_if_asked(variable: str, step: int) -> None:
    """SIGKILL this process when ``variable`` names this step."""
    if os.environ.get(variable) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def step_seconds() -> float:
    """The least time a step should take (0: no delay)."""
    return float(os.environ.get(STEP_SECONDS, "0") or 0)
