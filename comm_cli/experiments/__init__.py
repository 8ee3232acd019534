"""Experiments, one package each: its world, specialists, data generator, tasks, demo.

Every subpackage here that has a ``plugin.py`` is an experiment: that module declares what the
experiment adds (its config sections and their schema, resolvers, data generator, preparation
step, eval suite) in one ``comm_cli.registry.Experiment`` and registers it. The core packages
(``compose``, ``data``, ``training``, ``evaluation``, ``schema``) never import this package;
the entry points call ``load()`` before they compose a config.

A new experiment is a copy of a folder: ``<name>/plugin.py``, ``<name>/data.py`` (``raw_splits``,
``eval_rows``), its configs under ``conf/`` (``experiment/<name>.yaml``, its presets), and
whatever else it needs. Experiments that live outside comm register the same way from their own
package, found through the ``comm_cli.experiments`` entry-point group of an installed
distribution or the ``COMM_EXPERIMENTS`` environment variable (comma-separated module names);
such a package can ship its own Hydra configs (``Experiment.config_dir``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import pkgutil

from comm_cli.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_VAR = "COMM_EXPERIMENTS"
ENTRY_POINT_GROUP = "comm_cli.experiments"


def builtin_names() -> list[str]:
    """The subpackages of this package that declare an experiment (a ``plugin`` module)."""
    names = []
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg and importlib.util.find_spec(f"{__name__}.{info.name}.plugin") is not None:
            names.append(info.name)
    return sorted(names)


def load() -> None:
    """Register the built-in experiments and those named by entry points or ``COMM_EXPERIMENTS``
    (modules import once, so calling it again only picks up what is new)."""
    for name in builtin_names():
        importlib.import_module(f"{__name__}.{name}.plugin")
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as err:  # a broken third-party plugin must not stop comm from starting
            logger.warning("the experiment plugin %s (%s) does not load: %s", entry.name, entry.value, err)
    for module in filter(None, (m.strip() for m in os.environ.get(ENV_VAR, "").split(","))):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            raise ConfigError(
                f"{ENV_VAR} names the module {module!r}, which cannot be imported ({err}): check the name "
                "and that its package is on PYTHONPATH"
            ) from err
