"""Building the key-value experiment's specialists once per settings, and finding them after.

``ensure_specialists`` reuses a complete build with the same settings hash and builds otherwise
(``training.py`` trains the two models, each in its own process with one torch thread):

    <out_dir>/world.json              the keys, their values, the composition / held-out split
    <out_dir>/manifest.json           settings, their hash, timings, accuracies (written last)
    <out_dir>/augment/, anchor/       config.json, model.safetensors, tokenizer, manifest.json

A build is written into a temporary sibling directory and renamed into place at the end, so a
build killed half way never looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from comm_cli.errors import OutputDirError
from comm_cli.experiments.kv_arithmetic import config as kv_config
from comm_cli.experiments.kv_arithmetic import training
from comm_cli.experiments.kv_arithmetic.config import KVSpecialistSettings
from comm_cli.experiments.kv_arithmetic.world import KVWorld
from comm_cli.experiments.shared import no_progress_bars, torch_threads

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"

WORLD = "world.json"

# The only entries a specialists directory holds; a directory with anything else is not ours to replace.
_OUR_ENTRIES = {"augment", "anchor", WORLD, MANIFEST}

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


def ensure_specialists(
    out_dir: str | Path, settings: KVSpecialistSettings | None = None, force: bool = False
) -> SpecialistPaths:
    """The specialists for ``settings`` under ``out_dir``: reused when a complete build with the
    same settings hash is there, built otherwise (or when ``force``).

    A directory holding an older or partial build of ours is replaced; a directory holding
    anything else raises ``OutputDirError`` rather than being deleted.
    """
    settings = settings or KVSpecialistSettings()
    out_dir = Path(out_dir)
    if not force:
        remove_stale_partials(out_dir)  # a killed build's leftovers go even when nothing is built
        manifest = read_complete_manifest(out_dir, settings)
        if manifest is not None:
            logger.info("reusing specialists in %s (settings %s)", out_dir, settings.hash())
            return _paths(out_dir, manifest, built=False)
    return build_specialists(out_dir, settings)


def build_specialists(out_dir: str | Path, settings: KVSpecialistSettings | None = None) -> SpecialistPaths:
    """Build both specialists from scratch into ``out_dir`` (atomically replacing a build there)."""
    settings = settings or KVSpecialistSettings()
    out_dir = Path(out_dir).absolute()
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{_HOST}-{time.time_ns()}"
    tmp.mkdir()
    try:
        manifest = _build_into(tmp, settings)
        return _install(tmp, out_dir, settings, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_complete_manifest(out_dir: str | Path, settings: KVSpecialistSettings) -> dict | None:
    """The top-level manifest of a complete build for exactly these settings, else None.

    Complete means: the manifest (written last) says so with the same settings hash, and every file
    a loader needs is present. Anything short of that is treated as missing.
    """
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not manifest.get("complete") or manifest.get("settings_hash") != settings.hash():
        return None
    if not (out_dir / WORLD).is_file():
        return None
    for name in ("augment", "anchor"):
        if not all((out_dir / name / f).is_file() for f in _MODEL_FILES):
            return None
    return manifest


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
    (Path(root) / name / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
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


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"specialists output '{out_dir}' is a file: give a directory path")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _OUR_ENTRIES)
        if foreign:
            raise OutputDirError(
                f"specialists output '{out_dir}' holds other files ({', '.join(foreign[:3])}): "
                "give an empty or new directory"
            )


def _install(tmp: Path, out_dir: Path, settings: KVSpecialistSettings, manifest: dict) -> SpecialistPaths:
    """Write the manifest last, then rename the finished build into place."""
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    theirs = read_complete_manifest(out_dir, settings)
    if theirs is not None:
        # Another process finished the same build first: keep theirs.
        return _paths(out_dir, theirs, built=True)
    old = None
    if out_dir.exists():
        _check_replaceable(out_dir)
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{time.time_ns()}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("specialists written to %s", out_dir)
    return _paths(out_dir, manifest, built=True)


# The build directory names carry the builder's host as well as its pid: on a cache shared by
# several machines, a pid only says whether a build of *this* host is still running.
_HOST = socket.gethostname().replace("-", "_").replace("/", "_") or "localhost"


def remove_stale_partials(out_dir: str | Path) -> None:
    """Delete leftovers of builds that were killed: ``.<name>.partial-<pid>-<host>-<ns>``
    directories whose process is gone (``.partial-<pid>-<ns>``, the older form, counts as this
    host's). A build of another host is left alone."""
    out_dir = Path(out_dir).absolute()
    for entry in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        parts = entry.name.rsplit(".partial-", 1)[1].split("-")
        try:
            pid = int(parts[0])
        except ValueError:
            continue
        host = parts[1] if len(parts) == 3 else _HOST
        if host == _HOST and not _process_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
