"""Built-in experiments, one package each: its world, specialists, data generator, tasks, demo.

The core packages (``compose``, ``data``, ``training``, ``evaluation``) never import an
experiment. They reach one only through the config: ``data.synthetic=NAME`` finds
``comm_cli.experiments.NAME.data`` (see ``comm_cli.data.build``), and a task's
``extract: package.module:function`` names its answer reader. The entry points (``comm-train``,
``comm-eval``) call ``prepare`` so that an experiment can build what it needs on first use (the
key-value specialists) before anything loads.

A new experiment is a copy of a folder: ``<name>/data.py`` (``raw_splits``, ``eval_rows``),
``<name>/setup.py`` (``prepare(cfg)``), and whatever else it needs; then add it to
``EXPERIMENTS``.
"""

from __future__ import annotations

import importlib

# Packages whose ``setup.prepare(cfg)`` runs before every comm-train / comm-eval job.
EXPERIMENTS = ("kv_arithmetic", "real_facts")


def prepare(cfg) -> None:
    """Let every built-in experiment build what this config needs from it (a no-op otherwise)."""
    for name in EXPERIMENTS:
        importlib.import_module(f"comm_cli.experiments.{name}.setup").prepare(cfg)
