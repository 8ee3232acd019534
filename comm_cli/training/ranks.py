"""What every process of a run must learn together.

A process that raised alone would leave the others waiting in the next collective (until its
timeout, minutes later, on another node). So a condition one process may meet alone (a stop
signal, a failed write, a file missing on one node while the models load) is first combined over
all processes, and then every process acts on the same answer at the same point: a setup step
that fails on any process stops every process, all with the same one line (``agree``).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TypeVar

import torch

from comm_cli.errors import CommError, TrainingStopped
from comm_cli.training.preemption import shielded

T = TypeVar("T")

# Set on an error that every process raises with the same message: comm_cli.cli prints it once,
# from the main process.
EVERY_PROCESS = "every_process"


class FailedElsewhere(CommError):
    """A setup step failed on another process (its own line is this one's message)."""


class CrashedElsewhere(RuntimeError):
    """A setup step crashed on another process (its traceback is in that process's output)."""


def any_process(accelerator, flag: bool) -> bool:
    """Whether ``flag`` is true on any process. A collective under several processes: every
    process calls it at the same point and gets the same answer."""
    if accelerator.num_processes == 1:
        return bool(flag)
    with shielded():
        tensor = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
        return accelerator.reduce(tensor, reduction="sum").item() > 0


def _report(failure: BaseException | None) -> tuple[str, str, str] | None:
    """(kind, what went wrong, host) of a failure, small enough to send to every process."""
    if failure is None:
        return None
    if isinstance(failure, TrainingStopped):
        kind, text = "stop", str(failure)
    elif isinstance(failure, CommError):
        kind, text = "user", str(failure)
    else:
        kind, text = "crash", f"{type(failure).__name__}: {' '.join(str(failure).split())[:300]}"
    return kind, text, socket.gethostname()


def agree(accelerator, failure: BaseException | None, what: str) -> None:
    """Raise on every process if ``what`` failed on any (``failure``: this process's own error,
    or None). Every process raises the same line: the first failing process its own error, the
    others one that names that process and its host and carries its message. A collective:
    every process calls it at the same point."""
    with shielded():  # a stop signal that arrives in here waits until both collectives are done
        if not any_process(accelerator, failure is not None):
            return
        if accelerator.num_processes == 1:
            reports = [_report(failure)]
        else:
            from accelerate.utils import gather_object

            reports = gather_object([_report(failure)])
    first = next(index for index, report in enumerate(reports) if report is not None)
    if first == accelerator.process_index:
        setattr(failure, EVERY_PROCESS, True)
        raise failure
    kind, text, host = reports[first]
    where = f"on process {first} of {accelerator.num_processes} (host {host})"
    if kind == "stop":
        error: BaseException = TrainingStopped(text)
    elif kind == "user":
        error = FailedElsewhere(f"{what} failed {where}: {text}")
    else:
        error = CrashedElsewhere(
            f"{what} crashed {where} ({text}): its traceback is in that process's output"
        )
    setattr(error, EVERY_PROCESS, True)
    raise error


def _attempt(step: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    try:
        return step(), None
    except Exception as err:  # a stop signal (TrainingStopped) included: it is agreed like any failure
        return None, err


def together(accelerator, what: str, step: Callable[[], T]) -> T:
    """``step()`` on every process; if it fails on any, every process stops with one line."""
    result, failure = _attempt(step)
    agree(accelerator, failure, what)
    return result


def main_process_first(accelerator, what: str, step: Callable[[], T]) -> T:
    """``step()`` on the main process, then on the others (which read what it cached), every
    failure agreed: unlike Accelerate's ``main_process_first``, a main process that fails does
    not leave the others at its barrier, nor one that fails afterwards the main process."""
    result, failure = None, None
    if accelerator.is_main_process:
        result, failure = _attempt(step)
    agree(accelerator, failure, what)
    if not accelerator.is_main_process:
        result, failure = _attempt(step)
    agree(accelerator, failure, what)
    return result
