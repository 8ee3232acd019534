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
    own_data = _touches(argv, ("data",))
    if own_data:
        out += _data_reading(run.get("data") or {}, argv)
    # a suite of the user's own (or your own data) replaces the run's; added tasks join it
    picks_tasks = own_data or _touches(argv, ("suite",))
    if not picks_tasks and not _touches(argv, ("tasks", "task", "harness")):
        held_out = _held_out_part(run.get("data") or {})
        out += held_out
        picks_tasks = bool(held_out)
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


def with_the_runs_bos(argv: list[str]) -> list[str]:
    """The command line of a command that uses a trained run (comm-generate, comm-chat,
    comm-serve; their ``argv_hook``): a plain prompt starts as the run's training examples did,
    with or without bos (its ``data.add_bos``), unless the command line sets ``add_bos``."""
    checkpoint = _value_of(argv, "checkpoint")
    run = run_config_of(checkpoint) if checkpoint else None
    if run is None or _touches(argv, ("add_bos",)):
        return argv
    add_bos = (run.get("data") or {}).get("add_bos")
    return argv if add_bos is None else [f"add_bos={hydra_value(add_bos)}", *argv]


# How a run read its examples: your evaluation file is read the same way unless you say otherwise.
READING = ("format", "prompt_field", "completion_field", "text_field", "max_length", "add_bos", "add_eos")


def _data_reading(data: dict, argv: list[str]) -> list[str]:
    if data.get("synthetic") is not None:
        return []
    return [
        f"data.{key}={hydra_value(data[key])}"
        for key in READING
        if key in data and not _touches(argv, (f"data.{key}",))
    ]


# What places a run's held-out part: the same files, split and seeded carve-off.
PLACING = (
    "path",
    "name",
    "data_files",
    "split",
    "validation_split",
    "validation_fraction",
    "seed",
    "revision",
)


def _held_out_part(data: dict) -> list[str]:
    """Overrides that score the held-out part of a run trained on files of your own (the
    examples it validated on, never trained on); none for an experiment's synthetic data or a
    run that held nothing out."""
    if data.get("synthetic") is not None or (data.get("data_files") is None and data.get("path") is None):
        return []
    if not data.get("validation_split") and not data.get("validation_fraction"):
        return []
    keys = [k for k in (*PLACING, *READING) if data.get(k) is not None]
    return [f"data.{k}={hydra_value(data[k])}" for k in keys] + ["data.held_out=true"]


FINAL_DIRS = ("composition", "adapter", "model")  # what comm-train saves in a run directory


def output_name(argv: list[str]) -> str | None:
    """``name=`` for an evaluation the user did not name: named for what it evaluates (the run
    behind a checkpoint, or the base model), and a fresh directory when an earlier evaluation of
    the same thing is there (``eval_run``, ``eval_run-2``, ...), so results never overwrite each
    other. None when the command line names it."""
    if _value_of(argv, "name") is not None:
        return None
    kind = _value_of(argv, "model") or "calm"
    checkpoint = _value_of(argv, "checkpoint")
    if kind in ("anchor", "augment"):
        source = _value_of(argv, f"{kind}.name_or_path") or _value_of(argv, kind) or "model"
        what = f"{kind}_{Path(source.rstrip('/')).name}"
    elif checkpoint:
        path = Path(checkpoint.rstrip("/"))
        what = path.parent.name if path.name in FINAL_DIRS and path.parent.name else path.name
        what = what if kind == "calm" else f"{kind}_{what}"
    else:
        return None
    what = "".join(c if c.isalnum() or c in "-_." else "_" for c in what)
    root = Path(_value_of(argv, "output_root") or "outputs")
    name, number = f"eval_{what}", 1
    while (root / name).exists() and any((root / name).iterdir()):
        number += 1
        name = f"eval_{what}-{number}"
    return name


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
