"""`comm-eval`: the Hydra entry point for evaluation. The work lives in ``comm_cli.evaluation``.

comm-eval                                         the key-value experiment's composition
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
    resolve_output_dir,
    run_hydra,
    run_reporting_errors,
    task_started,
)
from comm_cli.schema import EvalConfig, check_eval_values, register_schemas

PROGRAM = "comm-eval"
GROUPS = {"anchor", "augment", "logger", "task", "suite"}

register_schemas()


def run(cfg: DictConfig) -> list[dict]:
    """Evaluate from a composed config (also what tests and the demo call)."""
    from comm_cli.evaluation.recipe import check_inputs, evaluate
    from comm_cli.experiments import prepare

    typed = OmegaConf.to_object(cfg)
    check_eval_values(typed)
    check_inputs(typed)  # checkpoint and data files, before an experiment builds anything
    prepare(typed)
    return evaluate(typed, OmegaConf.to_container(cfg, resolve=True))


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    task_started()
    resolve_output_dir(cfg)
    run_reporting_errors(PROGRAM, lambda: run(cfg))


def main() -> None:
    check_override_keys(PROGRAM, sys.argv[1:], EvalConfig, GROUPS)
    run_hydra(PROGRAM, _hydra_main)


if __name__ == "__main__":
    main()
