"""Chaos test for comm-train: kill a run with SIGKILL at random moments, resume, and check that
the result equals an uninterrupted run.

    python scripts/chaos.py                      # 20 cycles (the figure in docs/design.md)
    python scripts/chaos.py --cycles 3 --seed 1  # what the test suite runs

1. An uninterrupted run of a tiny composition (the test workspace: Llama-style anchor, GPT-NeoX
   augment) gives the reference bridges.
2. Each cycle starts ``comm-train ... resume=auto`` and sends it SIGKILL after a random delay:
   anywhere from start-up (imports, model building, the run directory) to a few steps into
   training, where a checkpoint is written every step. In every fourth cycle (the third,
   seventh, ...) the run kills itself instead, half-way through writing the checkpoint of a
   random coming step (COMM_FAULT_KILL_IN_SAVE), so kills inside a checkpoint write are certain.
   After each kill every complete checkpoint must still pass its checksums.
3. A last ``resume=auto`` runs to the end; its bridges must equal the reference (max abs
   difference <= 1e-6 on CPU).

Prints one JSON line (cycles, kills, kills inside a checkpoint write, checkpoints found broken,
max abs difference) and exits 0 when the run survived. Run from a checkout (it borrows the test
suite's tiny workspace).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from comm_cli.training.checkpoint import complete_checkpoints, verify_checkpoint  # noqa: E402
from tests.helpers import base_args, build_workspace, cli_env, max_abs_diff, trainable_weights  # noqa: E402

TOLERANCE = 1e-6


def run_args(ws: dict, root: Path, name: str, steps: int) -> list[str]:
    return base_args(ws, root, name) + [
        f"trainer.max_steps={steps}",
        "trainer.save_every=1",  # a checkpoint every step: many kills land inside a write
        "trainer.eval_every=null",
        "trainer.log_every=1",
    ]


def start(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "comm_cli.train", *args],
        cwd=cwd,
        env={**cli_env(), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def final_bridges(run_dir: Path):
    return trainable_weights(run_dir / "composition" / "composition_model.safetensors")


def newest_step(run_dir: Path) -> int:
    found = complete_checkpoints(run_dir)
    return int(found[-1].name.split("_")[1]) if found else 0


def chaos(cycles: int, seed: int, steps: int, workdir: Path) -> dict:
    rng = random.Random(seed)
    ws = build_workspace(workdir / "ws")

    # The uninterrupted run; its timing sets the kill delays (start-up, then time per step).
    began = time.perf_counter()
    reference = start(run_args(ws, workdir, "reference", steps), workdir)
    first_step = None
    while reference.poll() is None:
        if first_step is None and (workdir / "reference" / "checkpoints" / "step_00000001").is_dir():
            first_step = time.perf_counter() - began
        time.sleep(0.02)
    _, err = reference.communicate()
    if reference.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed:\n{err[-3000:]}")
    duration = time.perf_counter() - began
    first_step = first_step or duration / 2
    per_step = max((duration - first_step) / max(steps - 1, 1), 0.01)

    run_dir = workdir / "chaos"
    args = run_args(ws, workdir, "chaos", steps) + ["resume=auto"]
    kills = in_write = in_write_by_fault = broken = finished_early = 0
    for cycle in range(cycles):
        if cycle % 4 == 2:  # the run kills itself inside the write of a coming checkpoint
            target = min(newest_step(run_dir) + rng.randint(1, 4), steps)
            process = start(args, workdir, COMM_FAULT_KILL_IN_SAVE=str(target))
            process.communicate()
            kills += process.returncode == -signal.SIGKILL
            in_write_by_fault += process.returncode == -signal.SIGKILL
        else:
            process = start(args, workdir)
            # from half-way through start-up to six steps into training
            time.sleep(rng.uniform(0.5 * first_step, first_step + 6 * per_step))
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                kills += 1
            process.communicate()
        if process.returncode == 0:
            finished_early += 1
        elif process.returncode != -signal.SIGKILL:
            raise SystemExit(f"a chaos cycle failed with status {process.returncode}:\n{process.stderr}")
        if (run_dir / "checkpoints").is_dir() and list((run_dir / "checkpoints").glob(".tmp-*")):
            in_write += 1
        broken += sum(verify_checkpoint(path) is not None for path in complete_checkpoints(run_dir))
    reached = newest_step(run_dir)

    last = start(args, workdir)
    _, err = last.communicate()
    if last.returncode != 0:
        raise SystemExit(f"the final resume failed:\n{err[-3000:]}")
    diff = max_abs_diff(final_bridges(run_dir), final_bridges(workdir / "reference"))
    return {
        "cycles": cycles,
        "kills": kills,
        "kills_inside_a_checkpoint_write": in_write,
        "of_which_by_fault_injection": in_write_by_fault,
        "cycles_that_finished_before_the_kill": finished_early,
        "checkpoints_found_broken": broken,
        "steps": steps,
        "step_reached_by_the_killed_runs": reached,
        "uninterrupted_run_s": round(duration, 1),
        "max_abs_diff": diff,
        "survived": broken == 0 and diff <= TOLERANCE,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of the run")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = chaos(args.cycles, args.seed, args.steps, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="comm-chaos-") as tmp:
            report = chaos(args.cycles, args.seed, args.steps, Path(tmp))
    print(json.dumps(report), flush=True)
    return 0 if report["survived"] else 1


if __name__ == "__main__":
    sys.exit(main())
