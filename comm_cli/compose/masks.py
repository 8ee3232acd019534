"""Cross-attention masks: which augment positions each anchor position may read.

Anchor and augmenting models read the same tokens in the same padded layout, so "augment
position <= anchor position" is a comparison of column indices; it holds for left and right
padding alike, and padding columns are never attended.

- causal (default): anchor column i sees augment columns j <= i that are real tokens. This is
  what keeps the next token from leaking through the augmenting model during training.
- prompt: every anchor column sees every real prompt column (the augment read only the prompt).

A query with no key at all (a left-padding column) would give NaN in softmax; it is allowed to
attend anywhere and its output is zeroed through ``query_valid``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CrossAttentionMask:
    attn_mask: torch.Tensor | None  # bool (batch, 1, queries, keys); None: attend everywhere / is_causal
    is_causal: bool
    query_valid: torch.Tensor | None  # bool (batch, queries); None: every query has a key

    def to(self, device: torch.device) -> CrossAttentionMask:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return CrossAttentionMask(move(self.attn_mask), self.is_causal, move(self.query_valid))


def cross_attention_mask(
    key_valid: torch.Tensor, num_queries: int, query_offset: int, mode: str
) -> CrossAttentionMask:
    """Mask for ``num_queries`` anchor columns starting at ``query_offset`` over the augment
    columns 0..K-1 whose validity is ``key_valid`` (batch, K)."""
    key_valid = key_valid.bool()
    batch, num_keys = key_valid.shape
    if mode == "causal" and num_queries == 1 and query_offset == num_keys - 1:
        # One decoding step: every key column is at or before the query's, so only padding is
        # masked. Built without reading values back to the host (no device sync per token).
        own = key_valid[:, -1]
        allowed = key_valid[:, None, None, :] | ~own[:, None, None, None]
        return CrossAttentionMask(allowed, False, own[:, None])
    all_keys_valid = bool(key_valid.all())
    if mode == "causal":
        if all_keys_valid and query_offset == 0 and num_queries == num_keys:
            return CrossAttentionMask(None, True, None)
        q_cols = torch.arange(query_offset, query_offset + num_queries, device=key_valid.device)
        k_cols = torch.arange(num_keys, device=key_valid.device)
        allowed = key_valid[:, None, :] & (k_cols[None, None, :] <= q_cols[None, :, None])
    elif mode == "prompt":
        if all_keys_valid:
            return CrossAttentionMask(None, False, None)
        allowed = key_valid[:, None, :].expand(batch, num_queries, num_keys)
    else:
        raise ValueError(f"unknown mask mode {mode!r}")
    return _with_empty_rows_filled(allowed)


def _with_empty_rows_filled(allowed: torch.Tensor) -> CrossAttentionMask:
    """The mask of ``allowed`` [batch, queries, keys]; a query with no key to read is let read
    every key (keeps softmax finite) and marked in ``query_valid`` so its output is zeroed."""
    has_key = allowed.any(dim=-1)
    if bool(has_key.all()):
        return CrossAttentionMask(allowed[:, None], False, None)
    allowed = allowed | ~has_key[..., None]
    return CrossAttentionMask(allowed[:, None], False, has_key)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens (0 for padding), as generation does, so a
    left-padded row gets the same positions as the unpadded sequence."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


def aligned_mask(
    key_valid: torch.Tensor, key_settled: torch.Tensor | None, query_ends: torch.Tensor | None, mode: str
) -> CrossAttentionMask:
    """Mask for an augmenting model with its own tokenizer (see ``comm_cli.compose.alignment``).

    causal: anchor query i reads augment key j when j is a real token and it is final by the
    end of query i's text (``key_settled[b, j] <= query_ends[b, i]``); both are character
    positions, so the comparison is the same whatever the padding. prompt: every query reads
    every real key (the augment read the prompt only).
    """
    key_valid = key_valid.bool()
    if mode == "causal":
        allowed = key_valid[:, None, :] & (key_settled[:, None, :] <= query_ends[:, :, None])
    elif mode == "prompt":
        if bool(key_valid.all()):
            return CrossAttentionMask(None, False, None)
        num_queries = query_ends.shape[1]
        allowed = key_valid[:, None, :].expand(key_valid.shape[0], num_queries, key_valid.shape[1])
    else:
        raise ValueError(f"unknown mask mode {mode!r}")
    return _with_empty_rows_filled(allowed)
