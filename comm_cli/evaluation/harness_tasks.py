"""comm-eval's ``harness`` section: lm-evaluation-harness tasks on the model under evaluation.

The tasks run through ``lm_eval.simple_evaluate`` with ``CommLM`` (``harness.py``) wrapping the
already-loaded model, and come back as comm's own ``TaskResult``s, so they land in
``results.json``, the printed table and the tracker like every other task. lm-eval's own record
(task versions, configs, n-shot, sample counts) is kept whole under ``"harness"`` in results.json,
so a number can be traced to the task definition that produced it.

Metric names are lm-eval's ``metric,filter`` keys with the default filter ``,none`` dropped
(``acc``, ``acc_stderr``, ``exact_match,strict-match``).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from comm_cli.errors import ConfigError
from comm_cli.evaluation.runner import TaskResult

logger = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'comm-cli[harness]' (lm-evaluation-harness)"


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"harness.tasks needs lm-evaluation-harness, which is not installed: {EXTRA_HINT}"
        ) from err


def task_manager(harness):
    """lm-eval's TaskManager over its own tasks plus ``include_path`` and the folders of any task
    given as a YAML file; returns (manager, task names)."""
    require_lm_eval()
    paths, names = [], []
    if harness.include_path:
        if not Path(harness.include_path).is_dir():
            raise ConfigError(f"harness.include_path {harness.include_path} is not a directory of task YAMLs")
        paths.append(str(Path(harness.include_path).resolve()))
    for task in harness.tasks:
        task = str(task)
        if task.endswith((".yaml", ".yml")):
            path = Path(task)
            if not path.is_file():
                raise ConfigError(f"harness task file {task} does not exist: give a task name or a YAML path")
            paths.append(str(path.resolve().parent))
            names.append(_yaml_task_name(path))
        else:
            names.append(task)
    return _manager(tuple(paths)), names


@functools.lru_cache(maxsize=4)
def _manager(paths: tuple[str, ...]):
    """lm-eval indexes every task YAML it ships when a TaskManager is made (seconds): once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None)


def check_tasks(harness) -> None:
    """Every task name is known to lm-eval (before any model loads)."""
    if not harness.tasks:
        return
    manager, names = task_manager(harness)
    known = set(manager.all_tasks)
    unknown = [name for name in names if name not in known]
    if unknown:
        import difflib

        hints = {n: difflib.get_close_matches(n, sorted(known), n=1) for n in unknown}
        hint = ", ".join(f"{n} (did you mean {h[0]}?)" if h else n for n, h in hints.items())
        raise ConfigError(
            f"harness.tasks: lm-eval knows no task {hint}: `lm-eval ls tasks` lists them; "
            "your own YAMLs go in harness.include_path"
        )


def run(model, tokenizer, cfg) -> tuple[list[TaskResult], dict]:
    """Run ``cfg.harness.tasks`` on ``model`` (an EvalModel); (results, lm-eval's record)."""
    import lm_eval

    from comm_cli.evaluation.harness import CommLM

    harness = cfg.harness
    manager, names = task_manager(harness)
    lm = CommLM(
        model,
        tokenizer=tokenizer,
        batch_size=harness.batch_size or cfg.generation.batch_size,
        max_length=harness.max_length,
        add_bos_token=harness.add_bos_token,
        seed=cfg.seed,
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=harness.num_fewshot,
        limit=harness.limit,
        log_samples=harness.log_samples,
        gen_kwargs=dict(harness.gen_kwargs) or None,
        task_manager=manager,
        bootstrap_iters=harness.bootstrap_iters,
        confirm_run_unsafe_code=cfg.execute_untrusted_code,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )
    samples = out.pop("samples", {}) or {}
    results = []
    for task, values in out["results"].items():
        metrics = {}
        for key, value in values.items():
            if (
                key in ("alias", "sample_len")
                or not isinstance(value, (int, float))
                or isinstance(value, bool)
            ):
                continue
            metric, _, filter_name = key.partition(",")
            metrics[metric if filter_name in ("", "none") else key] = float(value)
        n = out.get("n-samples", {}).get(task, {}).get("effective", len(samples.get(task, [])))
        results.append(
            TaskResult(
                task=task, metrics=metrics, n=int(n), predictions=_predictions(task, samples.get(task, []))
            )
        )
    record = {
        key: out[key]
        for key in ("results", "groups", "configs", "versions", "n-shot", "higher-is-better", "n-samples")
        if key in out
    }
    return results, _jsonable(record)


def _predictions(task: str, samples: list[dict]) -> list[dict]:
    """lm-eval's logged samples as predictions.jsonl rows (prompt, answer, target, metric)."""
    rows = []
    for sample in samples:
        arguments = sample.get("arguments") or {}
        first = (
            next(iter(arguments.values()), {})
            if isinstance(arguments, dict)
            else (arguments[0] if arguments else {})
        )
        prompt = first.get("arg_0") if isinstance(first, dict) else (first[0] if first else None)
        metric = next((sample[m] for m in sample.get("metrics", []) if m in sample), None)
        rows.append(
            {
                "task": task,
                "doc_id": sample.get("doc_id"),
                "prompt": prompt,
                "prediction": _jsonable(sample.get("filtered_resps")),
                "reference": _jsonable(sample.get("target")),
                "correct": _jsonable(metric),
            }
        )
    return rows


def _yaml_task_name(path: Path) -> str:
    import yaml

    class _Loader(yaml.SafeLoader):  # lm-eval YAMLs use !function tags; only the name matters here
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    data = yaml.load(path.read_text(), Loader=_Loader) or {}
    name = data.get("task") or data.get("group")
    if not isinstance(name, str):
        raise ConfigError(f"harness task file {path} names no task (a top-level 'task:' key)")
    return name


def _jsonable(value):
    import json

    return json.loads(json.dumps(value, default=str))
