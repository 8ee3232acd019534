"""ComposedModel: a frozen anchor LM joined to frozen augmenting LMs by trainable bridges.

How a forward pass runs:

1. Each augmenting model reads the tokens (no autograd) and stops after its last connected
   layer: its later layers are removed when the composition is built and its LM head is not
   kept, so neither is ever computed. Forward hooks on its connected layers capture their outputs.
2. Each bridge turns its augment states into cross-attention keys/values.
3. The anchor runs as usual; a forward hook on each connected anchor layer adds the bridges'
   cross-attention output to that layer's output, which the next anchor layer reads.

The anchor's module tree is untouched (hooks, not wrappers), so with the bridges switched off
the logits are the plain anchor's, bit for bit.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from comm_cli.compose.blocks import (
    encoder_in_causal_mode,
    find_blocks,
    hidden_size,
    is_encoder,
    num_layers,
    takes_position_ids,
    truncate_blocks,
)
from comm_cli.compose.bridge import Bridge
from comm_cli.compose.loading import (
    canonical_name,
    dtype_name,
    load_augment_model,
    load_causal_lm,
    load_model_config,
    torch_dtype,
)
from comm_cli.compose.mapping import resolve_connections
from comm_cli.compose.masks import (
    CrossAttentionMask,
    aligned_mask,
    cross_attention_mask,
    positions_from_mask,
)
from comm_cli.compose.specs import AugmentSpec, BridgeConfig, CompositionConfig, MappingSpec, ModelSpec
from comm_cli.errors import ConfigError
from comm_cli.losses import (
    hidden_states_loss,
    kept_logits_loss,
    loss_mask,
    loss_targets,
    next_token_loss,
)
from comm_cli.output_head import keeps_loss_logits, output_head

logger = logging.getLogger(__name__)


@dataclass
class CompositionOutput:
    logits: torch.Tensor | None  # None when the loss was computed without logits (return_logits=False)
    loss: torch.Tensor | None = None
    cache: CompositionCache | None = None


@dataclass
class CompositionCache:
    """Decoding state: the anchor's and each augment's own KV cache, the bridges' cross-attention
    keys/values over the augment positions seen so far, and per augment which of those positions
    are real (``key_valid``) and, for an augment with its own tokenizer, the augment's attention
    mask so far and when each of its tokens was final (``key_settled``). ``anchor_ends`` holds the
    character ends of the anchor tokens seen so far (aligned augments only)."""

    anchor: object
    augments: list[object | None]
    bridge_kv: list[tuple[torch.Tensor, torch.Tensor] | None]
    key_valid: list[torch.Tensor | None] = field(default_factory=list)
    key_settled: list[torch.Tensor | None] = field(default_factory=list)
    key_positions: list[torch.Tensor | None] = field(default_factory=list)
    anchor_ends: torch.Tensor | None = None
    anchor_real: torch.Tensor | None = None
    seen: int = 0


@dataclass
class _ActiveBridges:
    """What the anchor-layer hooks read during one forward pass: keys/values per bridge, and per
    augmenting model its cross-attention mask and the rotary positions of the anchor queries."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    masks: list[CrossAttentionMask]
    query_positions: list[torch.Tensor]
    masks_by_device: dict = field(default_factory=dict)

    def mask_on(self, augment: int, device: torch.device) -> CrossAttentionMask:
        key = (augment, device)
        if key not in self.masks_by_device:
            self.masks_by_device[key] = self.masks[augment].to(device)
        return self.masks_by_device[key]


