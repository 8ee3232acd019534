"""Running an experiment's comm-train / comm-eval jobs as subprocesses, several at a time.

An experiment's table is a set of plain CLI runs (the specialists' controls, CALM, LoRA, their
evaluations), some waiting on others. ``Runner`` starts each as ``python -m comm_cli.train`` or
``python -m comm_cli.eval`` with its overrides, ``workers`` at a time with ``threads`` torch
threads each (on a 2-core machine two single-threaded runs side by side finish sooner than the
same runs one after the other with two threads each), logs each to ``<root>/logs/<name>.log``
and stops at the first failure with the end of its log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The directory that holds the comm_cli package (a checkout or site-packages): jobs import it from there.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]

Overrides = list[str] | Callable[[], list[str]]


@dataclass
class Job:
    """One comm-train / comm-eval run: its run directory is ``<root>/<name>``. ``overrides`` may be a
    callable evaluated when the job starts (after ``after``, e.g. to read the best LoRA learning
    rate from finished runs). ``key`` names it for dependencies and logs (unique in a run)."""

    module: str
    name: str
    root: Path
    overrides: Overrides
    after: tuple[str, ...] = ()
    key: str = ""

    def __post_init__(self) -> None:
        self.key = self.key or self.name


def train_job(name: str, root: Path, overrides: Overrides, after=(), key: str = "") -> Job:
    return Job("comm_cli.train", name, root, overrides, tuple(after), key)


def eval_job(name: str, root: Path, overrides: Overrides, after=(), key: str = "") -> Job:
    return Job("comm_cli.eval", f"eval_{name}", root, overrides, tuple(after), key)


def _resolve(overrides: Overrides) -> list[str]:
    return overrides() if callable(overrides) else list(overrides)


@dataclass
class Runner:
    """Runs jobs on ``workers`` threads; a free worker takes the first job (in the order given)
    whose dependencies have finished."""

    log_dir: Path
    workers: int = 2
    threads: int = 1
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def command(self, job: Job) -> list[str]:
        head = [f"name={job.name}", f"output_root={job.root}"]
        if job.module == "comm_cli.train":
            head += ["overwrite=true", f"trainer.num_threads={self.threads}"]
        else:
            head += [f"num_threads={self.threads}"]
        return [sys.executable, "-m", job.module, *head, *_resolve(job.overrides)]

    def _run(self, job: Job) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "TOKENIZERS_PARALLELISM": "false"}
        env.pop("WANDB_SERVICE", None)  # a parent's W&B service would swallow the child's run
        env["PYTHONPATH"] = str(PACKAGE_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        log = self.log_dir / f"{job.key.replace('/', '_')}.log"
        job.root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log, "w") as out:
            status = subprocess.run(
                self.command(job), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=job.root
            ).returncode
        if status != 0:
            tail = "\n".join(log.read_text().splitlines()[-25:])
            raise RuntimeError(f"{job.key} failed (exit {status}); the end of {log}:\n{tail}")
        self.seconds[job.key] = time.perf_counter() - start
        print(f"[jobs] {job.key} done in {self.seconds[job.key]:.0f} s", flush=True)

    def run(self, jobs: list[Job]) -> None:
        keys = [job.key for job in jobs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"job keys must be unique: {sorted(k for k in keys if keys.count(k) > 1)}")
        todo, done, failures = list(jobs), set(), []
        lock = threading.Condition()

        def worker() -> None:
            while True:
                with lock:
                    while True:
                        if failures or not todo:
                            return
                        ready = next((j for j in todo if set(j.after) <= done), None)
                        if ready is not None:
                            todo.remove(ready)
                            break
                        lock.wait()
                try:
                    self._run(ready)
                except RuntimeError as err:
                    with lock:
                        failures.append(err)
                        lock.notify_all()
                    return
                with lock:
                    done.add(ready.key)
                    lock.notify_all()

        threads = [threading.Thread(target=worker) for _ in range(self.workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise SystemExit(f"[jobs] {failures[0]}")
