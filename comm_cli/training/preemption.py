"""Stopping on SIGTERM or SIGINT without losing work.

Schedulers (SLURM, Kubernetes, cloud spot instances) send SIGTERM some seconds before they kill
a job; a user sends SIGINT with Ctrl-C. While training runs, ``StopSignals`` turns either into a
request that the loop reads at the next step boundary: it writes a checkpoint there, closes the
tracker and exits with status 75, and ``resume=auto`` continues exactly where it stopped.

A second signal of the same kind is not caught: a user who presses Ctrl-C twice means "now".
Under several processes each rank catches its own signal; the loop combines the requests of all
ranks at every step, so they all stop at the same boundary.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Catch SIGTERM/SIGINT for the duration of a ``with`` block (the training loop)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a stop request"

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        # Only a flag: the handler may run in the middle of anything (a log call, a write).
        self.received = signum
        # The next signal of this kind takes its usual course (Ctrl-C twice: stop now).
        signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)
