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
    reset_accelerate_state,
    resolve_output_dir,
    run_hydra,
    run_reporting_errors,
    task_started,
)
from comm_cli.schema import TrainConfig, check_train_values, register_schemas

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

register_schemas()


def run(cfg: DictConfig) -> dict:
    """Train from a composed config (also what tests call)."""
    from comm_cli.data.loading import check_local_data
    from comm_cli.experiments import prepare
    from comm_cli.training.recipe import TrainRecipe

    typed = to_typed(cfg)
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


def to_typed(cfg: DictConfig) -> TrainConfig:
    """The typed config; dataclass checks (e.g. a mapping with two forms) raise ConfigErrors, and
    so does a required value left unset."""
    from omegaconf.errors import MissingMandatoryValue

    from comm_cli.errors import ConfigError

    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        raise ConfigError(
            f"{err.full_key} is not set: give it on the command line or in a config file"
        ) from err


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    task_started()
    resolve_output_dir(cfg)
    run_reporting_errors(PROGRAM, lambda: run(cfg))


def main() -> None:
    check_override_keys(PROGRAM, sys.argv[1:], TrainConfig, GROUPS)
    run_hydra(PROGRAM, _hydra_main)


if __name__ == "__main__":
    main()
