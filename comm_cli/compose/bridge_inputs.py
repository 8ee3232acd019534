"""What the bridges read during one forward pass of a composition, and how it is assembled.

Before the anchor runs, each augmenting model reads its tokens (or precomputed states stand in for
it), each bridge turns those states into cross-attention keys/values, and each augmenting model
gets a cross-attention mask and the rotary positions of the anchor queries. The result is an
``ActiveBridges``, which the hooks on the connected anchor layers read while the anchor runs.

Two ways to read text (docs/design.md, "Any pair of models"; the rule in docs/alignment.md):

- shared: the augmenting model reads the anchor's token ids, so the masks go by column
  (``masks.cross_attention_mask``); in prompt mode it reads only the prompt columns;
- aligned: it reads its own tokens, and anchor token i reads augment token j once j is final by
  the end of i's text (``masks.aligned_mask``, ``comm_cli.compose.alignment``).

When decoding, a ``CompositionCache`` carries everything across steps: the models' KV caches,
the bridges' keys/values so far, and the masks' history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from comm_cli.compose.masks import (
    CrossAttentionMask,
    aligned_mask,
    cross_attention_mask,
    positions_from_mask,
)
from comm_cli.errors import TokenizerMismatchError

KeysValues = tuple[torch.Tensor, torch.Tensor]


@dataclass
class CompositionCache:
    """Decoding state: the anchor's and each augment's own KV cache, the bridges' cross-attention
    keys/values over the augment positions seen so far, and per augment which of those positions
    are real (``key_valid``) and, for an augment with its own tokenizer, the augment's attention
    mask so far and when each of its tokens was final (``key_settled``). ``anchor_ends`` holds the
    character ends of the anchor tokens seen so far (aligned augments only)."""

    anchor: object
    augments: list[object | None]
    bridge_kv: list[KeysValues | None]
    key_valid: list[torch.Tensor | None] = field(default_factory=list)
    key_settled: list[torch.Tensor | None] = field(default_factory=list)
    key_positions: list[torch.Tensor | None] = field(default_factory=list)
    anchor_ends: torch.Tensor | None = None
    anchor_real: torch.Tensor | None = None
    seen: int = 0


@dataclass
class ActiveBridges:
    """What the anchor-layer hooks read during one forward pass: keys/values per bridge, and per
    augmenting model its cross-attention mask and the rotary positions of the anchor queries."""

    kv: list[KeysValues | None]
    masks: list[CrossAttentionMask]
    query_positions: list[torch.Tensor]
    masks_by_device: dict = field(default_factory=dict)

    def mask_on(self, augment: int, device: torch.device) -> CrossAttentionMask:
        key = (augment, device)
        if key not in self.masks_by_device:
            self.masks_by_device[key] = self.masks[augment].to(device)
        return self.masks_by_device[key]

    def bridge_output(self, bridges, connections, bridge_indices, hidden: torch.Tensor):
        """The sum of the outputs of the bridges ``bridge_indices`` (all at one anchor layer) for
        that layer's output ``hidden``; None when none of them has a key yet."""
        delta = None
        for i in bridge_indices:
            if self.kv[i] is None:  # no augment token in the whole batch yet
                continue
            augment = connections[i][0]
            mask = self.mask_on(augment, hidden.device)
            keys, values = self.kv[i]
            out = bridges[i](
                hidden,
                keys,
                values,
                self.query_positions[augment],
                attn_mask=mask.attn_mask,
                is_causal=mask.is_causal,
                query_valid=mask.query_valid,
            )
            delta = out if delta is None else delta + out
        return delta


