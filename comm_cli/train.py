"""`comm-train`: the Hydra entry point (``comm-train --help``). The work lives in ``comm_cli.training``."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from comm_cli.cli import command, register_configs, typed_config
from comm_cli.schema import check_train_values, train_schema

PROGRAM = "comm-train"

register_configs()


def run(cfg: DictConfig) -> dict:
    """Train from a composed config (also what tests call)."""
    from comm_cli.data.loading import check_local_data
    from comm_cli.registry import prepare
    from comm_cli.training.engines import reset_accelerate_state
    from comm_cli.training.recipe import TrainRecipe

    typed = typed_config(cfg, check_train_values)
    check_local_data(typed.data)
    prepare(typed)
    recipe = TrainRecipe(typed, OmegaConf.to_container(cfg, resolve=True))
    try:
        recipe.setup()
        return recipe.train()
    finally:
        if hasattr(recipe, "accelerator"):
            recipe.cleanup()
            reset_accelerate_state()


main = command(PROGRAM, "train", run, train_schema)

if __name__ == "__main__":
    main()
