"""Saving and loading a run's checkpoints and its final save, every process agreeing.

The recipe calls one ``CheckpointClient``; the layout and integrity checks of the files are
``checkpoint.py``'s, what differs between engines is ``engines.py``'s.

    client = CheckpointClient(accelerator, run_dir, engine, method="calm", resume="auto", ...)
    client.open_run_dir(raw_config)   # lock, check, clear (overwrite=true), write run_config.yaml
    client.report()                   # once logging writes to the run's log: what it found there
    client.attach(model, optimizer, scheduler)   # after accelerator.prepare
    state = client.resume(state)      # from the newest candidate checkpoint that loads
    client.save_checkpoint(state); client.save_final(tokenizer)
    client.close()                    # releases the run directory

A write may fail on one process only (a full disk). Each is attempted, then all processes learn
whether it failed anywhere before any raises (a process that raised alone would leave the others
waiting in the next collective); the partial write is removed and the user reads one line. The
previous checkpoint is untouched.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from comm_cli.atomic import atomic_write_text, building, fsync_directory, replace_directory
from comm_cli.errors import CheckpointError, CommError, OutputDirError
from comm_cli.training import checkpoint as ckpt
from comm_cli.training import engines
from comm_cli.training.faults import KILL_IN_SAVE, kill_if_asked
from comm_cli.training.ranks import any_process
from comm_cli.training.trackers import flat_config

logger = logging.getLogger(__name__)


def _attempt(fn) -> BaseException | None:
    """Run a write; return what went wrong instead of raising, so that every rank can learn of a
    failure on any rank before anyone raises."""
    try:
        fn()
    except (OSError, RuntimeError, ValueError) as err:
        return err
    except Exception as err:  # e.g. safetensors' SafetensorError
        if type(err).__module__.startswith(("safetensors", "torch", "accelerate")):
            return err
        raise
    return None


def _describe(err: BaseException | None) -> str:
    if err is None:
        return "it failed on another process"
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:200]}"


class CheckpointClient:
    """Responsible for the run directory, saving and loading checkpoints and the final save."""

    def __init__(self, accelerator, run_dir: Path, engine: str, *, method: str, resume: str | None,
                 overwrite: bool, keep_last: int):  # fmt: skip
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.engine = engine
        self.method = method
        self.resume_setting, self.overwrite, self.keep_last = resume, overwrite, keep_last
        self.candidates: list[Path] = []  # checkpoints to resume from, in the order to try them
        self.model = self.optimizer = None
        self._lock = None  # the run directory's lock, held by the main process
        self._notes: list[tuple[int, str]] = []  # what opening the run directory found, to log

    @property
    def resume_from(self) -> Path | None:
        return self.candidates[0] if self.candidates else None

    @property
    def final_dir(self) -> Path:
        return self.run_dir / ckpt.FINAL_DIRS[self.method]

    # ------------------------------------------------------------------ the run directory

    def open_run_dir(self, raw_config: dict) -> None:
        """Check the run directory before anything is written (every rank reads, then the main
        process writes): lock it, find what to resume from, clear an earlier run when
        overwrite=true, and record the resolved config."""
        acc = self.accelerator
        failure = None
        if acc.is_main_process:
            try:
                self._lock = ckpt.lock_run_dir(self.run_dir)
            except OutputDirError as err:
                failure = err
        if any_process(acc, failure is not None):
            raise failure or OutputDirError(
                f"the main process could not lock the run directory {self.run_dir}"
            )
        self.candidates, skipped = ckpt.resume_candidates(self.run_dir, self.resume_setting, self.overwrite)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._prepare_run_dir(raw_config)
        acc.wait_for_everyone()
        self._notes += [(logging.WARNING, f"{line}; trying the previous one") for line in skipped]

    def _prepare_run_dir(self, raw_config: dict) -> None:
        run_dir, config_path = self.run_dir, self.run_dir / ckpt.RUN_CONFIG
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume_from is None and self.overwrite and ckpt.run_contents(run_dir):
            self._notes.append((logging.WARNING, f"overwrite=true: clearing the earlier run in {run_dir}"))
            ckpt.clear_run_dir(run_dir)
        if self.resume_from is None and config_path.is_file():
            self._notes.append(
                (logging.INFO, "an earlier start in this directory saved nothing: starting afresh")
            )
        ckpt.remove_partial_checkpoints(run_dir)
        if self.resume_from is not None and config_path.is_file():
            old = flat_config(OmegaConf.to_container(OmegaConf.load(config_path)))
            new = flat_config(raw_config)
            changed = sorted(
                key
                for key in set(old) | set(new)
                if old.get(key) != new.get(key) and not key.startswith(("resume", "overwrite"))
            )
            if changed:
                self._notes.append(
                    (logging.WARNING, f"resuming with a changed config: {', '.join(changed[:12])}")
                )
        atomic_write_text(config_path, OmegaConf.to_yaml(OmegaConf.create(raw_config)))

    def report(self) -> None:
        """Log what opening the run directory found (once logging writes to the run's log)."""
        for level, line in self._notes:
            logger.log(level, line)
        self._notes = []

    def resumed_wandb_run_id(self) -> str | None:
        """The W&B run of the checkpoint to resume from, so that a resumed job continues it."""
        if self.resume_from is None:
            return None
        return ckpt.TrainerState.load(self.resume_from / ckpt.TRAINER_STATE).wandb_run_id

    def checkpoint_at(self, step: int) -> Path | None:
        """The complete checkpoint of ``step``, if one was written."""
        path = ckpt.checkpoint_dir(self.run_dir, step)
        return path if (path / ckpt.TRAINER_STATE).is_file() else None

    def latest(self) -> Path | None:
        return ckpt.latest_checkpoint(self.run_dir)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the run directory
            self._lock = None

    # ------------------------------------------------------------------ what a checkpoint holds

    def attach(self, model, optimizer, scheduler) -> None:
        """The prepared model, optimizer and schedule whose state the checkpoints hold."""
        self.model, self.optimizer = model, optimizer
        acc = self.accelerator
        if self.engine == "deepspeed":
            # Prepared apart from the model, the schedule is not DeepSpeed's to save; Accelerate
            # saves it with the checkpoint as a registered object instead.
            acc.register_for_checkpointing(scheduler)
        if not self.engine.startswith("fsdp"):  # FSDP2 state is written by engines.save_fsdp_state
            acc.register_save_state_pre_hook(self._save_trainable_hook)
            acc.register_load_state_pre_hook(self._load_trainable_hook)

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _save_trainable_hook(self, models, weights, output_dir) -> None:
        """Accelerate's save_state writes the optimizer, scheduler and RNG; the model part is
        ours: only the trained parameters, in safetensors. (Under DeepSpeed the engine writes its
        own checkpoint of the trained parameters; this adds the same readable file.)"""
        from safetensors.torch import save_file

        trainable = engines.gather_trainable(self._unwrapped(), self.engine)  # collective under ZeRO-3
        if self.accelerator.is_main_process:
            save_file(trainable, str(Path(output_dir) / ckpt.TRAINABLE_WEIGHTS))
        weights.clear()

    def _load_trainable_hook(self, models, input_dir) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(input_dir) / ckpt.TRAINABLE_WEIGHTS))
        if self.engine != "deepspeed":  # DeepSpeed restores its module from its own checkpoint
            engines.load_trainable(self._unwrapped(), state, str(input_dir))
        models.clear()

    # ------------------------------------------------------------------ saving

    def _write_state(self, directory: Path) -> None:
        """This rank's part of a checkpoint: trained parameters, optimizer, scheduler, RNG."""
        if self.engine.startswith("fsdp"):
            engines.save_fsdp_state(self.accelerator, self.model, self.optimizer, directory)
        elif self.engine == "deepspeed":
            self.accelerator.save_state(str(directory), exclude_frozen_parameters=True)
        else:
            self.accelerator.save_state(str(directory))

    def _agree(self, failure: BaseException | None, what: str, partial: Path | None = None) -> None:
        """Raise on every rank if a write failed on any rank, after removing the partial write."""
        if not any_process(self.accelerator, failure is not None):
            return
        if self.accelerator.is_main_process and partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        latest = self.latest()
        kept = (
            f"the newest complete checkpoint, {latest.name}, is intact and resume=auto continues from it"
            if latest is not None
            else "no earlier checkpoint exists"
        )
        raise CheckpointError(
            f"cannot write {what} ({_describe(failure)}): free space on the disk of {self.run_dir} (or raise "
            f"the file-size limit) and run again; {kept}"
        )

    def save_checkpoint(self, state: ckpt.TrainerState) -> Path:
        """Write checkpoints/step_N: under a temporary name (one for all ranks, which all write into
        it), every file flushed and listed with its size and hash in the state file, which is
        written last; then renamed. A write that fails on any rank (a full disk) removes the
        partial directory and stops with one line; the previous checkpoint is untouched."""
        acc = self.accelerator
        final = ckpt.checkpoint_dir(self.run_dir, state.step)
        tmp = final.with_name(f".tmp-{final.name}")
        what = f"checkpoint {final.name}"

        def make_tmp() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

        self._agree(_attempt(make_tmp) if acc.is_main_process else None, what, tmp)
        failure = _attempt(lambda: self._write_state(tmp))
        kill_if_asked(KILL_IN_SAVE, state.step)
        self._agree(failure, what, tmp)
        self._agree(
            _attempt(lambda: self._seal(state, tmp, final)) if acc.is_main_process else None, what, tmp
        )
        if acc.is_main_process:
            ckpt.prune_checkpoints(self.run_dir, self.keep_last)
            logger.info("checkpoint step %d: %s", state.step, final)
        acc.wait_for_everyone()
        return final

    @staticmethod
    def _seal(state: ckpt.TrainerState, tmp: Path, final: Path) -> None:
        state.files = ckpt.file_manifest(tmp)
        state.save(tmp / ckpt.TRAINER_STATE)  # last, flushed: marks the checkpoint complete
        replace_directory(tmp, final)
        fsync_directory(final.parent)

    def save_final(self, tokenizer) -> Path:
        """The trained result in its method's format, built under a temporary name and renamed.
        The last checkpoint (written just before) holds the same weights; if this write fails,
        resume=auto from it writes the final save again."""
        acc = self.accelerator
        final = self.final_dir
        acc.wait_for_everyone()

        def write() -> None:
            with building(final) as tmp:
                self._unwrapped().save_pretrained(tmp)
                if self.method != "calm":
                    tokenizer.save_pretrained(tmp)

        failure = None
        with engines.whole_trainable(self._unwrapped(), self.engine):  # collective under FSDP2 / ZeRO-3
            if acc.is_main_process:
                failure = _attempt(write)
        self._agree(failure, f"the final {final.name}/")
        if acc.is_main_process:
            logger.info("saved %s", final)
        acc.wait_for_everyone()
        return final

    # ------------------------------------------------------------------ loading

    def resume(self, state: ckpt.TrainerState) -> ckpt.TrainerState:
        """Load the first candidate checkpoint that loads and return its state (keeping this
        run's W&B id). The candidates passed their checksums; one that still fails to load
        (written by an older comm without checksums, say) is skipped under resume=auto with one
        line, and is an error when named by resume=PATH."""
        for index, path in enumerate(self.candidates):
            try:
                return self._load(path, state)
            except CommError:
                raise  # a config that does not fit the checkpoint fits no older one either
            except Exception as err:
                if self.resume_setting != "auto":
                    raise CheckpointError(
                        f"checkpoint {path} does not load ({_describe(err)}): give another checkpoint, or "
                        "resume=auto for the newest one that loads"
                    ) from err
                logger.warning("skipping checkpoint %s: it does not load (%s)", path.name, _describe(err))
                if index == len(self.candidates) - 1:
                    raise CheckpointError(
                        f"no checkpoint in {self.run_dir / ckpt.CHECKPOINTS} loads (the oldest: {_describe(err)}): "
                        "start over with overwrite=true"
                    ) from err
                logger.warning("trying the previous checkpoint")
        return state

    def _load(self, path: Path, state: ckpt.TrainerState) -> ckpt.TrainerState:
        logger.info("resuming from %s", path)
        if self.engine.startswith("fsdp"):
            engines.load_fsdp_state(self.accelerator, self.model, self.optimizer, path)
        elif self.engine == "deepspeed":
            self.accelerator.load_state(str(path), load_module_strict=False)
        else:
            self.accelerator.load_state(str(path))
        saved = ckpt.TrainerState.load(path / ckpt.TRAINER_STATE)
        saved.wandb_run_id = state.wandb_run_id or saved.wandb_run_id
        logger.info(
            "resumed at step %d (epoch %d, batch %d)", saved.step, saved.epoch, saved.batches_in_epoch
        )
        return saved
