"""Small helpers every built-in experiment uses: per-component seeds and the printed table.

The experiment packages (``kv_arithmetic``, ``real_facts``) each own their world, specialists and
demo; what they do alike lives here once, so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import statistics
from collections.abc import Iterator


def derive_seed(seed: int, name: str) -> int:
    """A separate, stable seed per component, so changing one part does not shift another's draws."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "big") % (2**31)


def stats(values: list[float]) -> dict[str, float]:
    """Mean, minimum, maximum and (sample) standard deviation of fractions (``n``: how many), as the
    seed tables (`make demo-seeds`, `make demo-real-seeds`) print them."""
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def measured_on(job_seconds: dict[str, float], seconds: float, workers: int, threads: int) -> dict:
    """Where and how a table was measured, for its JSON: each job's seconds, the whole time,
    workers x threads, the machine and the date (UTC)."""
    import os
    import platform
    from datetime import datetime, timezone

    return {
        "job_seconds": {k: round(v, 1) for k, v in job_seconds.items()},
        "seconds": round(seconds, 1),
        "workers": workers,
        "threads_per_worker": threads,
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.machine()}, {platform.processor() or platform.platform()}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_seeds_table(root, summary: dict, report: str) -> None:
    """``<root>/seeds.json`` (written whole or not at all), then the printed report."""
    import json
    from pathlib import Path

    from comm_cli.atomic import atomic_write_text

    path = Path(root) / "seeds.json"
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    print()
    print(report)
    print(f"[seeds] {summary['seconds']:.0f} s in all; written to {path}")


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of ``rows``: the system name, ``columns`` as percentages (n/a for None)
    and the trainable parameter count, in aligned columns under a rule."""
    header = ["system", *columns, "trainable_params"]
    lines = [header] + [
        [
            row["system"],
            *("n/a" if row[c] is None else f"{100 * row[c]:.1f}%" for c in columns),
            f"{row['trainable_params']:,}",
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def pad_rows(rows, pad_id: int) -> dict:
    """Right-pad ``(ids, labels)`` rows to the longest: ``input_ids``, ``attention_mask`` and
    ``labels`` (unshifted: the model or the caller shifts them) for a specialist's training step."""
    import torch

    from comm_cli.losses import IGNORE_INDEX

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        target[i, : len(labels)] = torch.tensor(labels)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": target}


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run a block with ``num_threads`` torch threads (None: leave the setting alone)."""
    import torch

    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers draws a progress bar for every save and load; a build saves several models."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
