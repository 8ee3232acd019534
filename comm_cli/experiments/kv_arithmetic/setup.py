"""Building the key-value experiment's specialists on first use.

The kv presets (``anchor=kv_anchor``, ``augment=kv_augment``, ``data=kv_arithmetic``) point into
``kv.dir``; when any of them is in use and the specialists are missing there, they are built
(once; later runs reuse them). Only the main process builds; the others wait.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from comm_cli.errors import ModelLoadError

logger = logging.getLogger(__name__)


def uses_kv_specialists(cfg) -> bool:
    """Whether a train or eval config reads anything from ``kv.dir`` (a config without the kv
    section reads nothing of the experiment)."""
    if getattr(cfg, "kv", None) is None:
        return False
    kv_dir = str(Path(cfg.kv.dir).expanduser())
    names = _models_in_use(cfg)
    datas = [getattr(cfg, "data", None)] + [task.data for task in getattr(cfg, "tasks", {}).values()]
    uses_data = any(getattr(data, "synthetic", None) == "kv_arithmetic" for data in datas)
    return uses_data or any(str(name).startswith(kv_dir) for name in names)


def _models_in_use(cfg) -> list[str]:
    """The base models this job loads: comm-eval's ``model=anchor`` reads only the anchor, and a
    saved composition names its own bases (so ``comm-eval model=anchor anchor.name_or_path=X``
    does not build the specialists because the default augment preset points into kv.dir)."""
    kind = getattr(cfg, "model", None)  # comm-eval's model kind; comm-train has none
    if kind in ("anchor", "lora"):
        return [cfg.anchor.name_or_path]
    if kind == "augment":
        return [cfg.augment.name_or_path]
    if kind == "full":
        return []
    checkpoint = getattr(cfg, "checkpoint", None)
    if kind == "calm" and checkpoint and (Path(checkpoint) / "composition_config.json").is_file():
        from comm_cli.compose.saving import read_composition_config

        config = read_composition_config(checkpoint)
        return [config.anchor.name_or_path, *(a.model.name_or_path for a in config.augments)]
    return [cfg.anchor.name_or_path, cfg.augment.name_or_path]


def prepare(cfg) -> None:
    """Build the specialists when this config uses them and they are not cached yet."""
    if not uses_kv_specialists(cfg):
        return
    from comm_cli.experiments.kv_arithmetic.specialists import (
        ensure_specialists,
        read_complete_manifest,
        remove_stale_partials,
    )

    kv_dir = Path(cfg.kv.dir).expanduser()
    settings = cfg.kv.specialists
    remove_stale_partials(kv_dir)  # killed builds' leftovers, also when the cached build is reused
    if read_complete_manifest(kv_dir, settings) is not None:
        return
    built_hash = _complete_build_hash(kv_dir)
    if built_hash is not None:
        # kv.dir was named explicitly and holds a finished build: use it as it is.
        logger.warning(
            "kv.dir %s holds specialists built with other settings (%s, the config describes %s): using them as they are",
            kv_dir,
            built_hash,
            settings.hash(),
        )
        return
    if not cfg.kv.build:
        raise ModelLoadError(
            f"the key-value specialists are missing in {kv_dir}: build them with "
            f"`python scripts/build_specialists.py --out-dir {kv_dir}` or set kv.build=true"
        )
    if os.environ.get("RANK", "0") != "0":
        _wait_for(kv_dir, settings)
        return
    logger.info("building the key-value specialists in %s (first use; later runs reuse them)", kv_dir)
    ensure_specialists(kv_dir, settings)


def _complete_build_hash(kv_dir: Path) -> str | None:
    """The settings hash of a finished build in ``kv_dir`` (whatever its settings), else None."""
    import json

    try:
        manifest = json.loads((kv_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not manifest.get("complete") or not (kv_dir / "anchor" / "config.json").is_file():
        return None
    return manifest.get("settings_hash")


def _wait_for(kv_dir: Path, settings, timeout_s: float = 3600.0) -> None:
    import time

    from comm_cli.experiments.kv_arithmetic.specialists import read_complete_manifest

    start = time.time()
    while read_complete_manifest(kv_dir, settings) is None:
        if time.time() - start > timeout_s:
            raise ModelLoadError(f"timed out waiting for rank 0 to build the specialists in {kv_dir}")
        time.sleep(2.0)
