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
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from comm_cli.compose.alignment import ReadPlan
from comm_cli.compose.blocks import (
    bridge_heads,
    cache_kwarg,
    encoder_in_causal_mode,
    find_blocks,
    hidden_size,
    is_encoder,
    num_layers,
    recompute_in_backward,
    takes_position_ids,
    truncate_blocks,
)
from comm_cli.compose.bridge import Bridge
from comm_cli.compose.bridge_inputs import ActiveBridges, BridgeInputs, CompositionCache
from comm_cli.compose.checks import check_config
from comm_cli.compose.loading import load_augment_model, load_causal_lm, spec_of, torch_dtype
from comm_cli.compose.mapping import augment_connections, mappings_per_augment
from comm_cli.compose.masks import positions_from_mask
from comm_cli.compose.saving import load_composition, save_composition
from comm_cli.compose.specs import AugmentSpec, BridgeConfig, CompositionConfig, MappingSpec, ModelSpec
from comm_cli.compose.tokenizers import load_tokenizers, plan_reading
from comm_cli.errors import ConfigError
from comm_cli.losses import causal_lm_loss, next_token_loss

logger = logging.getLogger(__name__)


@dataclass
class CompositionOutput:
    logits: torch.Tensor | None  # None when the loss was computed without logits (return_logits=False)
    loss: torch.Tensor | None = None
    cache: CompositionCache | None = None


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
        if config.bridge.num_heads is None:  # recorded, so a saved composition rebuilds the same
            config.bridge = dataclasses.replace(config.bridge, num_heads=bridge_heads(None, anchor.config))
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
            connections = augment_connections(spec, index, len(blocks.layers), anchor_depth)
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
        self._active: ActiveBridges | None = None
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
        depths = [num_layers(aug.config) for aug in augments]
        mappings = mappings_per_augment(mappings, num_layers(anchor.config), depths)
        config = CompositionConfig(
            anchor=anchor_spec or spec_of(anchor),
            augments=[
                AugmentSpec(model=(augment_specs[i] if augment_specs else spec_of(aug)), mapping=mappings[i])
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
        dtype: str | None = None,
        anchor_at: str | None = None,
        augments_at: Sequence[str | None] = (),
    ) -> ComposedModel:
        """Load a composition saved by ``save_pretrained``: the bases it names (unless given; in
        ``dtype``, e.g. "bfloat16", instead of their recorded one; from ``anchor_at`` /
        ``augments_at`` when they have moved, checked to fit first) and its bridge weights.
        Nothing is unpickled."""
        return load_composition(
            cls, directory, anchor=anchor, augments=augments, device=device, dtype=dtype,
            anchor_at=anchor_at, augments_at=augments_at,
        )  # fmt: skip

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the bridge weights (safetensors) and the composition config (JSON)."""
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
        augments = self.config.augments
        names = [f"augment {i} ({spec.model.name_or_path})" for i, spec in enumerate(augments)]
        paths = [spec.tokens for spec in augments]
        plan = plan_reading(anchor_tokenizer, augment_tokenizers, names, paths, self.mask_mode, texts)
        readers = plan.augment_readers if plan is not None else [None] * len(augments)
        self.set_readers(anchor_tokenizer, plan.anchor_reader if plan is not None else None, readers)

    def attach_saved_tokenizers(self) -> None:
        """Load each model's tokenizer from where its spec says (``comm_cli.compose.tokenizers``)
        and attach them (``use_tokenizers``). An augmenting model that ships no tokenizer is taken
        to share the anchor's, unless it reads aligned tokens. The sources are recorded in this
        composition's config (in new specs: a spec the caller passed in is not written to)."""
        augments = self.config.augments
        loaded = load_tokenizers(
            self.config.anchor,
            [s.model for s in augments],
            required=[s.tokens == "aligned" for s in augments],
        )
        self.config.anchor = dataclasses.replace(self.config.anchor, tokenizer=loaded.anchor_source)
        for spec, source in zip(augments, loaded.augment_sources):
            spec.model = dataclasses.replace(spec.model, tokenizer=source)
        self.use_tokenizers(loaded.anchor, loaded.augments)

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
    def read_augment_layers(self) -> list[list[int]]:
        """Per augmenting model, the layers whose outputs the bridges read, lowest first."""
        return [list(layers) for layers in self._capture_layers]

    @property
    def augment_widths(self) -> list[int]:
        """Per augmenting model, the width of its residual stream (what the bridges read)."""
        return [hidden_size(config) for config in self._augment_configs]

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
        recompute_in_backward(self._anchor_layers[min(self._bridges_at) :])

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
            delta = active.bridge_output(self.bridges, self.bridge_connections, bridge_indices, hidden)
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
            self._active = BridgeInputs(
                self,
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                full_positions=full_positions,
                augment_attention_mask=augment_attention_mask,
                cache=cache,
                augment_states=augment_states,
                anchor_ends=anchor_ends,
                augment_inputs=augment_inputs,
            ).assemble()
        anchor_kwargs = {self._anchor_cache_kw: cache.anchor} if cache is not None else {}
        try:
            if labels is not None and not return_logits and cache is None:
                # the bridge hooks run inside the anchor's base model, which this runs
                inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
                loss = causal_lm_loss(self.anchor, inputs, labels, loss_reduction)
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

    def encode(self, texts, completions=None, **options) -> dict:
        """Everything ``forward`` takes, from text: ``model(**model.encode(texts))`` scores texts,
        ``model.encode(prompts, completions)`` prompt/completion pairs (loss on the completions).
        Options: ``add_bos``, ``add_eos``, ``max_length``, ``padding_side``
        (``comm_cli.compose.text.encode``)."""
        from comm_cli.compose.text import encode

        return encode(self, texts, completions, **options)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        prompts=None,
        **kwargs,
    ):
        """KV-cached generation (``comm_cli.compose.generation.generate`` has the options).
        ``generate(prompts=[...])`` is text in, text out: the continuations as strings
        (``comm_cli.compose.text.generate_text``); with ``input_ids`` it returns token ids, and a
        composition whose augment reads its own tokenizer also needs the ``prompts`` they came from."""
        if input_ids is None:
            if prompts is None:
                raise ValueError("give prompts=[...] (text in, text out) or input_ids")
            from comm_cli.compose.text import generate_text

            return generate_text(self, prompts, **kwargs)
        from comm_cli.compose.generation import generate

        return generate(self, input_ids, attention_mask, prompts=prompts, **kwargs)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and frozen parameter counts of any module."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable}
