"""Building the key-value experiment's specialists once per settings, and finding them after.

``ensure_specialists`` reuses a complete build with the same settings hash and builds otherwise
(``training.py`` trains the two models, each in its own process with one torch thread):

    <out_dir>/world.json              the keys, their values, the composition / held-out split
    <out_dir>/manifest.json           settings, their hash, timings, accuracies (written last)
    <out_dir>/augment/, anchor/       config.json, model.safetensors, tokenizer, manifest.json

The directory follows the experiments' build protocol (``comm_cli.experiments.builds``): a build
is written under a temporary name and renamed into place, so one killed half way never looks
complete and the next build removes what it left.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from comm_cli.atomic import MANIFEST, write_manifest
from comm_cli.experiments.builds import BuildDirectory
from comm_cli.experiments.kv_arithmetic import config as kv_config
from comm_cli.experiments.kv_arithmetic import training
from comm_cli.experiments.kv_arithmetic.config import KVSpecialistSettings
from comm_cli.experiments.kv_arithmetic.world import KVWorld
from comm_cli.experiments.shared import no_progress_bars, torch_threads

logger = logging.getLogger(__name__)

WORLD = "world.json"
MODELS = ("augment", "anchor")
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MANIFEST)


@dataclass
class SpecialistPaths:
    """Where a complete build lies, and whether this call trained it (``built``) or reused it."""

    root: Path
    augment: Path
    anchor: Path
    world: Path
    manifest: dict
    built: bool


def directory(out_dir: str | Path) -> BuildDirectory:
    """The build directory protocol of the specialists (``comm_cli.experiments.builds``)."""
    needs = (WORLD, *(f"{model}/{name}" for model in MODELS for name in _MODEL_FILES))
    return BuildDirectory(Path(out_dir).absolute(), frozenset({*MODELS, WORLD}), needs, "specialists output")


def ensure_specialists(
    out_dir: str | Path, settings: KVSpecialistSettings | None = None, force: bool = False
) -> SpecialistPaths:
    """The specialists for ``settings`` under ``out_dir``: reused when a complete build with the
    same settings hash is there, built otherwise (or when ``force``).

    A directory holding an older or partial build of ours is replaced; a directory holding
    anything else raises ``OutputDirError`` rather than being deleted.
    """
    settings = settings or KVSpecialistSettings()
    build = directory(out_dir)
    if not force:
        build.remove_stale_partials()  # a killed build's leftovers go even when nothing is built
        manifest = build.complete(settings.hash())
        if manifest is not None:
            logger.info("reusing specialists in %s (settings %s)", out_dir, settings.hash())
            return _paths(build.path, manifest, built=False)
    return build_specialists(out_dir, settings)


def build_specialists(out_dir: str | Path, settings: KVSpecialistSettings | None = None) -> SpecialistPaths:
    """Build both specialists from scratch into ``out_dir`` (atomically replacing a build there)."""
    settings = settings or KVSpecialistSettings()
    build = directory(out_dir)
    manifest, _ = build.build(settings.hash(), lambda tmp: _build_into(tmp, settings))
    logger.info("specialists written to %s", build.path)
    return _paths(build.path, manifest, built=True)


def read_complete_manifest(out_dir: str | Path, settings: KVSpecialistSettings) -> dict | None:
    """The top-level manifest of a complete build for exactly these settings, else None."""
    return directory(out_dir).complete(settings.hash())


def _build_into(root: Path, settings: KVSpecialistSettings) -> dict:
    start = time.perf_counter()
    world = KVWorld.create(
        seed=settings.seed,
        num_keys=settings.num_keys,
        key_length=settings.key_length,
        composition_fraction=settings.composition_fraction,
        balanced=settings.balanced_split,
    )
    world.save(root / WORLD)
    names = ("augment", "anchor")
    if settings.processes > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a fresh interpreter per specialist, whatever threads this process has started
        with ProcessPoolExecutor(
            max_workers=2,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_die_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            futures = [pool.submit(_train_and_save, name, str(root), settings.to_dict()) for name in names]
            models = dict(zip(names, (future.result() for future in futures)))
    else:
        models = {name: _train_and_save(name, str(root), settings.to_dict()) for name in names}
    return {
        "complete": True,
        "settings_hash": settings.hash(),
        "recipe_version": kv_config.RECIPE_VERSION,
        **(
            {"encoder_recipe_version": kv_config.ENCODER_RECIPE_VERSION}
            if settings.augment.kind == "encoder"
            else {}
        ),
        "settings": settings.to_dict(),
        "num_threads": 1,
        "processes": settings.processes,
        "torch_version": torch.__version__,
        "total_seconds": round(time.perf_counter() - start, 2),
        "augment": models["augment"],
        "anchor": models["anchor"],
    }


def _die_with_parent(parent_pid: int) -> None:
    """A build worker ends when the process that started it is killed (Linux: the kernel sends
    it SIGTERM), instead of training on, orphaned, into a directory nobody will install. A
    parent that died while this worker was still starting is caught by the pid check."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        os._exit(1)


def _train_and_save(name: str, root: str, settings_dict: dict) -> dict:
    """Train one specialist with a single torch thread (its weights then do not depend on the
    thread count: float sums are not split across threads) and save it; its manifest."""
    settings = KVSpecialistSettings.from_dict(settings_dict)
    world = KVWorld.load(Path(root) / WORLD)
    tokenizer = training.specialist_tokenizer(name, settings)
    train = {"augment": training.train_augment, "anchor": training.train_anchor}[name]
    if name == "augment" and settings.augment.kind == "encoder":
        train = training.train_encoder_augment
    with torch_threads(1):
        model, manifest = train(world, tokenizer, settings)
    with no_progress_bars():
        model.save_pretrained(Path(root) / name)
    tokenizer.save_pretrained(Path(root) / name)
    manifest["settings_hash"] = settings.hash()
    write_manifest(Path(root) / name, manifest)
    return manifest


def _paths(root: Path, manifest: dict, built: bool) -> SpecialistPaths:
    return SpecialistPaths(
        root=root,
        augment=root / "augment",
        anchor=root / "anchor",
        world=root / WORLD,
        manifest=manifest,
        built=built,
    )
