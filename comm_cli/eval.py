"""`comm-eval`: the Hydra entry point for evaluation. The work lives in ``comm_cli.evaluation``.

comm-eval checkpoint=outputs/kv_arithmetic/composition   a run, evaluated as it was trained
comm-eval checkpoint=outputs/my_run/composition
comm-eval model=anchor                            a baseline: anchor | augment | lora | full
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from comm_cli.cli import (
    check_override_keys,
    config_dir,
    help_if_asked,
    quiet_libraries,
    register_configs,
    resolve_output_dir,
    run_hydra,
    run_reporting_errors,
    task_started,
    to_typed,
)
from comm_cli.schema import check_eval_values, eval_schema

PROGRAM = "comm-eval"
GROUPS = {"anchor", "augment", "logger", "task", "suite"}

register_configs()


def run(cfg: DictConfig) -> list[dict]:
    """Evaluate from a composed config (also what tests and the demo call)."""
    from comm_cli.evaluation.recipe import check_inputs, evaluate
    from comm_cli.registry import prepare

    typed = to_typed(cfg)
    quiet_libraries(typed.verbose)
    check_eval_values(typed)
    check_inputs(typed)  # checkpoint and data files, before an experiment builds anything
    prepare(typed)
    return evaluate(typed, OmegaConf.to_container(cfg, resolve=True))


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    task_started()
    resolve_output_dir(cfg)
    run_reporting_errors(PROGRAM, lambda: run(cfg), run_dir=cfg.output_dir)


def main() -> None:
    help_if_asked(PROGRAM, sys.argv[1:])
    from comm_cli.evaluation.from_run import output_name, overrides_from_run

    # a run's own settings first (its experiment's tasks and sections), the user's after them
    argv = sys.argv[1:]
    name = output_name(argv)
    sys.argv[1:] = overrides_from_run(argv) + ([f"name={name}"] if name else []) + argv
    check_override_keys(PROGRAM, sys.argv[1:], eval_schema(), GROUPS)
    run_hydra(PROGRAM, _hydra_main)


if __name__ == "__main__":
    main()
