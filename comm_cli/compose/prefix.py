"""Replaying the frozen bottom of the anchor: its first decoder layers, computed once.

Below the lowest layer that training changes (the lowest bridge for CALM, the lowest adapted
layer for LoRA) the anchor is frozen and its states depend only on the input tokens. Those
states can be computed once over the training split and stored (``comm_cli.training.
anchor_prefix_cache``); a training step then hands them in and the anchor's first layers return
them instead of computing anything. For the real-facts experiment (bridges into the last of 30
layers) a step's anchor work falls from 30 layers to the final norm and head.

The layers are patched, not removed, so every wrapper (PEFT, the bridges' hooks, which still run
on the last replayed layer) sees the model it expects. Without given states they compute as
before, bit for bit: evaluation and validation batches are unaffected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from comm_cli.compose.blocks import find_blocks
from comm_cli.errors import ConfigError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, also under a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return find_blocks(base).layers


def trainable_prefix_length(layers: nn.ModuleList, embeddings: nn.Module | None) -> int:
    """How many of the first layers nothing in training changes: the index of the first layer
    with a trainable parameter (LoRA, full fine-tuning). Zero when the embeddings train."""
    if embeddings is not None and any(p.requires_grad for p in embeddings.parameters()):
        return 0
    for index, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return len(layers)


class AnchorPrefix:
    """Patches the first ``length`` decoder layers: inside ``given(states)`` the first returns
    ``states`` (the output of layer ``length - 1``, computed elsewhere) and the others pass their
    input through; forward hooks on those layers still run. Outside it, they compute."""

    def __init__(self, layers: nn.ModuleList, length: int):
        if not 1 <= length <= len(layers):
            raise ConfigError(
                f"cannot replay {length} anchor layers of {len(layers)}: the frozen prefix must hold "
                f"1..{len(layers)} layers (training changes layer {length} or below)"
            )
        self.layers = list(layers)[:length]
        self.length = length
        self._states: torch.Tensor | None = None
        self._tuple_tail: int | None = None  # None: layers return a tensor; n: a tuple of 1 + n
        for index, layer in enumerate(self.layers):
            if getattr(layer, "_comm_prefix", None) is not None:
                raise ConfigError("the anchor's prefix is already being replayed: install it once")
            layer._comm_prefix = self
            layer.forward = self._forward(index, layer.forward)

    def _forward(self, index: int, original):
        def forward(hidden_states, *args, **kwargs):
            if self._states is None:
                out = original(hidden_states, *args, **kwargs)
                self._tuple_tail = len(out) - 1 if isinstance(out, tuple) else None
                return out
            states = self._states if index == 0 else hidden_states
            if index == 0:
                states = states.to(device=hidden_states.device, dtype=hidden_states.dtype)
                if states.shape != hidden_states.shape:
                    raise ValueError(
                        f"replayed anchor states {tuple(states.shape)} do not match the batch "
                        f"{tuple(hidden_states.shape)}: the prefix cache was built for other data"
                    )
            if self._tuple_tail is None:
                return states
            return (states,) + (None,) * self._tuple_tail

        return forward

    def probe(self, model: nn.Module) -> None:
        """Run the model once on two tokens so the layers' output format is known."""
        device = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), use_cache=False)

    @contextlib.contextmanager
    def given(self, states: torch.Tensor | None) -> Iterator[None]:
        """Within this block the prefix returns ``states`` (batch, seq, width); None: compute."""
        previous = self._states
        self._states = states
        try:
            yield
        finally:
            self._states = previous


class _Stop(Exception):
    def __init__(self, states: torch.Tensor):
        self.states = states


@torch.no_grad()
def prefix_states(model: nn.Module, layers: nn.ModuleList, length: int, **inputs) -> torch.Tensor:
    """The output of decoder layer ``length - 1`` for ``inputs``, computing nothing above it
    (the forward stops there). Bridges must be off (the plain anchor's states are wanted)."""

    def stop(module, args, output):
        raise _Stop(output[0] if isinstance(output, tuple) else output)

    handle = layers[length - 1].register_forward_hook(stop)
    try:
        model(**inputs, use_cache=False)
    except _Stop as done:
        return done.states
    finally:
        handle.remove()
    raise RuntimeError("the anchor's forward never reached its prefix's last layer")
