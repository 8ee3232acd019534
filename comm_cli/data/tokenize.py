"""Turn prompt/completion or plain-text rows into ``input_ids``, ``labels`` and ``prompt_mask``.

- "prompt_completion": ``[bos] + prompt + completion + [eos]``. Prompt and completion are
  tokenised separately and concatenated, so the boundary between them is exact (a joint
  tokenisation can merge the last prompt characters with the first completion ones) and the
  prompt ids are the ones generation will see when it tokenises the prompt alone. ``labels`` are
  -100 on bos and prompt, so the loss is on the completion (and eos, which teaches stopping).
- "text": ``[bos] + text + [eos]`` with ``labels == input_ids``.

``prompt_mask`` is 1 on bos and prompt tokens (all tokens for "text"): in CALM's "prompt" mask
mode the augmenting models read only these, exactly as at generation time, when the prompt
(bos included) is all there is.

``labels`` are aligned with ``input_ids``; the composition shifts them inside its loss, so the
label at position 0 never counts.

Over-long examples are cut on the right to ``max_length`` and *counted*: the count is returned in
``TokenizeStats`` and logged as a warning, never silently applied. Examples left without a single
token that carries loss (completion cut away entirely, or an empty text) are dropped and counted.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from comm_cli.compose.alignment import ReadPlan
from comm_cli.compose.encoding import ALIGNED_FIELDS, encode_example
from comm_cli.data.loading import DataConfig, ensure_text_fields, text_fields
from comm_cli.errors import DataError

logger = logging.getLogger(__name__)

COLUMNS = ("input_ids", "labels", "prompt_mask")
_TRUNCATED = "_comm_truncated"
_KEEP = "_comm_keep"


@dataclass(frozen=True)
class TokenizeStats:
    """What tokenisation did to a split, so the caller can report or assert on it.

    ``num_truncated`` counts examples longer than ``max_length`` (cut on the right), whether kept or
    not; ``num_dropped`` counts examples removed because no token carried loss after truncation
    (completion cut away) or the example was empty.
    """

    num_examples: int
    num_kept: int
    num_truncated: int
    num_dropped: int
    max_length: int


def tokenize_split(
    dataset: datasets.Dataset,
    tokenizer: Any,
    cfg: DataConfig,
    *,
    split_name: str = "train",
    plan: ReadPlan | None = None,
) -> tuple[datasets.Dataset, TokenizeStats]:
    """Tokenise ``dataset`` per ``cfg.format``; return the tokenised split and its ``TokenizeStats``.

    The result has the columns ``input_ids``, ``labels`` and ``prompt_mask`` (lists of ints,
    unpadded; ``CompletionCollator`` pads them). With a ``plan`` in which augmenting models read
    their own tokens, it also has ``anchor_ends`` (character end of each anchor token) and, per
    such augment k, ``augment{k}_input_ids``, ``augment{k}_settled_at`` and ``augment{k}_ends``
    (see ``comm_cli.compose.alignment``). ``split_name`` only labels the log messages. The stats
    come from per-row columns rather than counters in the map function, so they stay right when
    ``datasets`` serves the map from its cache.
    """
    fields = text_fields(cfg)
    if cfg.max_length < 2:
        raise DataError(f"data.max_length={cfg.max_length} leaves nothing to predict; use at least 2 tokens")
    dataset = ensure_text_fields(dataset, fields, f"the {split_name!r} split")
    bos = tokenizer.bos_token_id if cfg.add_bos else None
    eos = None
    if cfg.add_eos:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError(
                "data.add_eos is set but the tokenizer has no eos token; give it one or set data.add_eos=false"
            )

    function = functools.partial(
        _tokenize_batch,
        tokenizer=tokenizer,
        fields=fields,
        text_format=cfg.format == "text",
        bos=bos,
        eos=eos,
        max_length=cfg.max_length,
        plan=plan if plan is not None and plan.aligned_indices else None,
    )
    tokenized = dataset.map(
        function,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        desc=f"Tokenizing {split_name}",
    )
    num_examples = len(tokenized)
    num_truncated = sum(tokenized[_TRUNCATED])
    kept = tokenized.filter(
        _keep_flags, batched=True, input_columns=[_KEEP], desc=f"Dropping {split_name} examples without loss"
    )
    kept = kept.remove_columns([_TRUNCATED, _KEEP])
    stats = TokenizeStats(
        num_examples=num_examples,
        num_kept=len(kept),
        num_truncated=num_truncated,
        num_dropped=num_examples - len(kept),
        max_length=cfg.max_length,
    )

    if stats.num_truncated:
        logger.warning(
            "%s: %d of %d examples are longer than data.max_length=%d tokens and were truncated on the right; "
            "raise data.max_length to keep them whole",
            split_name,
            stats.num_truncated,
            stats.num_examples,
            stats.max_length,
        )
    if stats.num_dropped:
        logger.warning(
            "%s: dropped %d of %d examples that carry no loss (completion truncated away at data.max_length=%d, "
            "or empty)",
            split_name,
            stats.num_dropped,
            stats.num_examples,
            stats.max_length,
        )
    if stats.num_kept == 0:
        raise DataError(
            f"no {split_name} example is left after tokenisation ({stats.num_dropped} dropped as empty or "
            f"truncated away); raise data.max_length={cfg.max_length} or check the data fields"
        )
    return kept, stats


def _keep_flags(flags: list[bool]) -> list[bool]:
    return flags


def _texts(batch: dict[str, list], field: str, indices: Sequence[int]) -> list[str]:
    values = batch[field]
    for value, index in zip(values, indices):
        if not isinstance(value, str):
            what = "missing (null)" if value is None else f"a {type(value).__name__}, not text"
            raise DataError(f"row {index}: field {field!r} is {what}; fix or remove that row")
    return values


def _tokenize_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    tokenizer: Any,
    fields: list[str],
    text_format: bool,
    bos: int | None,
    eos: int | None,
    max_length: int,
    plan: ReadPlan | None = None,
) -> dict[str, list]:
    def encode(field: str) -> list[list[int]]:
        texts = _texts(batch, field, indices)
        return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    if text_format:
        bodies = encode(fields[0])
        prompts: list[list[int]] = [[] for _ in bodies]
    else:
        prompts, bodies = encode(fields[0]), encode(fields[1])
    segments = [[t] for t in _texts(batch, fields[0], indices)]
    if not text_format:
        segments = [[p, c] for (p,), c in zip(segments, _texts(batch, fields[1], indices))]

    out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_mask": [], _TRUNCATED: [], _KEEP: []}
    if plan is not None:
        out["anchor_ends"] = []
        for k in plan.aligned_indices:
            out.update({f"augment{k}_{name}": [] for name in ALIGNED_FIELDS})
    for prompt, body, texts in zip(prompts, bodies, segments):
        example = encode_example(
            prompt, body, texts, text_format=text_format, bos=bos, eos=eos, max_length=max_length, plan=plan
        )
        out[_TRUNCATED].append(example.pop("truncated"))
        out[_KEEP].append(example.pop("has_loss") and not (text_format and len(body) == 0))
        for key, value in example.items():
            out[key].append(value)
    return out
