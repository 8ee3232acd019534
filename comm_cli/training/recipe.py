"""The training recipe: one class, one method per phase (torchtune-style).

    recipe = TrainRecipe(cfg, raw_config)
    recipe.setup()       # accelerator, run dir, tokenizer, model, data, optimizer, tracker, resume
    recipe.train()       # the Accelerate loop
    recipe.cleanup()

The loss of an optimizer step is the sum of token losses over all micro-batches and all
processes divided by the number of loss-carrying tokens in that global batch, so k processes
with batch b give the same update as one process with batch k*b (and gradient accumulation is
exact too).

Faults (see ``checkpoint.py``, ``preemption.py``, ``engines.py``): SIGTERM/SIGINT write a
checkpoint at the next step boundary and exit 75; a checkpoint that cannot be written (a full
disk) is removed and the previous one stays; a checkpoint that fails its checksums is skipped by
``resume=auto``. Under every engine a checkpoint holds only trained parameters and their
optimizer state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from comm_cli.atomic import atomic_write_text
from comm_cli.compose import ComposedModel
from comm_cli.compose.composed import parameter_counts
from comm_cli.data.build import raw_splits, tokenized_splits
from comm_cli.data.collate import CompletionCollator
from comm_cli.errors import (
    CheckpointError,
    CommError,
    ConfigError,
    NonFiniteLossError,
    OutputDirError,
    TrainingStopped,
)
from comm_cli.losses import loss_token_count
from comm_cli.training import checkpoint as ckpt
from comm_cli.training import engines
from comm_cli.training.models import (
    augment_pad_ids,
    batch_loss,
    build_model,
    load_tokenizer,
    read_plan,
    sample_texts,
)
from comm_cli.training.optim import build_optimizer, build_scheduler
from comm_cli.training.preemption import StopSignals
from comm_cli.training.trackers import flat_config, log_with, start_trackers

logger = logging.getLogger(__name__)

# Fault injection for the crash tests: SIGKILL this process right after step N's optimizer step
# (COMM_FAULT_KILL_AT_STEP=N) or half-way through writing step N's checkpoint
# (COMM_FAULT_KILL_IN_SAVE=N); make every step last at least S seconds (COMM_FAULT_STEP_SECONDS=S),
# so that a test can signal a run that is surely still training.
_KILL_AT_STEP = "COMM_FAULT_KILL_AT_STEP"
_KILL_IN_SAVE = "COMM_FAULT_KILL_IN_SAVE"
_STEP_SECONDS = "COMM_FAULT_STEP_SECONDS"


class EpochSampler(torch.utils.data.Sampler):
    """A seeded shuffle that differs per epoch and is reproducible after a resume."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def _maybe_kill(variable: str, step: int) -> None:
    if os.environ.get(variable) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def _attempt(fn) -> BaseException | None:
    """Run a write; return what went wrong instead of raising, so that every rank can learn of a
    failure on any rank before anyone raises (a rank that raised alone would leave the others
    waiting in the next collective)."""
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


