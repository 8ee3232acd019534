"""Running an experiment's comm-train / comm-eval jobs side by side, for the demos.

Every job is a plain ``python -m comm_cli.train|eval ...`` subprocess with its log under
``<root>/logs/``; ``Runner.run`` hands jobs to ``workers`` worker threads, each job with
``threads`` torch threads. A free worker takes the first job (in the order given) whose
dependencies have finished, so long trainings listed first start first and evaluations fill the
gaps. On a 2-core machine two single-threaded jobs side by side finish sooner than the same
jobs one after the other with two threads each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

# The directory that holds the comm_cli package (a checkout or site-packages): jobs import it from there.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class Job:
    """A comm-train / comm-eval run; ``args`` may be a callable evaluated when the job starts
    (after its dependencies, e.g. to read the best learning rate of a sweep)."""

    def __init__(self, module: str, name: str, args: list[str] | Callable[[], list[str]], after=()):
        self.module, self.name, self.args, self.after = module, name, args, tuple(after)


class Runner:
    def __init__(self, root: Path, workers: int, threads: int, log_prefix: str = "[demo]"):
        self.root, self.workers, self.threads, self.prefix = Path(root), workers, threads, log_prefix
        self.seconds: dict[str, float] = {}
        (self.root / "logs").mkdir(parents=True, exist_ok=True)

    def train(self, name: str, overrides, after=()) -> Job:
        head = [
            f"name={name}",
            f"output_root={self.root}",
            "overwrite=true",
            f"trainer.num_threads={self.threads}",
        ]
        return Job("comm_cli.train", name, lambda: head + _resolve(overrides), after)

    def eval(self, name: str, overrides, after=()) -> Job:
        head = [f"name=eval_{name}", f"output_root={self.root}", f"num_threads={self.threads}"]
        return Job("comm_cli.eval", f"eval_{name}", lambda: head + _resolve(overrides), after)

    def _run(self, job: Job) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "TOKENIZERS_PARALLELISM": "false"}
        env.pop("WANDB_SERVICE", None)
        env["PYTHONPATH"] = str(PACKAGE_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        log = self.root / "logs" / f"{job.name}.log"
        start = time.perf_counter()
        with open(log, "w") as out:
            status = subprocess.run(
                [sys.executable, "-m", job.module, *_resolve(job.args)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,
            ).returncode
        if status != 0:
            tail = "\n".join(log.read_text().splitlines()[-25:])
            raise RuntimeError(f"{job.name} failed (exit {status}); the end of {log}:\n{tail}")
        self.seconds[job.name] = time.perf_counter() - start
        print(f"{self.prefix} {job.name} done in {self.seconds[job.name]:.0f} s", flush=True)

    def run(self, jobs: list[Job]) -> None:
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
                    done.add(ready.name)
                    lock.notify_all()

        threads = [threading.Thread(target=worker) for _ in range(self.workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise SystemExit(f"{self.prefix} {failures[0]}")


def _resolve(args):
    return args() if callable(args) else list(args)
