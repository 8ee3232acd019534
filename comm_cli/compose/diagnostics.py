"""Is each bridge reading its augment? Cheap per-bridge measurements of a composition.

A bridge starts with zero output (W_O = 0), so at first the composition is the anchor and the
attention's W_Q/W_K/W_V get no gradient; training can sit on a plateau where the bridges read
nothing (docs/training_dynamics.md). These numbers say where a run is:

- ``output_ratio``: |X| / |H| per real anchor position, averaged: the bridge output X against the
  anchor state H it is added to. ~0 on the plateau (the bridge adds nothing).
- ``entropy``: the attention's entropy over the keys a query can see, divided by log(number of
  those keys), averaged over heads and real queries that see at least two keys. 1 = uniform
  (reads an average of everything), 0 = every head on one key.
- ``answer_mass`` / ``answer_mass_best_head``: when the caller names the augment positions that
  hold the answer (e.g. the key's last character; the person's name), the attention mass on them,
  at the queries the caller names (default: every real query that can see one), averaged over
  heads / of the head that puts most there (one head that reads is enough).
- ``gate``: tanh(g) of a gated bridge.
- after a backward, ``gradient_norms``: the L2 norm of each parameter group's gradient (W_Q, W_K,
  W_V, W_O, projection, gate), and ``weight_norms`` the same of the weights.

Use it around any forward (a training step's, or a held-out batch's under ``torch.no_grad``):

    with BridgeProbe(model) as probe:
        loss = model(ids, mask, labels=labels, return_logits=False).loss
    loss.backward()
    readings = probe.readings(query_mask=mask, answer_keys=answer_positions)
    grads = gradient_norms(model)

The probe only keeps references to the bridge's inputs and output (forward hooks); the
attention probabilities are recomputed from them when ``readings`` is called
(``Bridge.attention_weights``), so a step that is not measured costs nothing. Plain PyTorch: no
Hydra, Accelerate or tracker here.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import nn

from comm_cli.compose.bridge import Bridge

# parameter group -> the bridge's attribute names whose weights form it
PARAMETER_GROUPS = {
    "q": ("q_proj",),
    "k": ("k_proj",),
    "v": ("v_proj",),
    "o": ("o_proj",),
    "proj": ("proj",),
    "gate": ("gate",),
    "norms": ("augment_norm", "query_norm"),
}


def _bridges(model: nn.Module) -> Sequence[Bridge]:
    """The bridges of a ComposedModel (or a list of bridges, or one bridge)."""
    if isinstance(model, Bridge):
        return [model]
    bridges = getattr(model, "bridges", model)
    return list(bridges)


class BridgeProbe:
    """Records each bridge's last call inside the ``with`` block (forward hooks); ``readings``
    turns them into the numbers of the module docstring."""

    def __init__(self, model: nn.Module):
        self.bridges = _bridges(model)
        self.calls: list[dict | None] = [None] * len(self.bridges)
        self._handles: list = []

    def __enter__(self) -> BridgeProbe:
        for index, bridge in enumerate(self.bridges):
            self._handles.append(bridge.register_forward_hook(self._recorder(index), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _recorder(self, index: int):
        signature = inspect.signature(Bridge.forward)

        def hook(module, args, kwargs, output):
            bound = signature.bind(module, *args, **kwargs)
            bound.apply_defaults()
            call = dict(bound.arguments)
            call.pop("self")
            call = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in call.items()}
            call["output"] = output.detach()
            self.calls[index] = call

        return hook

    @torch.no_grad()
    def readings(
        self,
        query_mask: torch.Tensor | None = None,
        answer_keys: torch.Tensor | None = None,
        answer_queries: torch.Tensor | None = None,
    ) -> list[dict[str, float | None]]:
        """One dict per bridge (None for a bridge that did not run).

        ``query_mask`` (batch, queries), 1 on real anchor tokens (the forward's attention mask
        over these columns; default: every column). ``answer_keys`` (batch, keys) marks the
        augment positions that hold the answer, or (batch, queries, keys) per query when each
        query has its own (e.g. the n-th answer digit reads the n-th key); ``answer_queries``
        (batch, queries) the anchor positions where reading them matters (default: real
        queries that see an answer key)."""
        return [
            None if call is None else _reading(bridge, call, query_mask, answer_keys, answer_queries)
            for bridge, call in zip(self.bridges, self.calls)
        ]


def _reading(bridge: Bridge, call: dict, query_mask, answer_keys, answer_queries) -> dict:
    anchor_states, output = call["anchor_states"], call["output"]
    batch, num_queries, _ = anchor_states.shape
    weights = bridge.attention_weights(
        anchor_states, call["keys"], call["positions"], call["attn_mask"], call["is_causal"]
    ).float()  # (batch, heads, queries, keys)
    num_keys = weights.shape[-1]
    device = weights.device
    visible = _visible(call["attn_mask"], call["is_causal"], batch, num_queries, num_keys, device)
    real = torch.ones(batch, num_queries, dtype=torch.bool, device=device)
    if query_mask is not None:
        real &= query_mask[:, -num_queries:].to(device).bool()
    if call["query_valid"] is not None:
        real &= call["query_valid"].to(device).bool()
    real &= visible.any(-1)

    state_norm = anchor_states.float().norm(dim=-1).to(device)
    ratio = output.float().norm(dim=-1).to(device) / state_norm.clamp_min(1e-12)
    reading: dict[str, float | None] = {"output_ratio": _mean(ratio, real)}

    counts = visible.sum(-1)  # (batch, queries)
    entropy = -(weights * weights.clamp_min(1e-30).log()).sum(-1)  # (batch, heads, queries)
    normalised = entropy / counts.clamp_min(2).float().log()[:, None, :]
    several = real & (counts >= 2)
    reading["entropy"] = _mean(normalised.mean(1), several)

    reading["answer_mass"] = reading["answer_mass_best_head"] = None
    if answer_keys is not None:
        answer = answer_keys.to(device).bool()
        if answer.dim() == 2:  # the same keys for every query
            answer = answer[:, None, :]
        answer = answer[:, -num_queries:] & visible  # (batch, queries, keys)
        where = real & answer.any(-1)
        if answer_queries is not None:
            where &= answer_queries[:, -num_queries:].to(device).bool()
        mass = (weights * answer[:, None].float()).sum(-1)  # (batch, heads, queries)
        if bool(where.any()):
            per_head = mass.transpose(1, 2)[where].mean(0)  # (heads,)
            reading["answer_mass"] = per_head.mean().item()
            reading["answer_mass_best_head"] = per_head.max().item()
    reading["gate"] = math.tanh(bridge.gate.item()) if bridge.gate is not None else None
    return reading


def _visible(attn_mask, is_causal: bool, batch: int, queries: int, keys: int, device) -> torch.Tensor:
    """(batch, queries, keys) bool: which keys each query may attend to."""
    visible = torch.ones(batch, queries, keys, dtype=torch.bool, device=device)
    if attn_mask is not None:
        visible &= attn_mask.to(device).bool().any(1) if attn_mask.dim() == 4 else attn_mask.bool()
    if is_causal:
        visible &= torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)
    return visible


def _mean(values: torch.Tensor, where: torch.Tensor) -> float | None:
    return values[where].mean().item() if bool(where.any()) else None


def _group_norms(bridge: Bridge, gradients: bool) -> dict[str, float | None]:
    norms: dict[str, float | None] = {}
    for group, names in PARAMETER_GROUPS.items():
        tensors = []
        for name in names:
            module = getattr(bridge, name, None)
            if module is None:
                continue
            params = [module] if isinstance(module, nn.Parameter) else list(module.parameters())
            tensors += [p.grad if gradients else p for p in params]
        tensors = [t.detach().float() for t in tensors if t is not None]
        norms[group] = math.sqrt(sum(t.pow(2).sum().item() for t in tensors)) if tensors else None
    return norms


def gradient_norms(model: nn.Module) -> list[dict[str, float | None]]:
    """Per bridge, the L2 norm of each parameter group's gradient (None: no gradient yet, or no
    such group). Call after ``backward`` and before the optimizer zeroes the gradients."""
    return [_group_norms(bridge, gradients=True) for bridge in _bridges(model)]


def weight_norms(model: nn.Module) -> list[dict[str, float | None]]:
    """Per bridge, the L2 norm of each parameter group's weights."""
    return [_group_norms(bridge, gradients=False) for bridge in _bridges(model)]


def summarise(readings: Sequence[dict | None], prefix: str = "bridge") -> dict[str, float]:
    """Flat ``{"bridge0/output_ratio": ...}`` for a tracker or a JSON line (None values dropped)."""
    flat = {}
    for index, reading in enumerate(readings):
        for key, value in (reading or {}).items():
            if value is not None:
                flat[f"{prefix}{index}/{key}"] = value
    return flat
