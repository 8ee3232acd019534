"""Requests that arrive together share one batch of ``Session.complete``.

The scheduler lives on the server's event loop. Each request becomes a ``Job`` (its prompt rows,
their token limits, its sampling settings) in a bounded queue; a job that finds the queue full
is refused at once (``Overloaded``: the server answers 503). One batch runs at a time, on one
worker thread, so the event loop keeps answering while the model computes: the first job waiting
and the compatible jobs behind it (same session, same ``batch_key``), up to ``max_batch_size``
rows, after waiting up to ``batch_wait_ms`` for more to arrive. Each row's text goes back to its
job as it grows; a job whose client went away is cancelled, and its rows stop at the next step.
``batching=False`` runs one job at a time (the comparison the benchmark makes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import count

from comm_cli.errors import CommError
from comm_cli.inference.session import Completion, Sampling, Session

logger = logging.getLogger(__name__)

_ids = count()


class Overloaded(Exception):
    """The queue is full: the request is refused, not kept waiting."""


class Job:
    """One request: ``texts`` (one row per choice), ``limits`` (new tokens per row), its sampling.
    The worker thread posts events to it: ``("text", row, delta)`` while a streamed row grows,
    then ``("done", completions)`` or ``("error", exception)``."""

    def __init__(
        self, session: Session, texts: list[str], limits: list[int], sampling: Sampling, stream: bool
    ):
        self.session, self.texts, self.limits, self.sampling = session, texts, limits, sampling
        self.stream = stream
        self.id = next(_ids)
        self.cancelled = False
        self.finished = False
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()

    def batch_key(self) -> tuple:
        """Jobs with equal keys may share a batch. A seeded sampled job runs alone, so that its
        seed gives the same text whoever else is asking."""
        alone = self.id if self.sampling.do_sample and self.sampling.seed is not None else None
        return (id(self.session), self.sampling.key(), alone)

    def cancel(self) -> None:
        """Stop this job's rows at the next step (or skip it if it is still waiting)."""
        if not self.finished:
            self.cancelled = True

    def post(self, *event) -> None:
        """From the worker thread: hand an event to the request's coroutine."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop closed (the server is stopping): nobody is listening
            pass

    async def next_event(self) -> tuple:
        event = await self._events.get()
        if event[0] in ("done", "error"):
            self.finished = True
        return event

    async def result(self) -> list[Completion]:
        """The completions, once the whole job is done (non-streamed requests)."""
        while True:
            event = await self.next_event()
            if event[0] == "done":
                return event[1]
            if event[0] == "error":
                raise event[1]


class Scheduler:
    def __init__(
        self, max_batch_size: int = 16, batch_wait_ms: float = 5.0, max_queue: int = 64, batching=True
    ):
        self.max_batch_size, self.batch_wait = max_batch_size, batch_wait_ms / 1000
        self.max_queue, self.batching = max_queue, batching
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        # what has run so far (the health endpoint reports it): batches, requests, new tokens
        self.batches = self.jobs_done = self.tokens = 0
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="comm-serve-generate")

    # ------------------------------------------------------------------ event loop side

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Refuse what waits, stop what runs, and wait for the worker to let go of the model."""
        for job in self.waiting:
            job.cancel()
            job.post("error", Overloaded("the server is shutting down"))
        self.waiting.clear()
        for job in self.running:
            job.cancel()
        if self._task is not None:
            self._task.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self._worker.shutdown)

    def submit(self, job: Job) -> None:
        self._drop_cancelled()
        if len(self.waiting) >= self.max_queue:
            raise Overloaded(f"{len(self.waiting)} requests are waiting already")
        self.waiting.append(job)
        self._arrived.set()

    def stats(self) -> dict:
        return {
            "waiting": len(self.waiting),
            "running": len(self.running),
            "batches": self.batches,
            "requests_done": self.jobs_done,
            "tokens_generated": self.tokens,
        }

    def _drop_cancelled(self) -> None:
        if any(job.cancelled for job in self.waiting):
            self.waiting = deque(job for job in self.waiting if not job.cancelled)

    def _compatible_rows(self) -> int:
        key = self.waiting[0].batch_key()
        return sum(len(job.texts) for job in self.waiting if job.batch_key() == key)

    async def _gather(self) -> None:
        """Wait up to ``batch_wait_ms`` for more jobs that can join the first one."""
        deadline = time.monotonic() + self.batch_wait
        while self.waiting and self._compatible_rows() < self.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[Job]:
        """The first job waiting and, when batching, the compatible jobs behind it that fit."""
        self._drop_cancelled()
        if not self.waiting:
            return []
        head = self.waiting.popleft()
        batch, rows = [head], len(head.texts)
        if self.batching:
            key, keep = head.batch_key(), deque()
            for job in self.waiting:
                if job.batch_key() == key and rows + len(job.texts) <= self.max_batch_size:
                    batch.append(job)
                    rows += len(job.texts)
                else:
                    keep.append(job)
            self.waiting = keep
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            if not self.waiting:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if self.batching:
                await self._gather()
            batch = self._take()
            if not batch:
                continue
            self.running = batch
            try:
                self.tokens += await loop.run_in_executor(self._worker, run_batch, batch)
            finally:
                self.running = []
                self.batches += 1
                self.jobs_done += len(batch)


# ------------------------------------------------------------------ worker thread side


def run_batch(batch: list[Job]) -> int:
    """One ``Session.complete`` over every row of ``batch``; each job gets its rows' text as it
    grows (when it streams) and then its completions, or the error that ended the batch. Returns
    the number of tokens generated."""
    owners = [(job, row) for job in batch for row in range(len(job.texts))]

    def on_text(row: int, delta: str) -> None:
        job, index = owners[row]
        if job.stream and not job.cancelled:
            job.post("text", index, delta)

    def cancelled(row: int) -> bool:
        return owners[row][0].cancelled

    head = batch[0]
    try:
        completions = head.session.complete(
            [text for job in batch for text in job.texts],
            head.sampling,
            on_text if any(job.stream for job in batch) else None,
            cancelled,
            [limit for job in batch for limit in job.limits],
        )
    except Exception as err:  # the batch failed: every request in it hears why; the server goes on
        if not isinstance(err, CommError):
            logger.exception("generation failed for a batch of %d request(s)", len(batch))
        for job in batch:
            job.post("error", err)
        return 0
    start = 0
    for job in batch:
        job.post("done", completions[start : start + len(job.texts)])
        start += len(job.texts)
    return sum(c.completion_tokens for c in completions)
