"""The run directory, checkpoints and resume.

    <run dir>/
      run_config.yaml                the resolved config (what makes this run this run)
      train.log                      the main process's log (appended across resumes)
      checkpoints/step_00000500/     Accelerate state: optimizer, scheduler, RNG of every rank,
                                     + trainable.safetensors (trained parameters only, never the
                                     frozen bases) + trainer_state.json (step, data position,
                                     W&B run id, size and SHA-256 of every other file), written last
      composition/ | adapter/ | model/   the final save of method calm | lora | full

A checkpoint is written under ``checkpoints/.tmp-step_N``, its files flushed to disk, its state
file written last and the directory renamed, so a kill while writing never leaves a broken
newest checkpoint. What a kill cannot do, a full disk, a copy cut short or a flipped bit can:
every file is checked against the sizes and hashes in the state file before it is used.
``resume=auto`` takes the newest checkpoint that passes (saying in one line which file failed
and why); ``resume=PATH`` naming a broken one fails in one line.

A directory that already holds a run (a checkpoint or a final save) is never overwritten unless
asked (``overwrite=true``). A start that failed before saving anything holds no run: running the
fixed command again just starts. While a run is going, its main process holds a lock on
``<run dir>/.lock`` (released by the kernel when the process ends, however it ends), so a second
start in the same directory is refused even before the first has saved anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from comm_cli.atomic import atomic_write_text, discard_directory
from comm_cli.errors import CheckpointError, OutputDirError

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.yaml"
LOCK = ".lock"
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
TRAINABLE_WEIGHTS = "trainable.safetensors"
FINAL_DIRS = {"calm": "composition", "lora": "adapter", "full": "model"}
SUMMARY = "train_summary.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """Where training stands; saved as JSON, last, with every checkpoint."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed (per process)
    tokens: int = 0  # loss-carrying tokens seen, all processes
    wandb_run_id: str | None = None
    last_loss: float | None = None
    # every other file of the checkpoint: relative path -> {"size": bytes, "sha256": hex digest}
    files: dict[str, dict] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """Write atomically and flushed to disk. The JSON carries a hash of its own content, so a
        damaged state file is told from a valid one."""
        data = asdict(self)
        data["checksum"] = _json_digest(data)
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n", durable=True)

    @classmethod
    def load(cls, path: Path) -> TrainerState:
        """Raises CheckpointError when the file is unreadable, not JSON, or fails its checksum."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise CheckpointError(f"{Path(path).name} cannot be read ({_short(err)})") from err
        if not isinstance(data, dict):
            raise CheckpointError(f"{Path(path).name} does not hold a trainer state")
        checksum = data.pop("checksum", None)
        if checksum is not None and checksum != _json_digest(data):
            raise CheckpointError(f"{Path(path).name} fails its checksum (the file was changed or damaged)")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _json_digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------------------------------------- integrity


def file_manifest(directory: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file under ``directory`` but the state file, each flushed to disk
    on the way (the state file that lists them is written after, and only then the rename)."""
    directory = Path(directory)
    manifest = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative == TRAINER_STATE:
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
            os.fsync(handle.fileno())
        manifest[relative] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
    return manifest


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with the checkpoint at ``path`` (which file, and why), or None when every
    file it lists is there with its recorded size and hash. A checkpoint written before comm
    recorded hashes has nothing to check against; loading it is the test."""
    path = Path(path)
    try:
        state = TrainerState.load(path / TRAINER_STATE)
    except CheckpointError as err:
        return str(err)
    for relative, expected in sorted(state.files.items()):
        file = path / relative
        if not file.is_file():
            return f"{relative} is missing"
        size = file.stat().st_size
        if size != expected.get("size"):
            return f"{relative} is {size} bytes, {expected.get('size')} expected (truncated or cut short)"
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != expected.get("sha256"):
            return f"{relative} fails its SHA-256 check (its content was damaged)"
    return None


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
    """Drop the ``.tmp-*`` (half-written) and ``.old-*`` (half-deleted; ``.pruned-*`` from older
    comm) directories a killed run left behind (main process only: every rank of a run writes
    into one ``.tmp-step_N``, and the run directory's lock keeps other runs out)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for pattern in (".tmp-*", ".old-*", ".pruned-*"):
            for path in root.glob(pattern):
                shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    if keep_last < 1:
        return
    for path in complete_checkpoints(run_dir)[:-keep_last]:
        # never a step directory with files missing: a kill during the deletion leaves an
        # ``.old-*`` directory the next start removes
        discard_directory(path)


def lock_run_dir(run_dir: Path):
    """Take the run directory's lock for this process; returns the open lock file (closing it
    releases the lock). Raises OutputDirError naming the holder when another process has it."""
    import fcntl
    import socket

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise OutputDirError(
            f"the run directory {run_dir} is in use by a running comm-train ({holder}): wait for it or stop "
            "it, or give this run another name=..."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def run_contents(run_dir: Path) -> list[str]:
    """What in ``run_dir`` shows that a run already lives there: work that a new start would
    lose (checkpoints, a final save). A config and a log alone are what a start that failed
    before saving anything leaves; they hold no work."""
    run_dir = Path(run_dir)
    found = []
    checkpoints = complete_checkpoints(run_dir)
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint(s)")
    found += [name for name in FINAL_DIRS.values() if (run_dir / name).exists()]
    return found


def resume_candidates(run_dir: Path, resume: str | None, overwrite: bool) -> tuple[list[Path], list[str]]:
    """Where training may start: (checkpoints to try in this order, one line per checkpoint
    skipped and why). No checkpoint: a fresh start.

    ``resume=auto``: every complete checkpoint that passes verification, newest first; the
    broken ones are skipped with a reason. ``resume=PATH``: that checkpoint (or a run
    directory's newest), which must pass. Raises OutputDirError when ``run_dir`` holds another
    run and neither resume nor overwrite says what to do with it, and CheckpointError when the
    checkpoint to resume is broken, or every checkpoint of the run is.
    """
    run_dir = Path(run_dir)
    if resume is None or resume in ("", "none", "null", "false"):
        contents = run_contents(run_dir)
        if contents and not overwrite:
            raise OutputDirError(
                f"the run directory {run_dir} already holds a run ({', '.join(contents)}): continue it with "
                "resume=auto, start over with overwrite=true, or give this run another name=..."
            )
        return [], []
    if resume == "auto":
        # Training always ends with a checkpoint, so a finished run resumes to "nothing left to do".
        found = list(reversed(complete_checkpoints(run_dir)))
        good, skipped = [], []
        for path in found:
            problem = verify_checkpoint(path)
            if problem is None:
                good.append(path)
            else:
                skipped.append(f"skipping checkpoint {path.name}: {problem}")
        if found and not good:
            raise CheckpointError(
                f"no checkpoint in {run_dir / CHECKPOINTS} is intact ({'; '.join(skipped)}): start over with "
                "overwrite=true (or resume=PATH from a copy of the run)"
            )
        return good, skipped
    path = Path(resume).expanduser()
    if not path.is_dir() or not (path / TRAINER_STATE).is_file():
        newest = latest_checkpoint(path)  # a run directory: its newest checkpoint
        if newest is None:
            raise OutputDirError(
                f"resume={resume} is not a complete checkpoint directory (no {TRAINER_STATE}): give a "
                f"{CHECKPOINTS}/step_N directory of a run, a run directory, or resume=auto"
            )
        path = newest
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {path} is broken: {problem}; resume=auto takes the newest intact checkpoint of a "
            "run, or give an older one"
        )
    return [path], []


def clear_run_dir(run_dir: Path) -> None:
    """overwrite=true: remove what an earlier run left (its config, checkpoints, final saves, logs)."""
    run_dir = Path(run_dir)
    for name in [RUN_CONFIG, CHECKPOINTS, SUMMARY, "train.log", "wandb", "tensorboard", *FINAL_DIRS.values()]:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
