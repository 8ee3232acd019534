"""What the training loop reports after each optimizer step.

A progress bar (``trainer.progress_bar``, main process of each node) or, without one, a log line
every ``trainer.log_every`` steps; and at those steps the window's numbers to the trackers: mean
token loss since the last report, learning rate, tokens per second, fractional epoch and, when
gradients are clipped, their norm, and the bridges' readings (``bridge_watch.py``). Every
dict sent to the trackers through ``log`` is also appended to ``<run dir>/metrics.jsonl``, one
JSON line per step (``{"step": N, ...}``), so a run without a tracker keeps its numbers too.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class StepLog:
    def __init__(
        self,
        accelerator,
        total_steps: int,
        first_step: int,
        log_every: int,
        progress_bar: bool,
        jsonl: Path | None = None,
    ):
        self.accelerator, self.total_steps, self.log_every = accelerator, total_steps, log_every
        self.jsonl = jsonl if accelerator.is_main_process else None
        self.progress, self.note = None, ""
        if progress_bar and accelerator.is_local_main_process and first_step < total_steps:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=total_steps, initial=first_step, desc="train", dynamic_ncols=True)
        self._start_window()

    def _start_window(self) -> None:
        self.window_loss, self.window_tokens, self.window_start = 0.0, 0, time.perf_counter()

    def log(self, metrics: dict, step: int) -> None:
        """To the trackers and the step log (main process)."""
        self.accelerator.log(metrics, step=step)
        if self.jsonl is not None:
            with open(self.jsonl, "a") as file:
                file.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")

    def step(
        self,
        step: int,
        loss: float,
        tokens: int,
        lr: float,
        epoch: float,
        grad_norm=None,
        extra: dict | None = None,
        note: str = "",
    ) -> dict | None:
        """Count step ``step`` (mean token loss ``loss`` over ``tokens`` tokens); returns the
        metrics when this step reports them. ``extra``: more metrics of a reporting step (the
        bridges' readings), ``note`` their console text."""
        self.window_loss += loss * tokens
        self.window_tokens += tokens
        reports = step % self.log_every == 0 or step == self.total_steps
        if self.progress is not None:
            self.note = note if reports and note else self.note  # the bar shows the latest readings
            self.progress.update(1)
            self.progress.set_postfix_str(f"loss={loss:.4f}" + (f", {self.note}" if self.note else ""))
        if not reports:
            return None
        elapsed = time.perf_counter() - self.window_start
        metrics = {
            "train/loss": self.window_loss / max(self.window_tokens, 1),
            "train/lr": lr,
            "train/tokens_per_s": self.window_tokens / max(elapsed, 1e-9),
            "train/epoch": epoch,
        }
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        metrics.update(extra or {})
        self.log(metrics, step)
        if self.progress is None:
            logger.info("step %d/%d loss %.4f", step, self.total_steps, metrics["train/loss"])
            if note:  # a line of its own: the loss stays the step line's last word
                logger.info("step %d/%d %s", step, self.total_steps, note)
        self._start_window()
        return metrics

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
