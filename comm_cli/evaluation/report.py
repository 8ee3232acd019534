"""Writing what an evaluation found: results.json, predictions.jsonl, a printed table, and the
same metrics (plus a table of sample predictions, and pictures when drawn) to the tracker."""

from __future__ import annotations

import json
from pathlib import Path

from comm_cli.atomic import atomic_write_text

RESULTS = "results.json"
PREDICTIONS = "predictions.jsonl"


def result_rows(results, model: str, checkpoint: str | None, variant: str = "") -> list[dict]:
    rows = []
    for result in results:
        for metric, value in result.metrics.items():
            rows.append(
                {
                    "task": result.task,
                    "metric": metric,
                    "value": value,
                    "n": result.n,
                    "model": model + (f" ({variant})" if variant else ""),
                    "variant": variant or None,
                    "checkpoint": checkpoint,
                }
            )
    return rows


def write_results(
    run_dir: Path, rows: list[dict], predictions: list[dict], config: dict, extra: dict | None = None
) -> Path:
    """``extra``: further top-level sections (lm-eval's own record under "harness")."""
    run_dir.mkdir(parents=True, exist_ok=True)
    document = {"results": rows, "config": config, **(extra or {})}
    atomic_write_text(run_dir / RESULTS, json.dumps(document, indent=2, sort_keys=True) + "\n")
    atomic_write_text(
        run_dir / PREDICTIONS, "".join(json.dumps(p, sort_keys=True) + "\n" for p in predictions)
    )
    return run_dir / RESULTS


def format_table(rows: list[dict]) -> str:
    header = ("model", "task", "metric", "value", "n")
    lines = [header] + [
        (
            r["model"],
            r["task"],
            r["metric"],
            f"{r['value']:.4f}" if isinstance(r["value"], float) else str(r["value"]),
            str(r["n"]),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def log_to_tracker(accelerator, rows: list[dict], predictions: list[dict], sample: int) -> None:
    metrics = {
        f"{r['task']}/{r['metric']}" + (f"/{r['variant'].replace(' ', '_')}" if r["variant"] else ""): r[
            "value"
        ]
        for r in rows
    }
    accelerator.log(metrics, step=0)
    if sample and predictions:
        try:
            tracker = accelerator.get_tracker("wandb", unwrap=False)
        except (ValueError, KeyError):
            return
        if tracker is None or not hasattr(tracker, "log_table"):
            return
        columns = ["task", "prompt", "prediction", "reference", "correct"]
        data = [[str(p.get(c)) for c in columns] for p in predictions[:sample]]
        tracker.log_table("sample_predictions", columns=columns, data=data, step=0)


def log_images(accelerator, images: dict[str, Path]) -> None:
    """PNG files to every tracker that takes pictures (W&B, TensorBoard)."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log_images({key: [str(path)] for key, path in images.items()}, step=0)
        elif tracker.name == "tensorboard":
            from matplotlib.image import imread

            arrays = {key: imread(path)[None, :, :, :3] for key, path in images.items()}
            tracker.log_images(arrays, step=0, dataformats="NHWC")
