"""`comm-train`: the Hydra entry point. Everything else lives in ``comm_cli.training``.

comm-train                                   the key-value arithmetic experiment
comm-train experiment=code_qwen data.data_files=train.jsonl
comm-train --cfg job                         print the composed config
comm-train -m optimizer.lr=1e-3,3e-3         a sweep
accelerate launch --config_file conf/accelerate/ddp.yaml -m comm_cli.train ...
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
from comm_cli.schema import check_train_values, train_schema

PROGRAM = "comm-train"
GROUPS = {
    "anchor",
    "augment",
    "mapping",
    "data",
    "method",
    "optimizer",
    "scheduler",
    "trainer",
    "logger",
    "experiment",
}

register_configs()


def run(cfg: DictConfig) -> dict:
    """Train from a composed config (also what tests call)."""
    from comm_cli.data.loading import check_local_data
    from comm_cli.registry import prepare
    from comm_cli.training.engines import reset_accelerate_state
    from comm_cli.training.recipe import TrainRecipe

    typed = to_typed(cfg)
    quiet_libraries(typed.verbose)
    check_train_values(typed)
    check_local_data(typed.data)
    prepare(typed)
    raw = OmegaConf.to_container(cfg, resolve=True)
    recipe = TrainRecipe(typed, raw)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        if hasattr(recipe, "accelerator"):
            recipe.cleanup()
            reset_accelerate_state()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    task_started()
    resolve_output_dir(cfg)
    run_reporting_errors(PROGRAM, lambda: run(cfg), run_dir=cfg.output_dir)


def main() -> None:
    help_if_asked(PROGRAM, sys.argv[1:])
    check_override_keys(PROGRAM, sys.argv[1:], train_schema(), GROUPS)
    run_hydra(PROGRAM, _hydra_main)


if __name__ == "__main__":
    main()
