"""comm-eval after comm-train: what a run's saved config says about how to evaluate it.

``comm-eval checkpoint=outputs/NAME/composition`` finds ``outputs/NAME/run_config.yaml`` (written
by comm-train next to what it saved) and evaluates the run as it was trained: an experiment's run
gets that experiment's tasks (its eval suite) and its sections (where its specialists live, and
with which settings), so a run on tiny specialists is scored on the same tiny world. What the run
says becomes ordinary overrides placed *before* the user's own, so every choice shows in
``comm-eval ... --cfg job`` and anything on the command line wins.
"""

from __future__ import annotations

from pathlib import Path

from comm_cli.training.checkpoint import RUN_CONFIG


def run_config_of(checkpoint: str | Path) -> dict | None:
    """The saved config of the run that wrote ``checkpoint`` (its parent's run_config.yaml)."""
    path = Path(checkpoint).expanduser().parent / RUN_CONFIG
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return data if isinstance(data, dict) else None


def _value_of(argv: list[str], key: str) -> str | None:
    found = None
    for arg in argv:
        if arg.startswith(f"{key}="):
            found = arg.split("=", 1)[1]
    return found


def _touches(argv: list[str], prefixes: tuple[str, ...]) -> bool:
    """Whether the command line sets any of these keys or groups (``suite=``, ``+task@tasks.x=``...)."""
    keys = [arg.split("=", 1)[0].lstrip("+~") for arg in argv if "=" in arg or arg.startswith("~")]
    return any(key == p or key.startswith((f"{p}.", f"{p}@")) for key in keys for p in prefixes)


def overrides_from_run(argv: list[str]) -> list[str]:
    """Overrides that evaluate the run behind ``checkpoint=`` as it was trained (empty when there
    is no checkpoint on the command line or no saved run config beside it)."""
    from comm_cli import registry

    checkpoint = _value_of(argv, "checkpoint")
    if not checkpoint:
        return []
    run = run_config_of(checkpoint)
    if run is None:
        return []
    out = []
    # a suite of the user's own replaces the run's; added tasks (+task@tasks.x=...) join it
    picks_tasks = _touches(argv, ("suite",))
    for experiment in registry.experiments():
        section = run.get(experiment.section) if experiment.section else None
        if section is None:
            continue
        if experiment.eval_suite and not picks_tasks:
            out.append(f"suite={experiment.eval_suite}")
            picks_tasks = True  # one suite: a run of two experiments gets the first's
        if not _touches(argv, (experiment.section,)):
            out.append(f"{experiment.section}={hydra_value(section)}")
    return out


def hydra_value(value) -> str:
    """``value`` (JSON-like) in Hydra's override grammar: dicts, lists, quoted strings."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{hydra_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"
