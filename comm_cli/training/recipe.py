"""The training recipe: one class, one method per phase (torchtune-style).

    recipe = TrainRecipe(cfg, raw_config)
    recipe.setup()       # accelerator, run dir, tokenizer, data, model, loaders, optimizer, tracker, resume
    recipe.train()       # the Accelerate loop
    recipe.cleanup()

Each ``_setup_*`` step takes its slice of the config. The run directory, checkpoints, resume and
the final save are the checkpoint client's (``checkpoint_client.py``); the collators that read
cached states are ``caches.py``'s; the loaders ``loaders.py``'s; what a step reports
``step_log.py``'s; whether the bridges read (their numbers, the plateau line) ``bridge_watch.py``'s.

The loss of an optimizer step is the sum of token losses over all micro-batches and all
processes divided by the number of loss-carrying tokens in that global batch, so k processes
with batch b give the same update as one process with batch k*b (and gradient accumulation is
exact too).

Faults (see ``checkpoint_client.py``, ``preemption.py``, ``ranks.py``, ``engines.py``,
``faults.py``): SIGTERM/SIGINT during start-up stop at once, and once training runs write a
checkpoint at the next step boundary; both exit 75. A setup step that fails on one process (a
file missing on one node) stops every process with one line. A checkpoint that cannot be written
(a full disk) is removed and the previous one stays; a checkpoint that fails its checksums is
skipped by ``resume=auto``. Under every engine a checkpoint holds only trained parameters and
their optimizer state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from comm_cli.atomic import atomic_write_text
from comm_cli.compose import ComposedModel
from comm_cli.compose.composed import parameter_counts
from comm_cli.compose.encoding import CompletionCollator, augment_pad_ids
from comm_cli.compose.tokenizers import load_anchor_tokenizer
from comm_cli.data.build import raw_splits, tokenized_splits
from comm_cli.errors import ConfigError, NonFiniteLossError, TrainingStopped
from comm_cli.logs import setup_logging
from comm_cli.losses import loss_token_count
from comm_cli.training import checkpoint as ckpt
from comm_cli.training import engines
from comm_cli.training.bridge_watch import BridgeWatch, PlateauDetector, console_text, tracker_metrics
from comm_cli.training.caches import anchor_prefix_collator, augment_cache_collator, with_example_ids
from comm_cli.training.checkpoint_client import CheckpointClient
from comm_cli.training.faults import KILL_AT_STEP, kill_if_asked, step_seconds, with_missing_model
from comm_cli.training.loaders import micro_batches, train_loader, validation_loader
from comm_cli.training.models import (
    batch_loss,
    build_model,
    plan_calm,
    sample_texts,
)
from comm_cli.training.optim import build_optimizer, build_scheduler
from comm_cli.training.preemption import StopSignals
from comm_cli.training.ranks import any_process, main_process_first, together
from comm_cli.training.run_report import closing_lines
from comm_cli.training.step_log import StepLog
from comm_cli.training.trackers import log_with, start_trackers

logger = logging.getLogger(__name__)


class TrainRecipe:
    def __init__(self, cfg, raw_config, stop: StopSignals | None = None):
        """``cfg``: the typed TrainConfig object (its values checked by the schema); ``raw_config``:
        the resolved config as a dict; ``stop``: the job's stop signals when they are caught from
        its start (comm-train), else the loop catches them itself."""
        self.cfg = cfg
        self.raw_config = raw_config
        self.run_dir = Path(cfg.output_dir).resolve()
        self.state = ckpt.TrainerState()
        self.stop = stop or StopSignals()
        self.checkpoints: CheckpointClient | None = None
        self.anchor_prefix = None  # replays the anchor's cached bottom layers (cache_anchor_prefix)

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Every step that one process may fail alone (a file missing on its node) is agreed:
        a failure anywhere stops every process with one line (``ranks.together``)."""
        cfg = self.cfg
        self._setup_accelerator(cfg.trainer, cfg.logger, cfg.seed)
        # from the model configs alone, before the run directory is touched
        together(self.accelerator, "checking the models", lambda: self._validate_models(cfg))
        self._setup_run_dir(cfg)
        self._setup_tokenizer_and_data(cfg)
        together(self.accelerator, "loading the models", lambda: self._setup_model(cfg))
        self._setup_loaders(cfg.trainer, cfg.seed, cfg.bridge.dtype, cfg.anchor)
        self._setup_optimizer(cfg.optimizer, cfg.scheduler, cfg.trainer)
        self._setup_tracker(cfg.logger, cfg.name)
        self.state = self.checkpoints.resume(self.state)

    def _setup_accelerator(self, trainer_cfg, logger_cfg, seed: int) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        if trainer_cfg.num_threads:
            torch.set_num_threads(trainer_cfg.num_threads)
        precision = trainer_cfg.mixed_precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        self.accelerator = Accelerator(
            # Without a GPU, cpu=True is what makes several launched processes one gloo job
            # (DeepSpeed brings its own CPU backend and refuses cpu=True).
            cpu=not torch.cuda.is_available() and not engines.deepspeed_requested(),
            gradient_accumulation_steps=trainer_cfg.gradient_accumulation_steps,
            mixed_precision=precision,
            log_with=log_with(logger_cfg),
            project_dir=str(self.run_dir),
            # We step the schedule once per optimizer step ourselves (Accelerate would otherwise
            # step it num_processes times).
            step_scheduler_with_optimizer=False,
        )
        engines.enable_fsdp_on_cpu(self.accelerator)
        engines.check_supported(self.accelerator)
        self.engine = engines.engine_name(self.accelerator)
        set_seed(seed)

    def _validate_models(self, cfg) -> None:
        """Model ids/paths, layer mapping and head count, from the model configs alone."""
        from comm_cli.compose import check_config
        from comm_cli.compose.loading import load_model_config
        from comm_cli.training.models import composition_config

        if cfg.method.name == "calm":
            check_config(composition_config(cfg))
        else:
            load_model_config(cfg.anchor, "anchor model")

    def _setup_run_dir(self, cfg) -> None:
        """Lock and check the run directory (the checkpoint client's), then log into it."""
        self.checkpoints = CheckpointClient(
            self.accelerator,
            self.run_dir,
            self.engine,
            method=cfg.method.name,
            resume=cfg.resume,
            overwrite=cfg.overwrite,
            keep_last=cfg.trainer.keep_last,
        )
        self.checkpoints.open_run_dir(self.raw_config)
        setup_logging(self.run_dir / "train.log", self.accelerator.is_main_process)
        logger.info("run directory: %s", self.run_dir)
        self.checkpoints.report()

    def _setup_tokenizer_and_data(self, cfg) -> None:
        """The anchor's tokenizer, the plan of how each model reads text, the tokenized splits:
        on the main process first (the others then read the datasets cache it filled)."""
        acc = self.accelerator
        self.tokenizer = together(
            acc, "loading the anchor's tokenizer", lambda: load_anchor_tokenizer(cfg.anchor, cfg.tokenizer)
        )

        def read() -> tuple:
            raw = raw_splits(cfg.data, cfg, seed=cfg.seed)
            plan = None
            if cfg.method.name == "calm":
                plan = plan_calm(cfg, self.tokenizer, sample_texts(raw["train"], cfg.data))
            return plan, tokenized_splits(raw, self.tokenizer, cfg.data, plan.reading if plan else None)

        self.calm_plan, self.splits = main_process_first(acc, "reading the data", read)
        self.plan = self.calm_plan.reading if self.calm_plan else None

    def _setup_model(self, cfg) -> None:
        self.model = build_model(with_missing_model(cfg, self.accelerator.process_index), self.calm_plan)
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
        if cfg.trainer.compile_bridges and isinstance(self.model, ComposedModel):
            for bridge in self.model.bridges:
                bridge.compile()

    def _setup_loaders(self, trainer_cfg, seed: int, bridge_dtype: str, anchor_spec) -> None:
        """The loaders; with trainer.cache_*, a training collator that reads precomputed states."""
        collator = CompletionCollator(
            self.tokenizer.pad_token_id, padding_side="right", augment_pad_ids=augment_pad_ids(self.plan)
        )
        train_collator = collator
        if trainer_cfg.cache_augment_states or trainer_cfg.cache_anchor_prefix:
            self.splits["train"] = with_example_ids(self.splits["train"])
        if trainer_cfg.cache_augment_states:
            train_collator = augment_cache_collator(
                collator,
                self.model,
                self.splits["train"],
                self.accelerator,
                trainer_cfg,
                bridge_dtype,
                self.run_dir,
            )
        if trainer_cfg.cache_anchor_prefix:
            train_collator, self.anchor_prefix = anchor_prefix_collator(
                train_collator,
                self.model,
                self.splits["train"],
                self.accelerator,
                trainer_cfg,
                anchor_spec,
                self.engine,
                self.run_dir,
            )
        self.train_loader = train_loader(self.splits["train"], train_collator, trainer_cfg, seed)
        self.val_loader = None
        if "validation" in self.splits:
            self.val_loader = validation_loader(self.splits["validation"], collator, trainer_cfg)

    def _setup_optimizer(self, optimizer_cfg, scheduler_cfg, trainer_cfg) -> None:
        acc = self.accelerator
        self.optimizer = build_optimizer(self.model, optimizer_cfg)
        if len(self.train_loader) == 0:
            raise ConfigError(
                f"the training split ({len(self.splits['train'])} examples) is smaller than one batch "
                f"(trainer.batch_size={trainer_cfg.batch_size}): lower the batch size or add data"
            )
        self.model, self.optimizer, self.train_loader = acc.prepare(
            self.model, self.optimizer, self.train_loader
        )
        if self.val_loader is not None:
            self.val_loader = acc.prepare(self.val_loader)
        self.steps_per_epoch = max(1, len(self.train_loader) // trainer_cfg.gradient_accumulation_steps)
        if trainer_cfg.max_steps is not None:  # the schema has checked that one of the two is set
            self.total_steps = int(trainer_cfg.max_steps)
        else:
            self.total_steps = int(math.ceil(trainer_cfg.epochs * self.steps_per_epoch))
        # Prepared after the step count is known; stepped once per optimizer step.
        self.scheduler = acc.prepare(build_scheduler(self.optimizer, scheduler_cfg, self.total_steps))
        self.checkpoints.attach(self.model, self.optimizer, self.scheduler)

    def _setup_tracker(self, logger_cfg, name: str) -> None:
        config = dict(self.raw_config)
        config["parameters"] = dict(self.parameter_counts)
        self.state.wandb_run_id = start_trackers(
            self.accelerator, logger_cfg, self.run_dir, config, self.checkpoints.resumed_wandb_run_id(), name
        )
        self.accelerator.log(
            {
                "params/trainable": self.parameter_counts["trainable"],
                "params/frozen": self.parameter_counts["frozen"],
            },
            step=0,
        )

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save_checkpoint(self.state)

    def save_final(self) -> Path:
        return self.checkpoints.save_final(self.tokenizer)

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

    def train(self) -> dict:
        """The loop, with SIGTERM/SIGINT turned into a checkpoint at the next step boundary."""
        if self.cfg.trainer.prepare_only:
            logger.info("trainer.prepare_only=true: data, models and caches are ready; no step taken")
            return {}
        with self.stop:
            self.stop.training()
            return self._train()

    def _stop_requested(self) -> bool:
        """Whether any rank received a stop signal; all ranks learn it at the same step."""
        return any_process(self.accelerator, self.stop.requested)

    def _stop_at_boundary(self) -> None:
        """Checkpoint (unless this step's was just written) and leave the loop."""
        step = self.state.step
        final = self.checkpoints.checkpoint_at(step) or self.save_checkpoint()
        raise TrainingStopped(
            f"stopped by {self.stop.name} at step {step}/{self.total_steps}; checkpoint {final} holds "
            "everything so far: run the same command with resume=auto to continue"
        )

    def _train(self) -> dict:
        tcfg = self.cfg.trainer
        self.started = time.perf_counter()
        least_step_seconds = step_seconds()
        self.model.train()
        batches = micro_batches(
            self.accelerator, self.train_loader, self.state.epoch, self.state.batches_in_epoch
        )
        report = self.report = StepLog(
            self.accelerator,
            self.total_steps,
            self.state.step,
            tcfg.log_every,
            tcfg.progress_bar,
            self.run_dir / "metrics.jsonl",
        )
        composition = self.accelerator.unwrap_model(self.model)
        watch = BridgeWatch(composition, tcfg, self.total_steps, self.engine)
        self.plateau = PlateauDetector.from_config(tcfg, self.total_steps)
        self.plateau.enabled &= watch.model is not None
        if self.val_loader is not None and watch.model is not None:
            self._log_anchor_validation(composition)
        metrics: dict = {}
        with contextlib.closing(report):
            while self.state.step < self.total_steps:
                micro = [next(batches) for _ in range(tcfg.gradient_accumulation_steps)]
                with watch.probe(self.state.step + 1):
                    loss, tokens, grad_norm = self._optimizer_step([batch for _, _, batch in micro])
                readings = watch.readings(micro[-1][2]["attention_mask"])
                last_epoch, last_index, _ = micro[-1]
                self._advance(last_epoch, last_index, loss, tokens)
                if least_step_seconds:
                    time.sleep(least_step_seconds)
                kill_if_asked(KILL_AT_STEP, self.state.step)
                step = self.state.step
                epoch = self.state.epoch + self.state.batches_in_epoch / max(len(self.train_loader), 1)
                lr = self.scheduler.get_last_lr()[0]
                metrics = (
                    report.step(
                        step,
                        loss,
                        tokens,
                        lr,
                        epoch,
                        grad_norm,
                        tracker_metrics(readings),
                        console_text(readings),
                    )
                    or metrics
                )
                self.plateau.observe(readings)
                if step == self.total_steps:
                    break
                if self.val_loader is not None and self._validation_due(step, last_epoch):
                    self._log_validation()
                self._warn_on_plateau(step)
                if tcfg.save_every and step % tcfg.save_every == 0:
                    self.save_checkpoint()
                if self._stop_requested():
                    report.close()
                    self._stop_at_boundary()
        final_metrics = dict(metrics)
        if self.val_loader is not None:
            final_metrics.update(self._log_validation())
        self._warn_on_plateau(self.state.step)
        self.save_checkpoint()
        self.save_final()
        self._write_summary(final_metrics)
        return final_metrics

    def _optimizer_step(self, batches: list[dict]) -> tuple[float, int, object]:
        """One optimizer step over these micro-batches of every process: (mean token loss of the
        global batch, its loss-carrying tokens, the gradient norm when clipped, else None)."""
        acc, tcfg = self.accelerator, self.cfg.trainer
        world, accumulation = acc.num_processes, len(batches)
        local_tokens = sum(loss_token_count(b["labels"]) for b in batches)
        global_tokens = acc.reduce(local_tokens.detach().clone().to(acc.device), reduction="sum").item()
        if global_tokens == 0:
            raise ConfigError("a training batch has no loss-carrying token: check data.format and the fields")
        step_loss = torch.zeros((), device=acc.device)
        for batch in batches:
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
        return step_loss, int(global_tokens), grad_norm

    def _validation_due(self, step: int, epoch_of_step: int) -> bool:
        """Every trainer.eval_every steps; with eval_every null, after each completed epoch."""
        every = self.cfg.trainer.eval_every
        if every:
            return step % every == 0
        return self.state.epoch > epoch_of_step

    def _advance(self, epoch: int, index: int, loss: float, tokens: int) -> None:
        """Move the trainer state past a step whose last micro-batch was batch ``index`` of ``epoch``."""
        state = self.state
        state.step += 1
        state.epoch, state.batches_in_epoch = epoch, index + 1
        if state.batches_in_epoch >= len(self.train_loader):
            state.epoch, state.batches_in_epoch = epoch + 1, 0
        state.tokens += tokens
        state.last_loss = loss

    def _stop_on_non_finite(self, value: float) -> None:
        latest = self.checkpoints.latest()
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
        self.report.log(metrics, self.state.step)
        logger.info("step %d validation loss %.4f", self.state.step, metrics["val/loss"])
        self.plateau.observe(val_loss=metrics["val/loss"])
        return metrics

    def _log_anchor_validation(self, composition: ComposedModel) -> None:
        """The validation loss of the anchor alone (bridges off), the mark a run must leave."""
        with composition.bridges_disabled():
            loss = self.evaluate()["val/loss"]
        self.plateau.anchor_loss = loss
        self.report.log({"val/anchor_loss": loss}, self.state.step)
        logger.info("step %d validation loss of the anchor alone (bridges off) %.4f", self.state.step, loss)

    def _warn_on_plateau(self, step: int) -> None:
        message = self.plateau.check(step)
        if message is not None and self.accelerator.is_main_process:  # each rank measured its own batch
            logger.warning("%s", message)

    def _write_summary(self, metrics: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        summary = {
            "name": self.cfg.name,
            "method": self.cfg.method.name,
            "steps": self.state.step,
            "tokens": self.state.tokens,
            "final": str(self.checkpoints.final_dir),
            "parameters": self.parameter_counts,
            "metrics": metrics,
            "wandb_run_id": self.state.wandb_run_id,
            "plateau": self.plateau.message,
        }
        atomic_write_text(self.run_dir / ckpt.SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        for line in closing_lines(summary, time.perf_counter() - self.started, self.run_dir):
            logger.info(line)

    def cleanup(self) -> None:
        self.accelerator.end_training()
        if self.checkpoints is not None:
            self.checkpoints.close()
