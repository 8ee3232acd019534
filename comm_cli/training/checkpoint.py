"""The run directory, checkpoints and resume.

    <run dir>/
      run_config.yaml                the resolved config (what makes this run this run)
      train.log                      the main process's log (appended across resumes)
      checkpoints/step_00000500/     Accelerate state: optimizer, scheduler, RNG of every rank,
                                     + trainable.safetensors (trained parameters only, never the
                                     frozen bases) + trainer_state.json (step, data position,
                                     W&B run id), written last
      composition/ | adapter/ | model/   the final save of method calm | lora | full

A checkpoint is written under ``checkpoints/.tmp-step_N`` and renamed when complete, so a kill
while writing never leaves a broken newest checkpoint; ``resume=auto`` takes the newest complete
one. A directory that already holds a run is never overwritten unless asked (``overwrite=true``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from comm_cli.atomic import atomic_write_text
from comm_cli.errors import OutputDirError

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.yaml"
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
TRAINABLE_WEIGHTS = "trainable.safetensors"
FINAL_DIRS = {"calm": "composition", "lora": "adapter", "full": "model"}
SUMMARY = "train_summary.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """Where training stands; saved as JSON with every checkpoint."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed (per process)
    tokens: int = 0  # loss-carrying tokens seen, all processes
    wandb_run_id: str | None = None
    last_loss: float | None = None

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainerState:
        data = json.loads(Path(path).read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Only renamed (finished) directories count."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Drop ``.tmp-*`` directories a killed run left behind (main process only)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    if keep_last < 1:
        return
    for path in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def run_contents(run_dir: Path) -> list[str]:
    """What in ``run_dir`` shows that a run already lives there."""
    run_dir = Path(run_dir)
    found = []
    if (run_dir / RUN_CONFIG).is_file():
        found.append(RUN_CONFIG)
    checkpoints = complete_checkpoints(run_dir)
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint(s)")
    found += [name for name in FINAL_DIRS.values() if (run_dir / name).exists()]
    return found


def resolve_resume(run_dir: Path, resume: str | None, overwrite: bool) -> Path | None:
    """Decide where training starts: a checkpoint to load, or None for a fresh start.

    Raises OutputDirError when ``run_dir`` holds another run and neither resume nor overwrite
    says what to do with it, or when ``resume`` names no complete checkpoint.
    """
    run_dir = Path(run_dir)
    if resume is None or resume in ("", "none", "null", "false"):
        contents = run_contents(run_dir)
        if contents and not overwrite:
            raise OutputDirError(
                f"the run directory {run_dir} already holds a run ({', '.join(contents)}): continue it with "
                "resume=auto, start over with overwrite=true, or give this run another name=..."
            )
        return None
    if resume == "auto":
        # Training always ends with a checkpoint, so a finished run resumes to "nothing left to do".
        return latest_checkpoint(run_dir)
    path = Path(resume).expanduser()
    if not path.is_dir() or not (path / TRAINER_STATE).is_file():
        newest = latest_checkpoint(path)  # a run directory: its newest checkpoint
        if newest is not None:
            return newest
        raise OutputDirError(
            f"resume={resume} is not a complete checkpoint directory (no {TRAINER_STATE}): give a "
            f"{CHECKPOINTS}/step_N directory of a run, a run directory, or resume=auto"
        )
    return path


def clear_run_dir(run_dir: Path) -> None:
    """overwrite=true: remove what an earlier run left (its config, checkpoints, final saves, logs)."""
    run_dir = Path(run_dir)
    for name in [RUN_CONFIG, CHECKPOINTS, SUMMARY, "train.log", "wandb", "tensorboard", *FINAL_DIRS.values()]:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
