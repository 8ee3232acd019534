"""Stopping on SIGTERM or SIGINT without losing work, from the first line of a job to its end.

Schedulers (SLURM, Kubernetes, cloud spot instances) send SIGTERM some seconds before they kill
a job; a user sends SIGINT with Ctrl-C. ``StopSignals`` catches both for the whole job:

- During start-up (data, specialists, caches, model loading: minutes, before the first step) the
  first signal raises ``TrainingStopped`` at once, wherever the job is: a stop flag would wait for
  the build to end. Everything comm keeps is written under a temporary name and renamed when
  complete (``comm_cli.atomic``), so an interrupted build leaves nothing that looks complete.
  Inside a collective that every process must finish (``shielded``) the signal is raised when
  the collective ends, so no process leaves the others waiting in it.
- Once training runs (``training()``), a signal is a request that the loop reads at the next step
  boundary: it writes a checkpoint there, closes the tracker and exits with status 75, and
  ``resume=auto`` continues exactly where it stopped.

A second signal within ``REPEAT_SECONDS`` of the first is the same request delivered twice: SLURM
and a terminal signal every process of a job, and a launcher (torchrun, comm-launch) passes the
signal it got on to its workers as well. A later one is not caught: a user who presses Ctrl-C
twice means "now". Under several processes each rank catches its own signal; the loop
combines the requests of all ranks at every step, so they all stop at the same boundary.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator

from comm_cli.errors import TrainingStopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_SECONDS = 1.0

# The StopSignals of the running job, and how deep inside a collective it is (``shielded``).
_state: dict = {"active": None, "shield": 0}


class StopSignals:
    """Catch SIGTERM/SIGINT for the duration of a ``with`` block (a whole comm-train job).
    Re-entrant: a block inside an active one (the recipe's, under comm-train's) changes nothing."""

    def __init__(self):
        self.received: int | None = None
        self.starting = True  # until training(): a signal raises at once
        self._first_at = 0.0
        self._raised = False
        self._depth = 0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a stop request"

    def training(self) -> None:
        """From here on a signal is a request read at the next step boundary."""
        self.starting = False

    def startup_stop(self) -> TrainingStopped:
        return TrainingStopped(
            f"stopped by {self.name} during start-up, before the first training step; nothing was left "
            "half-written: run the same command again (with resume=auto it continues from the newest checkpoint)"
        )

    def check_cause(self, error: BaseException) -> None:
        """Called with an error that ended a job: if a stop signal arrived during start-up, the
        stop is what to report (a process whose peer stopped first finds its collective
        broken). Being a call, it also runs a handler still pending."""
        if self.received is not None and self.starting and not isinstance(error, TrainingStopped):
            self._raised = True
            raise self.startup_stop() from error

    def __enter__(self) -> StopSignals:
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:  # Python handles signals in the main thread only
                self._previous[signum] = signal.signal(signum, self._handle)
            _state["active"] = self
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth:
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if _state["active"] is self:
            _state["active"] = None

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._first_at = signum, now
            self.raise_if_starting()
            return
        if now - self._first_at < REPEAT_SECONDS:
            return  # the same request, delivered twice
        # A second signal later on takes its usual course (Ctrl-C twice: stop now).
        previous = self._previous.get(signum)
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        else:
            signal.raise_signal(signum)

    def raise_if_starting(self) -> None:
        """During start-up, outside a collective: raise the stop once (the handler may run in the
        middle of anything; the writes it can cut short are all temporary until renamed)."""
        if self.received is not None and self.starting and not self._raised and not _state["shield"]:
            self._raised = True
            raise self.startup_stop()


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """A collective every process must finish: a start-up stop that arrives inside is raised when
    it ends (on every process that received one), not half-way through it."""
    _state["shield"] += 1
    try:
        yield
    finally:
        _state["shield"] -= 1
    active = _state["active"]
    if active is not None and not _state["shield"]:
        active.raise_if_starting()
