"""`comm-eval`: the Hydra entry point for evaluation (``comm-eval --help``). The work lives in
``comm_cli.evaluation``; a run's checkpoint brings its own tasks (``evaluation/from_run.py``)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from comm_cli.cli import command, register_configs, typed_config
from comm_cli.schema import check_eval_values, eval_schema

PROGRAM = "comm-eval"

register_configs()


def run(cfg: DictConfig) -> list[dict]:
    """Evaluate from a composed config (also what tests and the demo call)."""
    from comm_cli.evaluation.recipe import check_inputs, evaluate
    from comm_cli.registry import prepare

    typed = typed_config(cfg, check_eval_values)
    check_inputs(typed)  # checkpoint and data files, before an experiment builds anything
    prepare(typed)
    return evaluate(typed, OmegaConf.to_container(cfg, resolve=True))


def from_the_run(argv: list[str]) -> list[str]:
    """A run's own settings first (its experiment's tasks and sections, its data reading, a name
    for the results), the user's overrides after them."""
    from comm_cli.evaluation.from_run import output_name, overrides_from_run

    name = output_name(argv)
    return overrides_from_run(argv) + ([f"name={name}"] if name else []) + argv


main = command(PROGRAM, "eval", run, eval_schema, argv_hook=from_the_run)

if __name__ == "__main__":
    main()
