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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from comm_cli.compose.blocks import find_blocks, hidden_size, num_layers, truncate_blocks
from comm_cli.compose.bridge import Bridge
from comm_cli.compose.loading import (
    canonical_name,
    dtype_name,
    load_causal_lm,
    load_model_config,
    torch_dtype,
)
from comm_cli.compose.mapping import resolve_connections
from comm_cli.compose.masks import CrossAttentionMask, cross_attention_mask, positions_from_mask
from comm_cli.compose.specs import AugmentSpec, BridgeConfig, CompositionConfig, MappingSpec, ModelSpec
from comm_cli.errors import ConfigError
from comm_cli.losses import next_token_loss


@dataclass
class CompositionOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    cache: CompositionCache | None = None


@dataclass
class CompositionCache:
    """Decoding state: the anchor's and each augment's own KV cache, the bridges' cross-attention
    keys/values over the augment positions seen so far, and which of those positions are real."""

    anchor: object
    augments: list[object | None]
    bridge_kv: list[tuple[torch.Tensor, torch.Tensor] | None]
    key_valid: torch.Tensor | None = None
    key_positions: torch.Tensor | None = None
    seen: int = 0


@dataclass
class _ActiveBridges:
    """What the anchor-layer hooks read during one forward pass."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: CrossAttentionMask
    query_positions: torch.Tensor
    masks_by_device: dict = field(default_factory=dict)

    def mask_on(self, device: torch.device) -> CrossAttentionMask:
        if device not in self.masks_by_device:
            self.masks_by_device[device] = self.mask.to(device)
        return self.masks_by_device[device]


def _cache_kwarg(model: nn.Module) -> str:
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
        self._anchor_cache_kw = _cache_kwarg(anchor)

        if len(augments) != len(config.augments):
            raise ConfigError(
                f"{len(augments)} augmenting models given for {len(config.augments)} augment specs"
            )
        self.augments = nn.ModuleList()
        self.bridges = nn.ModuleList()
        self._augment_cache_kw: list[str] = []
        self._augment_configs = []
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
            last = max(a for a, _ in connections)
            truncate_blocks(blocks, last + 1)
            base = augment.base_model
            self.augments.append(base)
            self._augment_cache_kw.append(_cache_kwarg(base))
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
            load_causal_lm(spec.model, f"augmenting model {i}", device)
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
            mask = active.mask_on(hidden.device)
            delta = None
            for i in bridge_indices:
                keys, values = active.kv[i]
                out = self.bridges[i](
                    hidden,
                    keys,
                    values,
                    active.query_positions,
                    attn_mask=mask.attn_mask,
                    is_causal=mask.is_causal,
                    query_valid=mask.query_valid,
                )
                delta = out if delta is None else delta + out
            hidden = hidden + delta
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    # ------------------------------------------------------------------ forward

    def new_cache(self) -> CompositionCache:
        from transformers import DynamicCache

        return CompositionCache(
            anchor=DynamicCache(config=self.anchor.config),
            augments=[
                DynamicCache(config=cfg) if self.mask_mode == "causal" else None
                for cfg in self._augment_configs
            ],
            bridge_kv=[None] * len(self.bridges),
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
            base(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device),
                use_cache=cache is not None,
                **kwargs,
            )
            captured = self._captured
        finally:
            self._captured = None
        return {layer: captured[(augment_index, layer)] for layer in self._capture_layers[augment_index]}

    def _bridge_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        full_positions: torch.Tensor,
        augment_attention_mask: torch.Tensor | None,
        cache: CompositionCache | None,
        augment_states: Sequence[dict[int, torch.Tensor]] | None,
    ) -> _ActiveBridges:
        past = cache.seen if cache is not None else 0
        num_queries = input_ids.shape[1]

        def compute_kv(ids, mask, positions, caches):
            kv = []
            per_augment = []
            for index in range(len(self.augments)):
                if augment_states is not None:
                    # precomputed states may be padded past the key columns (prompt mode)
                    per_augment.append({k: v[:, : ids.shape[1]] for k, v in augment_states[index].items()})
                else:
                    per_augment.append(
                        self.augment_states(index, ids, mask, positions, caches[index] if caches else None)
                    )
            for bridge, (index, a, _) in zip(self.bridges, self.bridge_connections):
                kv.append(bridge.keys_values(per_augment[index][a], positions))
            return kv

        if self.mask_mode == "causal":
            kv = compute_kv(
                input_ids, attention_mask, position_ids, cache.augments if cache is not None else None
            )
            if cache is not None:
                kv = [
                    new if old is None else (torch.cat([old[0], new[0]], 2), torch.cat([old[1], new[1]], 2))
                    for old, new in zip(cache.bridge_kv, kv)
                ]
                cache.bridge_kv = kv
            key_valid = attention_mask
        else:
            if cache is not None and cache.key_valid is not None:
                kv, key_valid = cache.bridge_kv, cache.key_valid
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
                kv = compute_kv(input_ids[:, :end], key_valid, full_positions[:, :end], None)
                if cache is not None:
                    cache.bridge_kv, cache.key_valid = kv, key_valid
        mask = cross_attention_mask(key_valid, num_queries, past, self.mask_mode)
        return _ActiveBridges(kv=kv, mask=mask, query_positions=position_ids)

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
        augment_states: Sequence[dict[int, torch.Tensor]] | None = None,
    ) -> CompositionOutput:
        """Logits of the composition (and the mean next-token loss over ``labels`` != -100).

        ``attention_mask`` covers the cached columns plus these ones (HF convention); positions
        count only real tokens, so left and right padding give the same logits on real tokens.
        ``augment_attention_mask`` marks the prompt tokens in prompt mode (default: all real
        tokens). ``augment_states`` (precomputed connected-layer outputs per augment) skips the
        augmenting models.
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
            )
        anchor_kwargs = {self._anchor_cache_kw: cache.anchor} if cache is not None else {}
        try:
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
        loss = next_token_loss(out.logits, labels) if labels is not None else None
        return CompositionOutput(logits=out.logits, loss=loss, cache=cache)

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
        resolved.append(
            resolve_connections(
                MappingSpec(pairs=spec.connections) if spec.connections else spec.mapping,
                num_layers(augment_config),
                anchor_depth,
                name=f"augment {i} ({spec.model.name_or_path})",
            )
        )
    return resolved