def cache_kwarg(model: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache``; use whichever this version takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class ComposedModel(nn.Module):
    """A CALM composition. Build it with ``from_config`` (loads the bases), ``from_models``
    (bases already in memory) or ``from_pretrained`` (a saved composition).

    Building takes ownership of the augmenting models: their decoder layers past the last
    connected one are removed in place and only their base (no LM head) is kept.
    """

    def __init__(self, anchor: nn.Module, augments: Sequence[nn.Module], config: CompositionConfig):
        super().__init__()
        self.config = config
        self.mask_mode = config.mask_mode
        self.anchor = anchor
        anchor_blocks = find_blocks(anchor, config.anchor.block_path)
        # A plain list, not a registered submodule: registered, the anchor's layers would appear
        # twice in state_dict() (as anchor.* and _anchor_layers.*), and tools that drop frozen
        # weights by parameter name (DeepSpeed's exclude_frozen_parameters, DCP's
        # ignore_frozen_params) would keep the second copy.
        self._anchor_layers = list(anchor_blocks.layers)
        anchor_depth = len(anchor_blocks.layers)
        anchor_dim = hidden_size(anchor.config)
        self._anchor_cache_kw = cache_kwarg(anchor)

        if len(augments) != len(config.augments):
            raise ConfigError(
                f"{len(augments)} augmenting models given for {len(config.augments)} augment specs"
            )
        self.augments = nn.ModuleList()
        self.bridges = nn.ModuleList()
        self._augment_cache_kw: list[str] = []
        self._augment_configs = []
        self._is_encoder: list[bool] = []
        self._augment_takes_positions: list[bool] = []
        # Per augmenting model: None when it reads the anchor's tokens, else the TokenReaders
        # that align its tokenizer to the anchor's (see use_tokenizers).
        self.anchor_tokenizer = None
        self.anchor_reader = None
        self.augment_readers: list = [None] * len(config.augments)
        self._capture_layers: list[list[int]] = []
        self.bridge_connections: list[
            tuple[int, int, int]
        ] = []  # (augment index, augment layer, anchor layer)
        bridge_dtype = torch_dtype(config.bridge.dtype)
        for index, (augment, spec) in enumerate(zip(augments, config.augments)):
            blocks = find_blocks(augment, spec.model.block_path)
            # Saved connections (from a loaded composition) win over the mapping they came from.
            mapping = MappingSpec(pairs=spec.connections) if spec.connections else spec.mapping
            connections = resolve_connections(
                mapping, len(blocks.layers), anchor_depth, name=f"augment {index} ({spec.model.name_or_path})"
            )
            spec.connections = [list(c) for c in connections]
            augment_dim = hidden_size(augment.config)
            self._augment_configs.append(augment.config)
            encoder = is_encoder(augment.config)
            if encoder and config.mask_mode == "causal":
                raise ConfigError(encoder_in_causal_mode(index, spec.model.name_or_path))
            self._is_encoder.append(encoder)
            last = max(a for a, _ in connections)
            truncate_blocks(blocks, last + 1)
            base = augment.base_model
            self.augments.append(base)
            self._augment_cache_kw.append(cache_kwarg(base))
            self._augment_takes_positions.append(takes_position_ids(base))
            layers = sorted({a for a, _ in connections})
            self._capture_layers.append(layers)
            for layer in layers:
                blocks.layers[layer].register_forward_hook(self._capture_hook(index, layer))
            for a, b in connections:
                device = _model_device(anchor_blocks.layers[b])
                bridge = Bridge(augment_dim, anchor_dim, config.bridge).to(device=device, dtype=bridge_dtype)
                self.bridges.append(bridge)
                self.bridge_connections.append((index, a, b))

        self._bridges_at: dict[int, list[int]] = {}
        for bridge_index, (_, _, b) in enumerate(self.bridge_connections):
            self._bridges_at.setdefault(b, []).append(bridge_index)
        for b in self._bridges_at:
            anchor_blocks.layers[b].register_forward_hook(self._anchor_hook(b))

        self._bridges_enabled = True
        self._active: _ActiveBridges | None = None
        self._captured: dict[tuple[int, int], torch.Tensor] | None = None
        self.freeze_bases()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_models(
        cls,
        anchor: nn.Module,
        augments: nn.Module | Sequence[nn.Module],
        mappings: MappingSpec | Sequence[MappingSpec] | Sequence[Sequence[int]] | None = None,
        bridge: BridgeConfig | None = None,
        mask_mode: str = "causal",
        anchor_spec: ModelSpec | None = None,
        augment_specs: Sequence[ModelSpec] | None = None,
    ) -> ComposedModel:
        """Compose models already in memory. ``mappings`` is one MappingSpec per augment (or one
        for all, or a list of [augment_layer, anchor_layer] pairs); default: every layer pair."""
        augments = [augments] if isinstance(augments, nn.Module) else list(augments)
        if mappings is None:
            mappings = [
                MappingSpec(count=min(num_layers(a.config) for a in [anchor, aug])) for aug in augments
            ]
        elif isinstance(mappings, MappingSpec):
            mappings = [mappings] * len(augments)
        elif len(mappings) > 0 and not isinstance(mappings[0], MappingSpec):
            mappings = [MappingSpec(pairs=[list(p) for p in mappings])] * len(augments)
        config = CompositionConfig(
            anchor=anchor_spec or _spec_of(anchor),
            augments=[
                AugmentSpec(model=(augment_specs[i] if augment_specs else _spec_of(aug)), mapping=mappings[i])
                for i, aug in enumerate(augments)
            ],
            bridge=bridge or BridgeConfig(),
            mask_mode=mask_mode,
        )
        return cls(anchor, augments, config)

    @classmethod
    def from_config(
        cls, config: CompositionConfig, device: str | torch.device | None = None
    ) -> ComposedModel:
        """Load the base models named by ``config`` and attach fresh bridges. The mapping and
        head count are checked against the model configs before any weights load."""
        check_config(config)
        anchor = load_causal_lm(config.anchor, "anchor model", device)
        augments = [
            load_augment_model(spec.model, f"augmenting model {i}", device)
            for i, spec in enumerate(config.augments)
        ]
        return cls(anchor, augments, config)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        anchor: nn.Module | None = None,
        augments: Sequence[nn.Module] | None = None,
        device: str | torch.device | None = None,
    ) -> ComposedModel:
        """Load a composition saved by ``save_pretrained``: the bases it names (unless given) and
        its bridge weights. Nothing is unpickled."""
        from comm_cli.compose.saving import load_composition

        return load_composition(cls, directory, anchor=anchor, augments=augments, device=device)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the bridge weights (safetensors) and the composition config (JSON)."""
        from comm_cli.compose.saving import save_composition

        return save_composition(self, directory)

    # ------------------------------------------------------------------ tokenizers

    def use_tokenizers(
        self, anchor_tokenizer, augment_tokenizers: Sequence, texts: Sequence[str] = ()
    ) -> None:
        """Attach the models' tokenizers and decide, per augmenting model, whether it reads the
        anchor's token ids (same tokenizer) or its own tokens lined up through characters
        (``comm_cli.compose.alignment``). ``texts`` (e.g. a sample of the data) join the probe
        texts the tokenizers are compared on. In causal mode an augment tokenizer that comm cannot
        follow character by character is refused in one line; one whose settle rule is not argued
        for its components is checked on ``texts`` (and on every text it reads later). The
        decision is logged and recorded in the config."""
        from comm_cli.compose.alignment import TokenReader, plan_alignment

        names = [f"augment {i} ({spec.model.name_or_path})" for i, spec in enumerate(self.config.augments)]
        requested = [s.tokens for s in self.config.augments]
        readers = plan_alignment(
            anchor_tokenizer, augment_tokenizers, names, texts, requested, self.mask_mode
        )
        anchor_reader = TokenReader(anchor_tokenizer, "the anchor", settle=False) if any(readers) else None
        self.set_readers(anchor_tokenizer, anchor_reader, readers)

    def attach_saved_tokenizers(self) -> None:
        """Load each model's tokenizer from where its spec says (``tokenizer``, else the model's
        own directory or id) and attach them (``use_tokenizers``). An augmenting model that ships
        no tokenizer is taken to share the anchor's; the sources are recorded in the config."""
        from comm_cli.compose.loading import load_tokenizer
        from comm_cli.errors import ModelLoadError

        anchor_spec = self.config.anchor
        anchor_spec.tokenizer = anchor_spec.tokenizer or anchor_spec.name_or_path
        anchor_tokenizer = load_tokenizer(anchor_spec.tokenizer, anchor_spec, "anchor model's tokenizer")
        augment_tokenizers = []
        for i, spec in enumerate(self.config.augments):
            source = spec.model.tokenizer or spec.model.name_or_path
            try:
                augment_tokenizers.append(
                    load_tokenizer(source, spec.model, f"augmenting model {i}'s tokenizer")
                )
                spec.model.tokenizer = source
            except ModelLoadError:
                if spec.tokens == "aligned":
                    raise
                logger.warning(
                    "augmenting model %d (%s) ships no tokenizer: it reads the anchor's ids", i, source
                )
                augment_tokenizers.append(None)
        self.use_tokenizers(anchor_tokenizer, augment_tokenizers)

    def set_readers(self, anchor_tokenizer, anchor_reader, augment_readers: Sequence) -> None:
        """Attach already-decided readers (``comm_cli.compose.alignment.plan_alignment``)."""
        for spec, reader in zip(self.config.augments, augment_readers):
            if reader is not None and self.mask_mode == "causal" and reader.rule == "none":
                raise ConfigError(f"{reader.name}: its reader has no settle rule, which causal mode needs")
            spec.tokens = "aligned" if reader is not None else "shared"
        self.anchor_tokenizer = anchor_tokenizer
        self.anchor_reader = anchor_reader
        self.augment_readers = list(augment_readers)

    @property
    def aligned(self) -> bool:
        """Whether some augmenting model reads its own tokens."""
        return any(reader is not None for reader in self.augment_readers)

    def read_plan(self):
        """How the models read text (``comm_cli.compose.alignment.ReadPlan``; None: all read the
        anchor's ids), for building data the way this composition reads it."""
        from comm_cli.compose.alignment import ReadPlan

        if not self.aligned:
            return None
        return ReadPlan(self.anchor_reader, list(self.augment_readers), self.mask_mode)

    # ------------------------------------------------------------------ frozen bases

    def freeze_bases(self) -> None:
        for module in (self.anchor, self.augments):
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> ComposedModel:
        """Only the bridges change mode; the bases stay in eval mode (no dropout) always."""
        self.training = mode
        self.bridges.train(mode)
        self.anchor.eval()
        self.augments.eval()
        return self

    def bridge_parameters(self) -> Iterator[nn.Parameter]:
        return self.bridges.parameters()

    def parameter_counts(self) -> dict[str, int]:
        """Trainable (bridge) and frozen (base) parameter counts of what is held in memory."""
        return parameter_counts(self)

    @property
    def connected_anchor_layers(self) -> list[int]:
        """The anchor layers a bridge adds to, lowest first."""
        return sorted(self._bridges_at)

    def bridge_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trained weights, keyed ``bridges.<i>.<name>``."""
        return {f"bridges.{k}": v for k, v in self.bridges.state_dict().items()}

    def enable_gradient_checkpointing(self) -> None:
        """Recompute anchor decoder layers (from the lowest connected one up) during backward
        instead of storing their activations. Non-reentrant, so gradients still reach the bridge
        keys/values captured from outside the checkpointed function; the bridge hooks run outside
        the checkpoint."""
        lowest = min(self._bridges_at)
        for layer in list(self._anchor_layers)[lowest:]:
            if getattr(layer, "_comm_checkpointed", False):
                continue
            original = layer.forward

            def forward(*args, _original=original, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(_original, *args, use_reentrant=False, **kwargs)
                return _original(*args, **kwargs)

            layer.forward = forward
            layer._comm_checkpointed = True

    # ------------------------------------------------------------------ bridges on / off

    @contextlib.contextmanager
    def bridges_disabled(self) -> Iterator[ComposedModel]:
        """Within this block the model is the plain anchor (bit for bit)."""
        previous = self._bridges_enabled
        self._bridges_enabled = False
        try:
            yield self
        finally:
            self._bridges_enabled = previous

    def set_bridges_enabled(self, enabled: bool) -> None:
        self._bridges_enabled = enabled

    # ------------------------------------------------------------------ hooks

    def _capture_hook(self, augment_index: int, layer: int):
        def hook(module, args, output):
            if self._captured is not None:
                hidden = output[0] if isinstance(output, tuple) else output
                self._captured[(augment_index, layer)] = hidden

        return hook

    def _anchor_hook(self, anchor_layer: int):
        bridge_indices = self._bridges_at[anchor_layer]

        def hook(module, args, output):
            active = self._active
            if active is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            delta = None
            for i in bridge_indices:
                if active.kv[i] is None:  # no augment token in the whole batch yet
                    continue
                augment = self.bridge_connections[i][0]
                mask = active.mask_on(augment, hidden.device)
                keys, values = active.kv[i]
                out = self.bridges[i](
                    hidden,
                    keys,
                    values,
                    active.query_positions[augment],
                    attn_mask=mask.attn_mask,
                    is_causal=mask.is_causal,
                    query_valid=mask.query_valid,
                )
                delta = out if delta is None else delta + out
            if delta is None:
                return None
            hidden = hidden + delta
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    # ------------------------------------------------------------------ forward

    def new_cache(self) -> CompositionCache:
        from transformers import DynamicCache

        count = len(self.augments)
        return CompositionCache(
            anchor=DynamicCache(config=self.anchor.config),
            augments=[
                DynamicCache(config=cfg) if self.mask_mode == "causal" and not self._is_encoder[i] else None
                for i, cfg in enumerate(self._augment_configs)
            ],
            bridge_kv=[None] * len(self.bridges),
            key_valid=[None] * count,
            key_settled=[None] * count,
            key_positions=[None] * count,
        )

    @torch.no_grad()
    def augment_states(
        self,
        augment_index: int,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: object | None = None,
    ) -> dict[int, torch.Tensor]:
        """Outputs of the connected layers of one augmenting model (no autograd): {layer: (B, L, d)}."""
        base = self.augments[augment_index]
        device = _model_device(base)
        self._captured = {}
        try:
            kwargs = {self._augment_cache_kw[augment_index]: cache} if cache is not None else {}
            if self._augment_takes_positions[augment_index]:
                kwargs["position_ids"] = position_ids.to(device)
            if not self._is_encoder[augment_index]:
                kwargs["use_cache"] = cache is not None
            base(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
            captured = self._captured
        finally:
            self._captured = None
        return {layer: captured[(augment_index, layer)] for layer in self._capture_layers[augment_index]}

    def _keys_values(self, augment_index: int, states: dict[int, torch.Tensor], positions: torch.Tensor):
        """{bridge index: (keys, values)} for the bridges fed by one augmenting model."""
        return {
            i: self.bridges[i].keys_values(states[a], positions)
            for i, (index, a, _) in enumerate(self.bridge_connections)
            if index == augment_index
        }

    def _append_kv(self, cache: CompositionCache | None, new: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        """Append new keys/values to the cached ones (when decoding); returns the full ones."""
        if cache is None:
            return new
        for i, (keys, values) in new.items():
            old = cache.bridge_kv[i]
            cache.bridge_kv[i] = (
                (keys, values)
                if old is None
                else (torch.cat([old[0], keys], 2), torch.cat([old[1], values], 2))
            )
        return {i: cache.bridge_kv[i] for i in new}

    def _bridge_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        full_positions: torch.Tensor,
        augment_attention_mask: torch.Tensor | None,
        cache: CompositionCache | None,
        augment_states: Sequence[dict[int, torch.Tensor] | None] | None,
        anchor_ends: torch.Tensor | None,
        augment_inputs: Sequence[dict[str, torch.Tensor] | None] | None,
    ) -> _ActiveBridges:
        count = len(self.augments)
        aligned = list(augment_inputs) if augment_inputs is not None else [None] * count
        if len(aligned) != count:
            raise ValueError(f"augment_inputs has {len(aligned)} entries for {count} augmenting models")
        states_given = list(augment_states) if augment_states is not None else [None] * count
        kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        masks: list[CrossAttentionMask | None] = [None] * count
        query_positions: list[torch.Tensor | None] = [None] * count
        shared = [k for k in range(count) if aligned[k] is None]
        if shared:
            shared_mask = self._shared_inputs(
                shared,
                input_ids,
                attention_mask,
                position_ids,
                full_positions,
                augment_attention_mask,
                cache,
                states_given,
                kv,
            )
            for k in shared:
                masks[k], query_positions[k] = shared_mask, position_ids
        if len(shared) < count:
            if anchor_ends is None:
                raise ValueError(
                    "an augmenting model with its own tokenizer needs anchor_ends (character end of each anchor token)"
                )
            ends_all, real_all = anchor_ends, attention_mask[:, -input_ids.shape[1] :].bool()
            if cache is not None:
                ends_all = (
                    anchor_ends
                    if cache.anchor_ends is None
                    else torch.cat([cache.anchor_ends, anchor_ends], 1)
                )
                real_all = (
                    real_all if cache.anchor_real is None else torch.cat([cache.anchor_real, real_all], 1)
                )
                cache.anchor_ends, cache.anchor_real = ends_all, real_all
            for k in range(count):
                if aligned[k] is not None:
                    masks[k], query_positions[k] = self._aligned_inputs(
                        k,
                        aligned[k],
                        anchor_ends,
                        position_ids,
                        ends_all,
                        real_all,
                        cache,
                        states_given[k],
                        kv,
                    )
        return _ActiveBridges(
            kv=[kv.get(i) for i in range(len(self.bridges))], masks=masks, query_positions=query_positions
        )

    def _shared_inputs(
        self,
        indices,
        input_ids,
        attention_mask,
        position_ids,
        full_positions,
        augment_attention_mask,
        cache,
        states_given,
        kv,
    ) -> CrossAttentionMask:
        """Augmenting models that read the anchor's own tokens: masks by column (today's path)."""
        past = cache.seen if cache is not None else 0
        num_queries = input_ids.shape[1]

        def states_of(k, ids, mask, positions):
            if states_given[k] is not None:
                # precomputed states may be padded past the key columns (prompt mode)
                return {layer: v[:, : ids.shape[1]] for layer, v in states_given[k].items()}
            return self.augment_states(
                k, ids, mask, positions, cache.augments[k] if cache is not None else None
            )

        if self.mask_mode == "causal":
            for k in indices:
                new = self._keys_values(
                    k, states_of(k, input_ids, attention_mask, position_ids), position_ids
                )
                kv.update(self._append_kv(cache, new))
            key_valid = attention_mask
        else:
            first = indices[0]
            if cache is not None and cache.key_valid[first] is not None:
                key_valid = cache.key_valid[first]
                kv.update(
                    {i: cache.bridge_kv[i] for i, c in enumerate(self.bridge_connections) if c[0] in indices}
                )
            else:
                if past != 0:
                    raise ValueError("prompt mode: the first cached forward must contain the prompt")
                prompt_mask = attention_mask if augment_attention_mask is None else augment_attention_mask
                if prompt_mask.shape != input_ids.shape:
                    raise ValueError(
                        f"augment_attention_mask has shape {tuple(prompt_mask.shape)}, expected {tuple(input_ids.shape)}"
                    )
                prompt_columns = prompt_mask.bool().any(0).nonzero()
                end = int(prompt_columns.max()) + 1 if len(prompt_columns) else 1
                key_valid = prompt_mask[:, :end]
                for k in indices:
                    states = states_of(k, input_ids[:, :end], key_valid, full_positions[:, :end])
                    new = self._keys_values(k, states, full_positions[:, :end])
                    kv.update(self._append_kv(cache, new))
                    if cache is not None:
                        cache.key_valid[k] = key_valid
        return cross_attention_mask(key_valid, num_queries, past, self.mask_mode)

    def _aligned_inputs(
        self, k, inputs, anchor_ends, position_ids, ends_all, real_all, cache, states_given, kv
    ) -> tuple[CrossAttentionMask, torch.Tensor]:
        """An augmenting model with its own tokenizer: it reads its own tokens, and anchor token i
        reads augment token j once j is final by the end of i's text (alignment.py)."""
        ids, new_mask = inputs["input_ids"], inputs["attention_mask"]
        scale = self.config.bridge.aligned_positions
        if self.mask_mode == "prompt" and cache is not None and cache.key_valid[k] is not None:
            key_valid = cache.key_valid[k]
            kv.update({i: cache.bridge_kv[i] for i, c in enumerate(self.bridge_connections) if c[0] == k})
            key_settled = cache.key_settled[k]
        else:
            old_mask = cache.key_valid[k] if cache is not None else None
            key_valid = new_mask if old_mask is None else torch.cat([old_mask, new_mask], 1)
            settled = inputs.get("settled_at")
            if self.mask_mode == "causal" and settled is None:
                raise ValueError(f"augment_inputs[{k}] needs settled_at in causal mode")
            old_settled = cache.key_settled[k] if cache is not None else None
            key_settled = (
                settled if old_settled is None or settled is None else torch.cat([old_settled, settled], 1)
            )
            if ids.shape[1] > 0:
                past = key_valid.shape[1] - ids.shape[1]
                positions = positions_from_mask(key_valid)[:, past:]
                if states_given is not None:
                    states = {layer: v[:, : ids.shape[1]] for layer, v in states_given.items()}
                else:
                    own_cache = cache.augments[k] if cache is not None else None
                    states = self.augment_states(k, ids, key_valid, positions, own_cache)
                key_pos = self._aligned_key_positions(scale, inputs, settled, ends_all, real_all)
                kv.update(self._append_kv(cache, self._keys_values(k, states, key_pos)))
            elif (
                cache is not None
            ):  # no new token: the keys so far (None: none yet, the bridges read nothing)
                kv.update({i: cache.bridge_kv[i] for i, c in enumerate(self.bridge_connections) if c[0] == k})
            if cache is not None:
                cache.key_valid[k], cache.key_settled[k] = key_valid, key_settled
        mask = aligned_mask(key_valid, key_settled, anchor_ends, self.mask_mode)
        query_positions = anchor_ends if scale == "chars" else position_ids
        return mask, query_positions

    @staticmethod
    def _aligned_key_positions(scale, inputs, settled, ends_all, real_all) -> torch.Tensor:
        """Rotary positions of augment keys on the anchor queries' scale: the character end of the
        token ("chars"), or the index of the first anchor token that may read it ("anchor_tokens")."""
        if scale == "chars":
            return inputs["ends"]
        if settled is None:  # prompt mode: every anchor token reads every key
            return torch.zeros_like(inputs["input_ids"])
        earlier = (ends_all[:, None, :] < settled[:, :, None]) & real_all[:, None, :]
        return earlier.sum(-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        augment_attention_mask: torch.Tensor | None = None,
        cache: CompositionCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        augment_states: Sequence[dict[int, torch.Tensor] | None] | None = None,
        anchor_ends: torch.Tensor | None = None,
        augment_inputs: Sequence[dict[str, torch.Tensor] | None] | None = None,
        return_logits: bool = True,
        loss_reduction: str = "mean",
    ) -> CompositionOutput:
        """Logits of the composition (and the next-token loss over ``labels`` != -100, the mean or,
        with ``loss_reduction="sum"``, the sum over tokens).

        With ``labels`` and ``return_logits=False`` (what training does) no logits are returned
        and the anchor's head runs only at the loss positions, in chunks: no (batch, seq, vocab)
        tensor is made (``comm_cli.losses.hidden_states_loss``).

        ``attention_mask`` covers the cached columns plus these ones (HF convention); positions
        count only real tokens, so left and right padding give the same logits on real tokens.
        ``augment_attention_mask`` marks the prompt tokens in prompt mode (default: all real
        tokens). ``augment_states`` (precomputed connected-layer outputs per augment, or None
        for one to run) skips the augmenting models.

        An augmenting model with its own tokenizer reads its own tokens: ``augment_inputs[k]`` is
        a dict with ``input_ids``, ``attention_mask`` (its new columns only when decoding with a
        cache), ``settled_at`` (causal mode: the text length from which each token is final) and
        ``ends`` (character end of each token), and ``anchor_ends`` gives the character end of
        each anchor token (see ``comm_cli.compose.alignment``). ``None`` entries (or no
        ``augment_inputs``) read the anchor's tokens.
        """
        batch, length = input_ids.shape
        if use_cache and cache is None:
            cache = self.new_cache()
        past = cache.seen if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape[1] != past + length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} columns, expected {past} cached + {length} new"
            )
        full_positions = positions_from_mask(attention_mask)
        if position_ids is None:
            position_ids = full_positions[:, past:]

        if self._bridges_enabled:
            self._active = self._bridge_inputs(
                input_ids,
                attention_mask,
                position_ids,
                full_positions,
                augment_attention_mask,
                cache,
                augment_states,
                anchor_ends,
                augment_inputs,
            )
        anchor_kwargs = {self._anchor_cache_kw: cache.anchor} if cache is not None else {}
        try:
            if labels is not None and not return_logits and cache is None:
                loss = self._anchor_loss(input_ids, attention_mask, position_ids, labels, loss_reduction)
                return CompositionOutput(logits=None, loss=loss)
            out = self.anchor(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=cache is not None,
                logits_to_keep=logits_to_keep,
                **anchor_kwargs,
            )
        finally:
            self._active = None
        if cache is not None:
            cache.seen += length
        loss = next_token_loss(out.logits, labels, loss_reduction) if labels is not None else None
        return CompositionOutput(logits=out.logits, loss=loss, cache=cache)

    def _anchor_loss(self, input_ids, attention_mask, position_ids, labels, reduction) -> torch.Tensor:
        """The anchor's next-token loss without its full logits: its base model's hidden states
        through the head at the loss positions only (the bridge hooks run inside the base model),
        or, for a head comm cannot apply itself, the anchor's logits at those positions."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        head = output_head(self.anchor)
        if head is not None:
            hidden = self.anchor.base_model(**inputs, use_cache=False).last_hidden_state
            return hidden_states_loss(hidden, labels, head, reduction)
        if keeps_loss_logits(self.anchor):
            logits = self.anchor(**inputs, use_cache=False, logits_to_keep=loss_mask(labels)).logits
            return kept_logits_loss(logits, loss_targets(labels.to(logits.device)), reduction)
        logits = self.anchor(**inputs, use_cache=False).logits
        return next_token_loss(logits, labels, reduction)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """KV-cached generation; see ``comm_cli.compose.generation.generate`` for the options."""
        from comm_cli.compose.generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and frozen parameter counts of any module."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable}


def _spec_of(model: nn.Module) -> ModelSpec:
    """A ModelSpec that names an in-memory model by where it was loaded from (may be empty for a
    model built from a config; such a composition can be saved but needs its bases passed in to load)."""
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or "<in-memory>"
    return ModelSpec(name_or_path=canonical_name(name), dtype=dtype_name(next(model.parameters()).dtype))


def check_config(config: CompositionConfig) -> list[list[tuple[int, int]]]:
    """Validate mappings and head count from the model configs only (no weights are loaded).
    Returns the resolved connections of each augment."""
    anchor_config = load_model_config(config.anchor, "anchor model")
    anchor_depth, anchor_dim = num_layers(anchor_config), hidden_size(anchor_config)
    if anchor_dim % config.bridge.num_heads != 0:
        raise ConfigError(
            f"bridge.num_heads={config.bridge.num_heads} does not divide the anchor width {anchor_dim}: "
            f"pick a divisor of {anchor_dim}"
        )
    resolved = []
    for i, spec in enumerate(config.augments):
        augment_config = load_model_config(spec.model, f"augmenting model {i}")
        if is_encoder(augment_config) and config.mask_mode == "causal":
            raise ConfigError(encoder_in_causal_mode(i, spec.model.name_or_path))
        resolved.append(
            resolve_connections(
                MappingSpec(pairs=spec.connections) if spec.connections else spec.mapping,
                num_layers(augment_config),
                anchor_depth,
                name=f"augment {i} ({spec.model.name_or_path})",
            )
        )
    return resolved
