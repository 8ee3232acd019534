"""Building the real-facts experiment's bases on first use.

The presets of this experiment (``anchor=smollm2_135m_instruct``, ``augment=facts_specialist``,
``data.synthetic=real_facts``) point into ``facts.root`` / ``facts.dir``; when a config uses any
of them and they are missing, the anchor is converted from the wheel's GGUF and the world and
augmenting models are built (once; later runs reuse them). Only the main process builds; the
others wait.
"""

from __future__ import annotations

import logging
from pathlib import Path

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
    from comm_cli.compose.specs import ModelSpec
    from comm_cli.experiments.builds import prepare_build
    from comm_cli.experiments.real_facts import anchor, specialists

    facts_dir = Path(cfg.facts.dir).expanduser()
    settings = cfg.facts.settings
    missing = (
        f"the real-facts bases are missing in {facts_dir}: run `make demo-real` once or set facts.build=true"
    )
    source = ModelSpec(cfg.facts.source) if cfg.facts.source else None
    converted = anchor.directory_of(anchor_dir(cfg))
    prepare_build(
        converted,
        None,
        lambda: anchor.ensure_anchor(converted.path, source),
        may_build=cfg.facts.build,
        missing=missing,
    )

    def make() -> None:
        logger.info("building the real-facts bases in %s (first use; later runs reuse them)", facts_dir)
        specialists.ensure_bases(facts_dir, converted.path, settings)

    prepare_build(
        specialists.directory_of(facts_dir), settings.hash(), make, may_build=cfg.facts.build, missing=missing
    )
