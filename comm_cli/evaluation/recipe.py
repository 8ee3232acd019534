"""comm-eval's steps: load the model under test, run every task, write and log the results."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from comm_cli.cli import reset_accelerate_state, setup_logging
from comm_cli.compose import ComposedModel
from comm_cli.errors import ConfigError
from comm_cli.evaluation.models import load_eval_model
from comm_cli.evaluation.report import format_table, log_to_tracker, result_rows, write_results
from comm_cli.evaluation.runner import TaskRunner
from comm_cli.training.models import load_tokenizer
from comm_cli.training.trackers import log_with, start_trackers

logger = logging.getLogger(__name__)


def check_tasks(cfg) -> None:
    """Metric names, answer extraction and data format of every task, before any model loads."""
    from comm_cli.evaluation import metrics as M

    if not cfg.tasks:
        raise ConfigError(
            "no evaluation task is configured: add one, e.g. '+task@tasks.mine=kv_arithmetic_heldout'"
        )
    for name, task in cfg.tasks.items():
        unknown = sorted(set(task.metrics) - set(M.METRICS))
        if unknown:
            raise ConfigError(f"tasks.{name}.metrics has unknown {unknown}: use {list(M.METRICS)}")
        M.extractor(task.extract, task.regex)
        if set(task.metrics) - {"loss"} and task.data.format != "prompt_completion":
            raise ConfigError(
                f"tasks.{name}: generation metrics need prompt/completion data: set data.format=prompt_completion "
                "or metrics=[loss]"
            )


def evaluate(cfg, raw_config: dict) -> list[dict]:
    run_dir = Path(cfg.output_dir).resolve()
    setup_logging(run_dir / "eval.log")
    check_tasks(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_eval_model(cfg, device)
    tokenizer = load_tokenizer(
        cfg.tokenizer or model.tokenizer_source, None if cfg.tokenizer else model.tokenizer_spec
    )
    runner = TaskRunner(model, tokenizer, cfg.generation, cfg, cfg.seed)

    variants = [("", None)]
    if cfg.bridges_off:
        if not isinstance(model.model, ComposedModel):
            raise ConfigError("bridges_off=true needs model=calm")
        variants.append(("bridges off", model.model.bridges_disabled))
    rows, predictions = [], []
    for variant, context in variants:
        results = []
        for name, task in cfg.tasks.items():
            if context is None:
                result = runner.run(name, task)
            else:
                with context():
                    result = runner.run(name, task)
            results.append(result)
            for prediction in result.predictions:
                predictions.append({**prediction, "model": cfg.model + (f" ({variant})" if variant else "")})
            logger.info("%s%s: %s", name, f" [{variant}]" if variant else "", result.metrics)
        rows += result_rows(results, cfg.model, model.checkpoint, variant)

    from accelerate import Accelerator

    accelerator = Accelerator(
        cpu=device.type == "cpu", log_with=log_with(cfg.logger), project_dir=str(run_dir)
    )
    start_trackers(accelerator, cfg.logger, run_dir, raw_config, None, cfg.name)
    path = write_results(run_dir, rows, predictions, raw_config)
    log_to_tracker(accelerator, rows, predictions, cfg.sample_predictions)
    accelerator.end_training()
    reset_accelerate_state()
    print(format_table(rows), flush=True)
    logger.info("results written to %s", path)
    return rows
