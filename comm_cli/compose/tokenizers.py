"""The tokenizers of a composition's models: loading them (one path for a training run, from its
config, and for a saved composition, from the sources it records) and deciding from them how each
augmenting model reads text.

A model's tokenizer comes from its spec's ``tokenizer`` (a hub id or directory), else from the
model's own directory or id. An augmenting model that ships no tokenizer is taken to read the
anchor's token ids. The sources used are returned, not written into the specs, so that a
caller's config stays as it was read; a composition records them in its own config.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from comm_cli.compose.alignment import ReadPlan, TokenReader, plan_alignment
from comm_cli.compose.loading import load_tokenizer
from comm_cli.compose.specs import ModelSpec
from comm_cli.errors import ModelLoadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tokenizers:
    """Each model's tokenizer and where it was read from. An augmenting model that ships none
    has ``None`` as tokenizer and its spec's ``tokenizer`` as source (unset, or what failed)."""

    anchor: object
    anchor_source: str
    augments: list
    augment_sources: list[str | None]


def anchor_tokenizer_source(spec: ModelSpec, override: str | None = None) -> str:
    """Where the anchor's tokenizer comes from: ``override`` (a run's ``tokenizer=``), else its spec."""
    return override or spec.tokenizer or spec.name_or_path


def load_anchor_tokenizer(spec: ModelSpec, override: str | None = None):
    """The anchor's tokenizer, from ``anchor_tokenizer_source``. The spec's revision, remote-code
    flag and GGUF file apply unless ``override`` names another source."""
    source = anchor_tokenizer_source(spec, override)
    return load_tokenizer(source, None if override else spec, "anchor model's tokenizer")


def load_tokenizers(
    anchor_spec: ModelSpec,
    augment_specs: Sequence[ModelSpec],
    *,
    override: str | None = None,
    required: Sequence[bool] = (),
    anchor_tokenizer=None,
) -> Tokenizers:
    """Every model's tokenizer. ``required[i]``: augmenting model i cannot run without its own
    (it reads aligned tokens), so a missing one is an error rather than a warning.
    ``anchor_tokenizer``: the anchor's, when the caller has loaded it already."""
    if anchor_tokenizer is None:
        anchor_tokenizer = load_anchor_tokenizer(anchor_spec, override)
    augments, sources = [], []
    for i, spec in enumerate(augment_specs):
        source = spec.tokenizer or spec.name_or_path
        try:
            augments.append(load_tokenizer(source, spec, f"augmenting model {i}'s tokenizer"))
            sources.append(source)
        except ModelLoadError:
            if i < len(required) and required[i]:
                raise
            logger.warning(
                "augmenting model %d (%s) ships no tokenizer: it reads the anchor's ids", i, source
            )
            augments.append(None)
            sources.append(spec.tokenizer)
    return Tokenizers(anchor_tokenizer, anchor_tokenizer_source(anchor_spec, override), augments, sources)


def plan_reading(
    anchor_tokenizer,
    augment_tokenizers: Sequence,
    names: Sequence[str],
    token_paths: Sequence[str],
    mask_mode: str,
    texts: Sequence[str] = (),
) -> ReadPlan | None:
    """How each augmenting model reads text (``alignment.plan_alignment``, ``token_paths`` as
    requested per augment, ``texts`` joining the probe texts; in causal mode a tokenizer comm
    cannot follow is refused there): None when every one reads the anchor's token ids (the plain
    path), else the readers that line their tokens up."""
    readers = plan_alignment(anchor_tokenizer, augment_tokenizers, names, texts, token_paths, mask_mode)
    if not any(reader is not None for reader in readers):
        return None
    return ReadPlan(TokenReader(anchor_tokenizer, "the anchor", settle=False), readers, mask_mode)
