"""The experiment registry: how an experiment plugs into comm without the core naming it.

An experiment (a built-in package under ``comm_cli.experiments`` or any importable package of
yours) declares what it adds in one ``Experiment`` and calls ``register``:

    register(Experiment(
        name="kv_arithmetic",                       # data.synthetic=NAME finds its generator
        section="kv", section_schema=KVConfig,      # a top-level config section (null unless set)
        data_section="kv", data_schema=KVTaskConfig,  # a section under data (and every eval task's data)
        resolvers={"comm_kv_hash": settings_hash},  # OmegaConf resolvers its configs use
        data="comm_cli.experiments.kv_arithmetic.data",      # raw_splits / eval_rows
        prepare="comm_cli.experiments.kv_arithmetic.setup:prepare",  # builds what a job needs first
        eval_suite="kv_arithmetic",                 # comm-eval's tasks for a run of this experiment
        config_dir=None,                            # a directory of Hydra configs it ships itself
    ))

The schema (``comm_cli.schema``) builds the train and eval config classes from what is
registered, so a misspelt key in an experiment's section is still rejected by name; the entry
points load the experiments (``comm_cli.experiments.load``) before they compose a config. The
core packages import this module, never an experiment: modules are named as strings and
imported only when a job uses them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from comm_cli.errors import ConfigError


@dataclass(frozen=True)
class Experiment:
    """What one experiment adds to comm (see the module docstring)."""

    name: str
    section: str | None = None
    section_schema: type | None = None
    data_section: str | None = None
    data_schema: type | None = None
    resolvers: Mapping[str, Callable] = field(default_factory=dict)
    data: str | None = None
    prepare: str | None = None
    eval_suite: str | None = None
    config_dir: str | None = None

    def __post_init__(self) -> None:
        if (self.section is None) != (self.section_schema is None):
            raise ValueError(f"experiment {self.name}: section and section_schema go together")
        if (self.data_section is None) != (self.data_schema is None):
            raise ValueError(f"experiment {self.name}: data_section and data_schema go together")


_EXPERIMENTS: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    """Add an experiment; registering the same declaration again is a no-op (a re-import)."""
    known = _EXPERIMENTS.get(experiment.name)
    if known is not None and known != experiment:
        raise ValueError(f"two experiments are named {experiment.name!r}: rename one")
    for other in _EXPERIMENTS.values():
        if other.name == experiment.name:
            continue
        for key in ("section", "data_section"):
            mine = getattr(experiment, key)
            if mine is not None and mine == getattr(other, key):
                raise ValueError(
                    f"experiments {other.name!r} and {experiment.name!r} both claim the config section {mine!r}"
                )
    _EXPERIMENTS[experiment.name] = experiment
    return experiment


def experiments() -> list[Experiment]:
    """Every registered experiment, in registration order."""
    return list(_EXPERIMENTS.values())


def get(name: str) -> Experiment | None:
    return _EXPERIMENTS.get(name)


def import_target(target: str):
    """``package.module`` -> the module; ``package.module:attribute`` -> the attribute."""
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


def data_source(name: str):
    """The generator module behind ``data.synthetic=name``: a registered experiment's ``data``,
    else ``name`` as the dotted path of a module of yours."""
    experiment = _EXPERIMENTS.get(name)
    if experiment is not None and experiment.data is not None:
        return import_target(experiment.data)
    if "." not in name:
        known = ", ".join(sorted(e.name for e in _EXPERIMENTS.values() if e.data)) or "none"
        raise ConfigError(
            f"data.synthetic={name} names no registered experiment (registered: {known}) and no module path: "
            "use one of those, or the dotted path of your generator module"
        )
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and name.startswith(err.name):
            raise ConfigError(
                f"data.synthetic={name}: no module {name} can be imported: check the name and that its "
                "package is on PYTHONPATH"
            ) from err
        raise


def prepare(cfg) -> None:
    """Let every registered experiment build what this config needs from it (a no-op for the
    others), before anything loads."""
    for experiment in experiments():
        if experiment.prepare is not None:
            import_target(experiment.prepare)(cfg)


def section_of(cfg, experiment: Experiment):
    """The experiment's top-level section in a typed or composed config (None when unused)."""
    if experiment.section is None:
        return None
    return getattr(cfg, experiment.section, None)