class BridgeInputs:
    """The inputs of one forward pass as the bridges need them, assembled by ``assemble()``.

    ``model`` is the ComposedModel; read from it: ``augments`` (their number), ``bridges``,
    ``bridge_connections``, ``mask_mode``, ``config.bridge.aligned_positions`` and
    ``augment_states`` (which runs an augmenting model). The other arguments are
    ``ComposedModel.forward``'s (``attention_mask`` covers the cached columns and the new ones;
    ``position_ids`` the new ones; ``full_positions`` all)."""

    def __init__(
        self,
        model,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        full_positions: torch.Tensor,
        augment_attention_mask: torch.Tensor | None,
        cache: CompositionCache | None,
        augment_states: Sequence[dict[int, torch.Tensor] | None] | None,
        anchor_ends: torch.Tensor | None,
        augment_inputs: Sequence[dict[str, torch.Tensor] | None] | None,
    ):
        count = len(model.augments)
        self.model = model
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.position_ids = position_ids
        self.full_positions = full_positions
        self.augment_attention_mask = augment_attention_mask
        self.cache = cache
        self.states_given = list(augment_states) if augment_states is not None else [None] * count
        self.anchor_ends = anchor_ends
        self.augment_inputs = list(augment_inputs) if augment_inputs is not None else [None] * count
        if len(self.augment_inputs) != count:
            raise ValueError(
                f"augment_inputs has {len(self.augment_inputs)} entries for {count} augmenting models"
            )
        readers = getattr(model, "augment_readers", [None] * count)
        for k, reader in enumerate(readers):
            if reader is not None and self.augment_inputs[k] is None and self.states_given[k] is None:
                raise TokenizerMismatchError(
                    f"{reader.name} reads its own tokenizer's tokens, but this forward gave it only the anchor's ids: "
                    "build the inputs from text with batch = model.encode(texts[, completions]) and call "
                    "model(**batch), or generate with model.generate(prompts=[...])"
                )
        self.kv: dict[int, KeysValues] = {}  # filled per bridge as the augmenting models are read

    def assemble(self) -> ActiveBridges:
        count = len(self.augment_inputs)
        masks: list[CrossAttentionMask | None] = [None] * count
        query_positions: list[torch.Tensor | None] = [None] * count
        shared = [k for k in range(count) if self.augment_inputs[k] is None]
        if shared:
            shared_mask = self.shared(shared)
            for k in shared:
                masks[k], query_positions[k] = shared_mask, self.position_ids
        if len(shared) < count:
            ends_all, real_all = self._anchor_ends_so_far()
            for k in range(count):
                if self.augment_inputs[k] is not None:
                    masks[k], query_positions[k] = self.aligned(k, self.augment_inputs[k], ends_all, real_all)
        return ActiveBridges(
            kv=[self.kv.get(i) for i in range(len(self.model.bridges))],
            masks=masks,
            query_positions=query_positions,
        )

    # ------------------------------------------------------------------ shared tokens

    def shared(self, indices: list[int]) -> CrossAttentionMask:
        """Augmenting models that read the anchor's own tokens: masks by column."""
        cache, ids, mask = self.cache, self.input_ids, self.attention_mask
        past = cache.seen if cache is not None else 0
        if self.model.mask_mode == "causal":
            for k in indices:
                self._add_keys_values(k, self._states(k, ids, mask, self.position_ids), self.position_ids)
            key_valid = mask
        elif cache is not None and cache.key_valid[indices[0]] is not None:
            key_valid = cache.key_valid[indices[0]]
            self._add_cached_keys_values(indices)
        else:
            if past != 0:
                raise ValueError("prompt mode: the first cached forward must contain the prompt")
            prompt_mask = mask if self.augment_attention_mask is None else self.augment_attention_mask
            if prompt_mask.shape != ids.shape:
                raise ValueError(
                    f"augment_attention_mask has shape {tuple(prompt_mask.shape)}, expected {tuple(ids.shape)}"
                )
            prompt_columns = prompt_mask.bool().any(0).nonzero()
            end = int(prompt_columns.max()) + 1 if len(prompt_columns) else 1
            key_valid = prompt_mask[:, :end]
            positions = self.full_positions[:, :end]
            for k in indices:
                self._add_keys_values(k, self._states(k, ids[:, :end], key_valid, positions), positions)
                if cache is not None:
                    cache.key_valid[k] = key_valid
        return cross_attention_mask(key_valid, ids.shape[1], past, self.model.mask_mode)

    def _states(self, k: int, ids, mask, positions) -> dict[int, torch.Tensor]:
        """Augment ``k``'s connected-layer states over ``ids``: given, or computed now."""
        if self.states_given[k] is not None:
            # precomputed states may be padded past the key columns (prompt mode)
            return {layer: v[:, : ids.shape[1]] for layer, v in self.states_given[k].items()}
        vocab = self.model.augments[k].get_input_embeddings().num_embeddings
        first = self.cache is None or self.cache.seen == 0  # later decoding steps: no sync per token
        if first and ids.numel() and int(ids.max()) >= vocab:
            raise TokenizerMismatchError(
                f"augmenting model {k} got token id {int(ids.max())}, past its vocabulary of {vocab}: it reads "
                "text through another tokenizer than the anchor's. Attach both with model.use_tokenizers(anchor_tokenizer, "
                "[augment_tokenizer]) and build inputs with model.encode(texts)"
            )
        own_cache = self.cache.augments[k] if self.cache is not None else None
        return self.model.augment_states(k, ids, mask, positions, own_cache)

    # ------------------------------------------------------------------ own tokens

    def _anchor_ends_so_far(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Character ends of the anchor tokens seen so far and which of them are real tokens."""
        if self.anchor_ends is None:
            raise ValueError(
                "an augmenting model with its own tokenizer needs anchor_ends (character end of each anchor token)"
            )
        cache = self.cache
        ends_all, real_all = self.anchor_ends, self.attention_mask[:, -self.input_ids.shape[1] :].bool()
        if cache is not None:
            if cache.anchor_ends is not None:
                ends_all = torch.cat([cache.anchor_ends, ends_all], 1)
            if cache.anchor_real is not None:
                real_all = torch.cat([cache.anchor_real, real_all], 1)
            cache.anchor_ends, cache.anchor_real = ends_all, real_all
        return ends_all, real_all

    def aligned(self, k: int, inputs: dict[str, torch.Tensor], ends_all, real_all):
        """Augment ``k`` with its own tokenizer: it reads its own tokens, and anchor token i
        reads augment token j once j is final by the end of i's text (alignment.py). Returns
        its mask and the rotary positions of the anchor queries."""
        cache, mode = self.cache, self.model.mask_mode
        ids, new_mask = inputs["input_ids"], inputs["attention_mask"]
        scale = self.model.config.bridge.aligned_positions
        if mode == "prompt" and cache is not None and cache.key_valid[k] is not None:
            key_valid, key_settled = cache.key_valid[k], cache.key_settled[k]
            self._add_cached_keys_values([k])
        else:
            old_mask = cache.key_valid[k] if cache is not None else None
            key_valid = new_mask if old_mask is None else torch.cat([old_mask, new_mask], 1)
            settled = inputs.get("settled_at")
            if mode == "causal" and settled is None:
                raise ValueError(f"augment_inputs[{k}] needs settled_at in causal mode")
            old_settled = cache.key_settled[k] if cache is not None else None
            key_settled = (
                settled if old_settled is None or settled is None else torch.cat([old_settled, settled], 1)
            )
            if ids.shape[1] > 0:
                past = key_valid.shape[1] - ids.shape[1]
                positions = positions_from_mask(key_valid)[:, past:]
                states = self._states(k, ids, key_valid, positions)
                self._add_keys_values(k, states, _key_positions(scale, inputs, settled, ends_all, real_all))
            elif (
                cache is not None
            ):  # no new token: the keys so far (None: none yet, the bridges read nothing)
                self._add_cached_keys_values([k])
            if cache is not None:
                cache.key_valid[k], cache.key_settled[k] = key_valid, key_settled
        mask = aligned_mask(key_valid, key_settled, self.anchor_ends, mode)
        return mask, (self.anchor_ends if scale == "chars" else self.position_ids)

    # ------------------------------------------------------------------ keys and values

    def _add_keys_values(self, k: int, states: dict[int, torch.Tensor], positions: torch.Tensor) -> None:
        """Keys/values of the bridges fed by augment ``k`` over its new ``states``, appended to
        the cached ones when decoding."""
        new = {
            i: self.model.bridges[i].keys_values(states[a], positions)
            for i, (index, a, _) in enumerate(self.model.bridge_connections)
            if index == k
        }
        cache = self.cache
        if cache is None:
            self.kv.update(new)
            return
        for i, (keys, values) in new.items():
            old = cache.bridge_kv[i]
            cache.bridge_kv[i] = (
                (keys, values)
                if old is None
                else (torch.cat([old[0], keys], 2), torch.cat([old[1], values], 2))
            )
        self.kv.update({i: cache.bridge_kv[i] for i in new})

    def _add_cached_keys_values(self, indices: list[int]) -> None:
        """The cached keys/values of the bridges fed by the augments ``indices`` (nothing new)."""
        connections = self.model.bridge_connections
        self.kv.update({i: self.cache.bridge_kv[i] for i, c in enumerate(connections) if c[0] in indices})


def _key_positions(scale: str, inputs, settled, ends_all, real_all) -> torch.Tensor:
    """Rotary positions of augment keys on the anchor queries' scale: the character end of the
    token ("chars"), or the index of the first anchor token that may read it ("anchor_tokens")."""
    if scale == "chars":
        return inputs["ends"]
    if settled is None:  # prompt mode: every anchor token reads every key
        return torch.zeros_like(inputs["input_ids"])
    earlier = (ends_all[:, None, :] < settled[:, :, None]) & real_all[:, None, :]
    return earlier.sum(-1)
