"""The few lines a finished run leaves on the console: what was done, where it is, what to run next.

A run's end used to be its last log line (``saved .../composition``); a user then had to find the
checkpoint and work out the evaluation command. ``closing_lines`` turns the run summary (the
same dict written to ``summary.json``) into that answer.
"""

from __future__ import annotations

import shlex
from pathlib import Path


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def closing_lines(summary: dict, seconds: float, run_dir: Path) -> list[str]:
    """Summary lines for the console: steps and time, final losses, where things are, next command."""
    metrics = summary.get("metrics") or {}
    losses = [f"train loss {metrics['train/loss']:.4f}"] if "train/loss" in metrics else []
    if "val/loss" in metrics:
        losses.append(f"validation loss {metrics['val/loss']:.4f}")
    tokens = summary.get("tokens") or 0
    lines = [
        f"done: {summary['steps']} steps, {tokens:,} tokens in {_duration(seconds)}"
        + (f"; {', '.join(losses)}" if losses else ""),
        f"run directory: {run_dir} (run_config.yaml, train_summary.json, checkpoints/)",
        f"trained weights: {summary['final']}",
    ]
    final = shlex.quote(str(summary["final"]))
    if summary.get("method") == "calm":
        lines.append(f"next: comm-eval checkpoint={final}   (or comm-chat checkpoint={final})")
    else:
        lines.append(f"next: comm-eval checkpoint={final}")
    return lines