class TrainRecipe:
    def __init__(self, cfg, raw_config):
        """``cfg``: the typed TrainConfig object; ``raw_config``: the resolved config as a dict."""
        self.cfg = cfg
        self.raw_config = raw_config
        self.run_dir = Path(cfg.output_dir).resolve()
        self.state = ckpt.TrainerState()
        self.resume_candidates: list[Path] = []
        self.stop = StopSignals()
        self._lock = None  # the run directory's lock, held by the main process

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        self._setup_accelerator()
        self._validate_models()  # from the model configs alone, before the run directory is touched
        self._setup_run_dir()
        self._setup_tokenizer_and_data()
        self._setup_model()
        self._setup_loaders()
        self._setup_optimizer()
        self._setup_tracker()
        if self.resume_candidates:
            self._resume()

    @property
    def resume_from(self) -> Path | None:
        return self.resume_candidates[0] if self.resume_candidates else None

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        tcfg = self.cfg.trainer
        if tcfg.num_threads:
            torch.set_num_threads(tcfg.num_threads)
        precision = tcfg.mixed_precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        if precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"trainer.mixed_precision '{precision}' is not one of auto, no, bf16, fp16")
        self.accelerator = Accelerator(
            # Without a GPU, cpu=True is what makes several launched processes one gloo job
            # (DeepSpeed brings its own CPU backend and refuses cpu=True).
            cpu=not torch.cuda.is_available() and not engines.deepspeed_requested(),
            gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
            mixed_precision=precision,
            log_with=log_with(self.cfg.logger),
            project_dir=str(self.run_dir),
            # We step the schedule once per optimizer step ourselves (Accelerate would otherwise
            # step it num_processes times).
            step_scheduler_with_optimizer=False,
        )
        engines.enable_fsdp_on_cpu(self.accelerator)
        engines.check_supported(self.accelerator)
        self.engine = engines.engine_name(self.accelerator)
        set_seed(self.cfg.seed)

    def _setup_run_dir(self) -> None:
        """Check the run directory before anything is written: every rank reads, then the main
        process writes."""
        acc = self.accelerator
        failure = None
        if acc.is_main_process:
            try:
                self._lock = ckpt.lock_run_dir(self.run_dir)
            except OutputDirError as err:
                failure = err
        if acc.num_processes > 1:
            flag = torch.tensor([1.0 if failure else 0.0], device=acc.device)
            if acc.reduce(flag, reduction="sum").item() > 0 and failure is None:
                failure = OutputDirError(f"the main process could not lock the run directory {self.run_dir}")
        if failure is not None:
            raise failure
        self.resume_candidates, skipped = ckpt.resume_candidates(
            self.run_dir, self.cfg.resume, self.cfg.overwrite
        )
        acc.wait_for_everyone()
        earlier_start = False
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.resume_from is None and self.cfg.overwrite and ckpt.run_contents(self.run_dir):
                logger.warning("overwrite=true: clearing the earlier run in %s", self.run_dir)
                ckpt.clear_run_dir(self.run_dir)
            earlier_start = self.resume_from is None and (self.run_dir / ckpt.RUN_CONFIG).is_file()
            ckpt.remove_partial_checkpoints(self.run_dir)
            config_path = self.run_dir / ckpt.RUN_CONFIG
            if self.resume_from is not None and config_path.is_file():
                self._warn_config_changes(config_path)
            atomic_write_text(config_path, OmegaConf.to_yaml(OmegaConf.create(self.raw_config)))
        acc.wait_for_everyone()
        from comm_cli.cli import setup_logging

        setup_logging(self.run_dir / "train.log", acc.is_main_process)
        logger.info("run directory: %s", self.run_dir)
        if earlier_start:
            logger.info("an earlier start in this directory saved nothing: starting afresh")
        for line in skipped:
            logger.warning("%s; trying the previous one", line)

    def _warn_config_changes(self, config_path: Path) -> None:
        old = flat_config(OmegaConf.to_container(OmegaConf.load(config_path)))
        new = flat_config(self.raw_config)
        changed = sorted(
            key
            for key in set(old) | set(new)
            if old.get(key) != new.get(key) and not key.startswith(("resume", "overwrite"))
        )
        if changed:
            logger.warning("resuming with a changed config: %s", ", ".join(changed[:12]))

    def _validate_models(self) -> None:
        """Model ids/paths, layer mapping and head count, from the model configs alone."""
        from comm_cli.compose import check_config
        from comm_cli.compose.loading import load_model_config
        from comm_cli.training.models import composition_config

        if self.cfg.method.name == "calm":
            check_config(composition_config(self.cfg))
        else:
            load_model_config(self.cfg.anchor, "anchor model")

    def _setup_tokenizer_and_data(self) -> None:
        cfg = self.cfg
        tokenizer_source = cfg.tokenizer or cfg.anchor.name_or_path
        self.tokenizer = load_tokenizer(tokenizer_source, cfg.anchor if cfg.tokenizer is None else None)
        self.plan = None
        with self.accelerator.main_process_first():
            raw = raw_splits(cfg.data, cfg, seed=cfg.seed)
            if cfg.method.name == "calm":
                self.plan = read_plan(cfg, self.tokenizer, sample_texts(raw["train"], cfg.data))
            self.splits = tokenized_splits(raw, self.tokenizer, cfg.data, self.plan)

    def _setup_loaders(self) -> None:
        cfg, tcfg = self.cfg, self.cfg.trainer
        collator = CompletionCollator(
            self.tokenizer.pad_token_id, padding_side="right", augment_pad_ids=augment_pad_ids(self.plan)
        )
        train_collator = collator
        if tcfg.cache_augment_states:
            train_collator = self._augment_cache_collator(collator)
        self.anchor_prefix = None
        if tcfg.cache_anchor_prefix:
            train_collator = self._anchor_prefix_collator(train_collator)
        self.sampler = EpochSampler(len(self.splits["train"]), cfg.seed)
        self.train_loader = torch.utils.data.DataLoader(
            self.splits["train"],
            batch_size=tcfg.batch_size,
            sampler=self.sampler,
            collate_fn=train_collator,
            num_workers=tcfg.num_workers,
            drop_last=True,
        )
        self.val_loader = None
        if "validation" in self.splits:
            self.val_loader = torch.utils.data.DataLoader(
                self.splits["validation"],
                batch_size=tcfg.eval_batch_size or tcfg.batch_size,
                shuffle=False,
                collate_fn=collator,
                num_workers=tcfg.num_workers,
            )

    def _train_split_with_example_ids(self):
        """The training split with an ``example_id`` column (what the cache collators index by)."""
        train = self.splits["train"]
        if "example_id" not in train.column_names:
            train = train.add_column("example_id", list(range(len(train))))
            self.splits["train"] = train
        return train

    def _augment_cache_collator(self, collator):
        """Precompute (or reuse) the augmenting models' states over the training split."""
        from comm_cli.compose.loading import torch_dtype
        from comm_cli.training.augment_cache import (
            AugmentStateCache,
            CachedStatesCollator,
            build_cache,
            data_fingerprint,
        )

        if not isinstance(self.model, ComposedModel):
            raise ConfigError(
                "trainer.cache_augment_states=true needs method=calm (only CALM has augmenting models)"
            )
        train = self._train_split_with_example_ids()
        dtype = torch_dtype(self.cfg.bridge.dtype)
        directory = Path(self.cfg.trainer.cache_dir or self.run_dir / "augment_cache").expanduser()
        fingerprint = data_fingerprint(train, self.model, self.model.mask_mode, dtype)
        with self.accelerator.main_process_first():
            cache = AugmentStateCache.open(directory, fingerprint)
            if cache is None:
                if not self.accelerator.is_main_process:
                    raise ConfigError(
                        f"the augment-state cache in {directory} is missing on this node: use a shared cache_dir"
                    )
                self.model.to(self.accelerator.device)
                cache = build_cache(
                    self.model,
                    train,
                    directory,
                    fingerprint,
                    dtype,
                    batch_size=4 * self.cfg.trainer.batch_size,
                )
            else:
                logger.info("reusing cached augment states in %s", directory)
        return CachedStatesCollator(collator, cache)

    def _anchor_prefix_collator(self, collator):
        """Precompute (or reuse) the anchor's frozen bottom layers over the training split and
        make those layers replay them during training steps."""
        import dataclasses

        from comm_cli.compose.prefix import AnchorPrefix, decoder_layers, trainable_prefix_length
        from comm_cli.training.anchor_prefix_cache import (
            AnchorPrefixCache,
            PrefixStatesCollator,
            build_cache,
            fingerprint,
        )

        tcfg = self.cfg.trainer
        if self.engine not in ("single", "ddp"):
            raise ConfigError(
                f"trainer.cache_anchor_prefix=true does not work with {self.engine} (it shards the "
                "anchor's layers): set trainer.cache_anchor_prefix=false or train without FSDP/DeepSpeed"
            )
        composed = isinstance(self.model, ComposedModel)
        anchor = self.model.anchor if composed else self.model
        layers = decoder_layers(anchor)
        if composed:  # the lowest bridge adds to its layer's output: that layer is frozen too
            frozen = min(self.model._bridges_at) + 1
        else:
            frozen = trainable_prefix_length(layers, anchor.get_input_embeddings())
        if frozen == 0:
            raise ConfigError(
                "trainer.cache_anchor_prefix=true, but training changes the anchor's embeddings or its "
                "first layer, so no frozen prefix exists: set trainer.cache_anchor_prefix=false"
            )
        length = frozen
        if tcfg.anchor_prefix_layers is not None:
            if not 1 <= tcfg.anchor_prefix_layers <= frozen:
                raise ConfigError(
                    f"trainer.anchor_prefix_layers={tcfg.anchor_prefix_layers}, but only the anchor's first "
                    f"{frozen} layers are frozen in this run: give 1..{frozen} (or null for {frozen})"
                )
            length = tcfg.anchor_prefix_layers
        train = self._train_split_with_example_ids()
        spec = (
            dataclasses.asdict(self.cfg.anchor)
            if dataclasses.is_dataclass(self.cfg.anchor)
            else dict(self.cfg.anchor)
        )
        # the states follow from the weights and the token ids (fingerprinted themselves); which
        # tokenizer made the ids is no part of them (a composition names it, LoRA does not)
        spec.pop("tokenizer", None)
        dtype = next(anchor.parameters()).dtype
        key = fingerprint(train, spec, length, dtype)
        directory = Path(tcfg.anchor_prefix_cache_dir or self.run_dir / "anchor_prefix_cache").expanduser()
        with self.accelerator.main_process_first():
            cache = AnchorPrefixCache.open(directory, key)
            if cache is None:
                if not self.accelerator.is_main_process:
                    raise ConfigError(
                        f"the anchor prefix cache in {directory} is missing on this node: "
                        "use a shared trainer.anchor_prefix_cache_dir"
                    )
                self.model.to(self.accelerator.device)
                with self.accelerator.autocast():
                    cache = build_cache(anchor, layers, length, train, directory, key, 4 * tcfg.batch_size)
            else:
                logger.info("reusing the anchor's cached prefix states (%d layers) in %s", length, directory)
        self.anchor_prefix = AnchorPrefix(layers, length)
        self.anchor_prefix.probe(anchor)
        return PrefixStatesCollator(collator, cache)

    def _setup_model(self) -> None:
        self.model = build_model(self.cfg)
        if isinstance(self.model, ComposedModel):
            plan = self.plan
            readers = plan.augment_readers if plan else [None] * len(self.model.augments)
            self.model.set_readers(self.tokenizer, plan.anchor_reader if plan else None, readers)
        if self.engine.startswith("fsdp"):
            engines.name_wrap_blocks(self.model)
        counts = parameter_counts(self.model)
        self.parameter_counts = counts
        logger.info(
            "parameters: %s trainable, %s frozen", f"{counts['trainable']:,}", f"{counts['frozen']:,}"
        )
        if self.cfg.trainer.compile_bridges and isinstance(self.model, ComposedModel):
            for bridge in self.model.bridges:
                bridge.compile()

    def _setup_optimizer(self) -> None:
        acc, tcfg = self.accelerator, self.cfg.trainer
        self.optimizer = build_optimizer(self.model, self.cfg.optimizer)
        if len(self.train_loader) == 0:
            raise ConfigError(
                f"the training split ({len(self.splits['train'])} examples) is smaller than one batch "
                f"(trainer.batch_size={tcfg.batch_size}): lower the batch size or add data"
            )
        self.model, self.optimizer, self.train_loader = acc.prepare(
            self.model, self.optimizer, self.train_loader
        )
        if self.val_loader is not None:
            self.val_loader = acc.prepare(self.val_loader)
        steps_per_epoch = max(1, len(self.train_loader) // tcfg.gradient_accumulation_steps)
        if tcfg.max_steps is not None:
            self.total_steps = int(tcfg.max_steps)
        elif tcfg.epochs is not None:
            self.total_steps = int(math.ceil(tcfg.epochs * steps_per_epoch))
        else:
            raise ConfigError("no training budget: set trainer.max_steps=N or trainer.epochs=E")
        self.steps_per_epoch = steps_per_epoch
        # Prepared after the step count is known; stepped once per optimizer step.
        self.scheduler = acc.prepare(build_scheduler(self.optimizer, self.cfg.scheduler, self.total_steps))
        if self.engine == "deepspeed":
            # Prepared apart from the model, the schedule is not DeepSpeed's to save; Accelerate
            # saves it with the checkpoint as a registered object instead.
            acc.register_for_checkpointing(self.scheduler)
        if not self.engine.startswith("fsdp"):  # FSDP2 state is written by engines.save_fsdp_state
            acc.register_save_state_pre_hook(self._save_trainable_hook)
            acc.register_load_state_pre_hook(self._load_trainable_hook)

    def _setup_tracker(self) -> None:
        run_id = None
        if self.resume_from is not None:
            run_id = ckpt.TrainerState.load(self.resume_from / ckpt.TRAINER_STATE).wandb_run_id
        config = dict(self.raw_config)
        config["parameters"] = dict(self.parameter_counts)
        self.state.wandb_run_id = start_trackers(
            self.accelerator, self.cfg.logger, self.run_dir, config, run_id, self.cfg.name
        )
        self.accelerator.log(
            {
                "params/trainable": self.parameter_counts["trainable"],
                "params/frozen": self.parameter_counts["frozen"],
            },
            step=0,
        )

    # ------------------------------------------------------------------ checkpoints

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

    def _write_state(self, directory: Path) -> None:
        """This rank's part of a checkpoint: trained parameters, optimizer, scheduler, RNG."""
        if self.engine.startswith("fsdp"):
            engines.save_fsdp_state(self.accelerator, self.model, self.optimizer, directory)
        elif self.engine == "deepspeed":
            self.accelerator.save_state(str(directory), exclude_frozen_parameters=True)
        else:
            self.accelerator.save_state(str(directory))

    def _agree(self, failure: BaseException | None, what: str, tmp: Path | None = None) -> None:
        """Raise on every rank if a write failed on any rank, after removing the partial write."""
        acc = self.accelerator
        failed = failure is not None
        if acc.num_processes > 1:
            flag = torch.tensor([1.0 if failed else 0.0], device=acc.device)
            failed = acc.reduce(flag, reduction="sum").item() > 0
        if not failed:
            return
        if acc.is_main_process and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = ckpt.latest_checkpoint(self.run_dir)
        kept = (
            f"the newest complete checkpoint, {latest.name}, is intact and resume=auto continues from it"
            if latest is not None
            else "no earlier checkpoint exists"
        )
        raise CheckpointError(
            f"cannot write {what} ({_describe(failure)}): free space on the disk of {self.run_dir} (or raise "
            f"the file-size limit) and run again; {kept}"
        )

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step_N: under a temporary name, every file flushed and listed with its
        size and hash in the state file, which is written last; then renamed. A write that fails
        on any rank (a full disk) removes the partial directory and stops with one line; the
        previous checkpoint is untouched."""
        acc = self.accelerator
        final = ckpt.checkpoint_dir(self.run_dir, self.state.step)
        tmp = final.with_name(f".tmp-{final.name}")
        what = f"checkpoint {final.name}"
        failure = None
        if acc.is_main_process:
            failure = _attempt(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)))
        self._agree(failure, what, tmp)
        failure = _attempt(lambda: self._write_state(tmp))
        _maybe_kill(_KILL_IN_SAVE, self.state.step)
        self._agree(failure, what, tmp)
        if acc.is_main_process:
            failure = _attempt(lambda: self._seal_checkpoint(tmp, final))
        self._agree(failure, what, tmp)
        if acc.is_main_process:
            ckpt.prune_checkpoints(self.run_dir, self.cfg.trainer.keep_last)
            logger.info("checkpoint step %d: %s", self.state.step, final)
        acc.wait_for_everyone()
        return final

    def _seal_checkpoint(self, tmp: Path, final: Path) -> None:
        self.state.files = ckpt.file_manifest(tmp)
        self.state.save(tmp / ckpt.TRAINER_STATE)  # last: marks the checkpoint complete
        ckpt.fsync_directory(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ckpt.fsync_directory(final.parent)

    def _resume(self) -> None:
        """Load the first candidate checkpoint that loads. The candidates passed their checksums;
        one that still fails to load (written by an older comm without checksums, say) is skipped
        under resume=auto with one line, and is an error when named by resume=PATH."""
        for index, path in enumerate(self.resume_candidates):
            try:
                self._load_checkpoint(path)
                return
            except CommError:
                raise  # a config that does not fit the checkpoint fits no older one either
            except Exception as err:
                if self.cfg.resume != "auto":
                    raise CheckpointError(
                        f"checkpoint {path} does not load ({_describe(err)}): give another checkpoint, or "
                        "resume=auto for the newest one that loads"
                    ) from err
                logger.warning("skipping checkpoint %s: it does not load (%s)", path.name, _describe(err))
                if index == len(self.resume_candidates) - 1:
                    raise CheckpointError(
                        f"no checkpoint in {self.run_dir / ckpt.CHECKPOINTS} loads (the oldest: {_describe(err)}): "
                        "start over with overwrite=true"
                    ) from err
                logger.warning("trying the previous checkpoint")

    def _load_checkpoint(self, path: Path) -> None:
        logger.info("resuming from %s", path)
        if self.engine.startswith("fsdp"):
            engines.load_fsdp_state(self.accelerator, self.model, self.optimizer, path)
        elif self.engine == "deepspeed":
            self.accelerator.load_state(str(path), load_module_strict=False)
        else:
            self.accelerator.load_state(str(path))
        saved = ckpt.TrainerState.load(path / ckpt.TRAINER_STATE)
        saved.wandb_run_id = self.state.wandb_run_id or saved.wandb_run_id
        self.state = saved
        logger.info(
            "resumed at step %d (epoch %d, batch %d)", saved.step, saved.epoch, saved.batches_in_epoch
        )

    # ------------------------------------------------------------------ training

    def _summed_loss(self, batch) -> torch.Tensor:
        """Summed token loss of a micro-batch, computed without logits where no loss is (and,
        with a cached anchor prefix, without the anchor's frozen bottom layers)."""
        states = batch.pop("anchor_prefix_states", None)
        replay = (
            self.anchor_prefix.given(states) if self.anchor_prefix is not None else contextlib.nullcontext()
        )
        with replay:
            return batch_loss(self.model, batch, composed=self.cfg.method.name == "calm", reduction="sum")

    def _micro_batches(self):
        """Yield (epoch, index in epoch, batch) forever, from the saved data position on."""
        acc = self.accelerator
        epoch, skip = self.state.epoch, self.state.batches_in_epoch
        while True:
            # The prepared loader re-seeds the sampler with its own epoch counter on every pass.
            self.train_loader.set_epoch(epoch)
            loader = self.train_loader
            if skip:
                loader = acc.skip_first_batches(self.train_loader, skip)
                loader.set_epoch(epoch)
            for index, batch in enumerate(loader, start=skip):
                yield epoch, index, batch
            epoch, skip = epoch + 1, 0

    def train(self) -> dict:
        """The loop, with SIGTERM/SIGINT turned into a checkpoint at the next step boundary."""
        if self.cfg.trainer.prepare_only:
            logger.info("trainer.prepare_only=true: data, models and caches are ready; no step taken")
            return {}
        with self.stop:
            return self._train()

    def _stop_requested(self) -> bool:
        """Whether any rank received a stop signal; all ranks learn it at the same step."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self.stop.requested
        flag = torch.tensor([1.0 if self.stop.requested else 0.0], device=acc.device)
        return acc.reduce(flag, reduction="sum").item() > 0

    def _stop_at_boundary(self) -> None:
        """Checkpoint (unless this step's was just written) and leave the loop."""
        step = self.state.step
        final = ckpt.checkpoint_dir(self.run_dir, step)
        if not (final / ckpt.TRAINER_STATE).is_file():
            final = self.save_checkpoint()
        raise TrainingStopped(
            f"stopped by {self.stop.name} at step {step}/{self.total_steps}; checkpoint {final} holds "
            "everything so far: run the same command with resume=auto to continue"
        )

    def _train(self) -> dict:
        acc, tcfg = self.accelerator, self.cfg.trainer
        step_seconds = float(os.environ.get(_STEP_SECONDS, "0") or 0)
        accumulation = tcfg.gradient_accumulation_steps
        world = acc.num_processes
        self.model.train()
        batches = self._micro_batches()
        progress = None
        if tcfg.progress_bar and acc.is_local_main_process and self.state.step < self.total_steps:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=self.state.step, desc="train", dynamic_ncols=True)
        window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
        metrics: dict = {}
        while self.state.step < self.total_steps:
            micro = [next(batches) for _ in range(accumulation)]
            local_tokens = sum(loss_token_count(b["labels"]) for _, _, b in micro)
            global_tokens = acc.reduce(local_tokens.detach().clone().to(acc.device), reduction="sum").item()
            if global_tokens == 0:
                raise ConfigError(
                    "a training batch has no loss-carrying token: check data.format and the fields"
                )
            step_loss = torch.zeros((), device=acc.device)
            for _, _, batch in micro:
                with acc.accumulate(self.model):
                    loss = self._summed_loss(batch) * (world / global_tokens)
                    # Accelerate (and DeepSpeed) divide by the accumulation steps; our loss is
                    # already normalised by the tokens of the whole accumulated batch.
                    acc.backward(loss * accumulation)
                    step_loss += loss.detach() / world
                    grad_norm = None
                    if acc.sync_gradients and tcfg.max_grad_norm:
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), tcfg.max_grad_norm)
                        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
                            grad_norm = grad_norm.full_tensor()
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            step_loss = acc.reduce(step_loss, reduction="sum").item()
            if not math.isfinite(step_loss):
                self._stop_on_non_finite(step_loss)
            self.scheduler.step()
            last_epoch, last_index, _ = micro[-1]
            self.state.step += 1
            self.state.epoch, self.state.batches_in_epoch = last_epoch, last_index + 1
            if self.state.batches_in_epoch >= len(self.train_loader):
                self.state.epoch, self.state.batches_in_epoch = last_epoch + 1, 0
            self.state.tokens += int(global_tokens)
            self.state.last_loss = step_loss
            window_loss += step_loss * global_tokens
            window_tokens += global_tokens
            if step_seconds:
                time.sleep(step_seconds)
            _maybe_kill(_KILL_AT_STEP, self.state.step)
            step = self.state.step
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}")
            if step % tcfg.log_every == 0 or step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "train/loss": window_loss / max(window_tokens, 1),
                    "train/lr": self.scheduler.get_last_lr()[0],
                    "train/tokens_per_s": window_tokens / max(elapsed, 1e-9),
                    "train/epoch": self.state.epoch
                    + self.state.batches_in_epoch / max(len(self.train_loader), 1),
                }
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                acc.log(metrics, step=step)
                if progress is None:
                    logger.info("step %d/%d loss %.4f", step, self.total_steps, metrics["train/loss"])
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            if (
                self.val_loader is not None
                and tcfg.eval_every
                and step % tcfg.eval_every == 0
                and step < self.total_steps
            ):
                self._log_validation()
            if tcfg.save_every and step % tcfg.save_every == 0 and step < self.total_steps:
                self.save_checkpoint()
            if step < self.total_steps and self._stop_requested():
                if progress is not None:
                    progress.close()
                self._stop_at_boundary()
        if progress is not None:
            progress.close()
        final_metrics = dict(metrics)
        if self.val_loader is not None:
            final_metrics.update(self._log_validation())
        self.save_checkpoint()
        self.save_final()
        self._write_summary(final_metrics)
        return final_metrics

    def _stop_on_non_finite(self, value: float) -> None:
        latest = ckpt.latest_checkpoint(self.run_dir)
        where = (
            f"the last good checkpoint is {latest} (resume=auto continues from it)"
            if latest
            else "no checkpoint was written"
        )
        raise NonFiniteLossError(
            f"the loss became {value} at step {self.state.step + 1}: lower optimizer.lr, set trainer.max_grad_norm, or "
            f"use trainer.mixed_precision=no; {where}"
        )

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean token loss (and perplexity) over the validation split, all processes."""
        acc, tcfg = self.accelerator, self.cfg.trainer
        self.model.eval()
        total, tokens = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
        for index, batch in enumerate(self.val_loader):
            if tcfg.eval_batches and index >= tcfg.eval_batches:
                break
            total += self._summed_loss(batch)
            tokens += loss_token_count(batch["labels"])
        total = acc.reduce(total, reduction="sum").item()
        tokens = acc.reduce(tokens, reduction="sum").item()
        engines.reshard(self.model)  # FSDP2 keeps the root unsharded after a forward without backward
        self.model.train()
        loss = total / max(tokens, 1)
        return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}

    def _log_validation(self) -> dict:
        metrics = self.evaluate()
        self.accelerator.log(metrics, step=self.state.step)
        logger.info("step %d validation loss %.4f", self.state.step, metrics["val/loss"])
        return metrics

    def save_final(self) -> Path:
        """The trained result in its method's format, written under a temporary name and renamed.
        The last checkpoint (written just before) holds the same weights; if this write fails,
        resume=auto from it writes the final save again."""
        acc = self.accelerator
        final = self.run_dir / ckpt.FINAL_DIRS[self.cfg.method.name]
        tmp = final.with_name(f".{final.name}.tmp")
        acc.wait_for_everyone()
        failure = None

        def write() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            self._unwrapped().save_pretrained(tmp)
            if self.cfg.method.name != "calm":
                self.tokenizer.save_pretrained(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)

        with engines.whole_trainable(self._unwrapped(), self.engine):  # collective under FSDP2 / ZeRO-3
            if acc.is_main_process:
                failure = _attempt(write)
        self._agree(failure, f"the final {final.name}/", tmp)
        if acc.is_main_process:
            logger.info("saved %s", final)
        acc.wait_for_everyone()
        return final

    def _write_summary(self, metrics: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        import json

        summary = {
            "name": self.cfg.name,
            "method": self.cfg.method.name,
            "steps": self.state.step,
            "tokens": self.state.tokens,
            "final": str(self.run_dir / ckpt.FINAL_DIRS[self.cfg.method.name]),
            "parameters": self.parameter_counts,
            "metrics": metrics,
            "wandb_run_id": self.state.wandb_run_id,
        }
        atomic_write_text(self.run_dir / ckpt.SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")

    def cleanup(self) -> None:
        self.accelerator.end_training()
        if self._lock is not None:
            self._lock.close()  # releases the run directory
            self._lock = None
