"""Building the real-facts experiment's bases on first use.

The presets of this experiment (``anchor=smollm2_135m_instruct``, ``augment=facts_specialist``,
``data.synthetic=real_facts``) point into ``facts.root`` / ``facts.dir``; when a config uses any
of them and they are missing, the anchor is converted from the wheel's GGUF and the world and
augmenting models are built (once; later runs reuse them). Only the main process builds; the
others wait.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from comm_cli.errors import ModelLoadError

logger = logging.getLogger(__name__)

NAME = "real_facts"


def uses_facts(cfg) -> bool:
    """Whether a train or eval config reads anything the experiment builds."""
    facts = getattr(cfg, "facts", None)
    if facts is None:
        return False
    root = str(Path(facts.root).expanduser())
    names = [cfg.anchor.name_or_path, cfg.augment.name_or_path]
    names += [entry.model.name_or_path for entry in getattr(cfg, "extra_augments", [])]
    datas = [getattr(cfg, "data", None)] + [task.data for task in getattr(cfg, "tasks", {}).values()]
    uses_data = any(getattr(data, "synthetic", None) == NAME for data in datas)
    return uses_data or any(str(name).startswith(root) for name in names)


def anchor_dir(cfg) -> Path:
    return Path(cfg.facts.root).expanduser() / "anchor"


def prepare(cfg) -> None:
    """Convert the anchor and build the world and augmenting models when this config uses them
    and they are not cached yet."""
    if not uses_facts(cfg):
        return
    from comm_cli.experiments.real_facts.anchor import ensure_anchor, read_manifest
    from comm_cli.experiments.real_facts.specialists import ensure_bases, read_complete_manifest

    facts_dir = Path(cfg.facts.dir).expanduser()
    settings = cfg.facts.settings
    if read_manifest(anchor_dir(cfg)) is not None:
        if read_complete_manifest(facts_dir, settings) is not None:
            return
        built = _complete_build_hash(facts_dir)
        if built is not None:
            # facts.dir was named explicitly and holds a finished build: use it as it is.
            logger.warning(
                "facts.dir %s holds bases built with other settings (%s, the config describes %s): using them as they are",
                facts_dir,
                built,
                settings.hash(),
            )
            return
    if not cfg.facts.build:
        raise ModelLoadError(
            f"the real-facts bases are missing in {facts_dir}: run `make demo-real` once or set facts.build=true"
        )
    if os.environ.get("RANK", "0") != "0":
        _wait_for(cfg)
        return
    logger.info("building the real-facts bases in %s (first use; later runs reuse them)", facts_dir)
    from comm_cli.compose.specs import ModelSpec

    ensure_anchor(anchor_dir(cfg), ModelSpec(cfg.facts.source) if cfg.facts.source else None)
    ensure_bases(facts_dir, anchor_dir(cfg), settings)


def _complete_build_hash(facts_dir: Path) -> str | None:
    """The settings hash of a finished build in ``facts_dir`` (whatever its settings), else None."""
    import json

    try:
        manifest = json.loads((facts_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not manifest.get("complete") or not (facts_dir / "specialist" / "config.json").is_file():
        return None
    return manifest.get("settings_hash")


def _wait_for(cfg, timeout_s: float = 3600.0) -> None:
    from comm_cli.experiments.real_facts.anchor import read_manifest
    from comm_cli.experiments.real_facts.specialists import read_complete_manifest

    start = time.time()
    while (
        read_manifest(anchor_dir(cfg)) is None
        or read_complete_manifest(cfg.facts.dir, cfg.facts.settings) is None
    ):
        if time.time() - start > timeout_s:
            raise ModelLoadError(
                f"timed out waiting for rank 0 to build the real-facts bases in {cfg.facts.dir}"
            )
        time.sleep(2.0)
