"""`comm-train`: the Hydra entry point (``comm-train --help``). The work lives in ``comm_cli.training``."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from comm_cli.cli import command, register_configs, typed_config
from comm_cli.launch import refuse_launch_overrides
from comm_cli.schema import check_train_values, train_schema

PROGRAM = "comm-train"

register_configs()


def run(cfg: DictConfig) -> dict:
    """Train from a composed config (also what tests call). SIGTERM/SIGINT are caught from the
    first line: during start-up they stop the job at once, once training runs at the next step
    boundary (``comm_cli.training.preemption``); either way one line and exit status 75."""
    from comm_cli.training.preemption import StopSignals

    with StopSignals() as stop:
        try:
            return _train(cfg, stop)
        except Exception as err:
            stop.check_cause(err)  # a start-up cut short by a signal reports the signal
            raise


def _train(cfg: DictConfig, stop) -> dict:
    from comm_cli.data.loading import check_local_data
    from comm_cli.registry import prepare
    from comm_cli.training.engines import reset_accelerate_state
    from comm_cli.training.recipe import TrainRecipe

    typed = typed_config(cfg, check_train_values)
    check_local_data(typed.data)
    prepare(typed)
    recipe = TrainRecipe(typed, OmegaConf.to_container(cfg, resolve=True), stop=stop)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        if hasattr(recipe, "accelerator"):
            recipe.cleanup()
            reset_accelerate_state()


main = command(PROGRAM, "train", run, train_schema, argv_hook=refuse_launch_overrides)

if __name__ == "__main__":
    main()
