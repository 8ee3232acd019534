"""Building the key-value experiment's specialists on first use.

The kv presets (``anchor=kv_anchor``, ``augment=kv_augment``, ``data=kv_arithmetic``) point into
``kv.dir``; when any of them is in use and the specialists are missing there, they are built
(once; later runs reuse them). Only the main process builds; the others wait.
"""

from __future__ import annotations

import logging
from pathlib import Path

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
    from comm_cli.experiments.builds import prepare_build
    from comm_cli.experiments.kv_arithmetic.specialists import directory, ensure_specialists

    kv_dir = Path(cfg.kv.dir).expanduser()
    settings = cfg.kv.specialists

    def make() -> None:
        logger.info("building the key-value specialists in %s (first use; later runs reuse them)", kv_dir)
        ensure_specialists(kv_dir, settings)

    prepare_build(
        directory(kv_dir),
        settings.hash(),
        make,
        may_build=cfg.kv.build,
        missing=(
            f"the key-value specialists are missing in {kv_dir}: build them with "
            f"`python scripts/build_specialists.py --out-dir {kv_dir}` or set kv.build=true"
        ),
    )
