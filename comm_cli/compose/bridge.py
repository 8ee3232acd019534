"""A bridge: the trained piece at one connection (augment layer a -> anchor layer b).

    P = proj(H_A[a])                                  augment width -> anchor width
    X = MHA(query=H_B[b], key=P, value=P)             own W_Q, W_K, W_V, W_O, PyTorch SDPA
    anchor layer b now outputs H_B[b] + X             and layer b+1 reads that

Initialisation: the projection and W_Q/W_K/W_V are Xavier-uniform (unit-variance outputs for
unit-variance inputs whatever the two widths); W_O is zero by default, so at step 0 the
composition is exactly the anchor and training starts from the anchor's own behaviour
(``zero_init_value`` zeroes W_V instead, with the same effect at step 0). With ``gate=True`` the
output is further scaled by tanh(g), g initialised at ``gate_init``. ``qk_norm`` and
``logit_scale`` set how sharp the attention can be at the start (docs/training_dynamics.md says
what each does to the plateau on which the bridges first read nothing).

Keys/values and queries are computed by separate methods so that generation can cache the
keys/values of augment positions already seen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from comm_cli.compose.rotary import apply_rotary, rotary_cos_sin
from comm_cli.compose.specs import BridgeConfig
from comm_cli.errors import ConfigError


def bridge_parameter_count(augment_dim: int, anchor_dim: int, config: BridgeConfig) -> int:
    """Parameters of one bridge, computable from the model configs alone (for budget matching)."""
    norms = augment_dim + anchor_dim if config.norm else 0
    head_norms = 2 * (anchor_dim // config.num_heads) if config.qk_norm else 0
    return (
        augment_dim * anchor_dim
        + anchor_dim
        + 4 * anchor_dim * anchor_dim
        + (1 if config.gate else 0)
        + norms
        + head_norms
    )


class Bridge(nn.Module):
    def __init__(self, augment_dim: int, anchor_dim: int, config: BridgeConfig):
        super().__init__()
        if anchor_dim % config.num_heads != 0:
            raise ConfigError(
                f"bridge.num_heads={config.num_heads} does not divide the anchor width {anchor_dim}: "
                f"pick a divisor of {anchor_dim}"
            )
        self.num_heads = config.num_heads
        self.head_dim = anchor_dim // config.num_heads
        if config.rotary and self.head_dim % 2 != 0:
            raise ConfigError(
                f"bridge.rotary needs an even head size, but {anchor_dim}/{config.num_heads} = {self.head_dim}: "
                "change bridge.num_heads or set bridge.rotary=false"
            )
        # SDPA's default 1/sqrt(head size) times logit_scale; attention_weights uses it too
        self.scale = config.logit_scale / math.sqrt(self.head_dim)
        self.rotary = config.rotary
        self.rope_theta = config.rope_theta
        self.dropout = config.dropout
        self.proj = nn.Linear(augment_dim, anchor_dim)
        self.q_proj = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.k_proj = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.v_proj = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.o_proj = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.gate = nn.Parameter(torch.zeros(())) if config.gate else None
        self.augment_norm = nn.RMSNorm(augment_dim) if config.norm else None
        self.query_norm = nn.RMSNorm(anchor_dim) if config.norm else None
        self.q_norm = nn.RMSNorm(self.head_dim) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim) if config.qk_norm else None
        self.config = config
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, zero_init_output: bool | None = None) -> None:
        """The initialisation the config describes (``zero_init_output`` overrides its own)."""
        config = self.config
        if zero_init_output is None:
            zero_init_output = config.zero_init_output
        for linear in (self.proj, self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(self.proj.bias)
        if zero_init_output:
            nn.init.zeros_(self.o_proj.weight)
        else:
            nn.init.xavier_uniform_(self.o_proj.weight, gain=config.output_init_gain)
        if config.zero_init_value:
            nn.init.zeros_(self.v_proj.weight)
        if self.gate is not None:
            self.gate.fill_(config.gate_init)
        for norm in (self.augment_norm, self.query_norm, self.q_norm, self.k_norm):
            if norm is not None:
                nn.init.ones_(norm.weight)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)

    def keys_values(
        self, augment_states: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (batch, heads, seq, head_dim) from augment states (batch, seq, augment_dim)."""
        states = augment_states.to(device=self.device, dtype=self.dtype)
        if self.augment_norm is not None:
            states = self.augment_norm(states)
        projected = self.proj(states)
        keys, values = self._heads(self.k_proj(projected)), self._heads(self.v_proj(projected))
        if self.k_norm is not None:
            keys = self.k_norm(keys)
        if self.rotary:
            cos, sin = rotary_cos_sin(positions.to(self.device), self.head_dim, self.rope_theta, keys.dtype)
            keys = apply_rotary(keys, cos, sin)
        return keys, values

    def queries(self, anchor_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The bridge's queries (batch, heads, queries, head_dim) from the anchor states: the
        optional norm, the projection and, with rotary positions, the rotation at ``positions``."""
        x = anchor_states.to(device=self.device, dtype=self.dtype)
        if self.query_norm is not None:
            x = self.query_norm(x)
        queries = self._heads(self.q_proj(x))
        if self.q_norm is not None:
            queries = self.q_norm(queries)
        if self.rotary:
            cos, sin = rotary_cos_sin(
                positions.to(self.device), self.head_dim, self.rope_theta, queries.dtype
            )
            queries = apply_rotary(queries, cos, sin)
        return queries

    def attention_weights(
        self,
        anchor_states: torch.Tensor,
        keys: torch.Tensor,
        positions: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """The attention probabilities (batch, heads, queries, keys) that ``forward`` uses on the
        same inputs, computed explicitly (``forward`` runs SDPA, which never materialises them):
        for diagnostics and attention pictures. A query with no visible key gets all zeros."""
        queries = self.queries(anchor_states, positions)
        scores = (queries @ keys.to(queries.dtype).transpose(-1, -2)) * self.scale
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        if is_causal:
            q, k = scores.shape[-2:]
            causal = torch.ones(q, k, dtype=torch.bool, device=scores.device).tril(k - q)
            scores = scores.masked_fill(~causal, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)

    def forward(
        self,
        anchor_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        query_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The cross-attention output X (to be added to the anchor states), in the anchor's dtype.

        ``attn_mask`` is boolean (batch, 1, queries, keys), True where a query may attend;
        ``query_valid`` (batch, queries) zeroes queries that have no key to attend to.
        """
        queries = self.queries(anchor_states, positions)
        keys, values = keys.to(queries.dtype), values.to(queries.dtype)
        out = F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
        )
        batch, _, seq, _ = out.shape
        out = self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))
        if self.gate is not None:
            out = out * torch.tanh(self.gate)
        if query_valid is not None:
            out = out * query_valid[..., None].to(out.dtype)
        return out.to(device=anchor_states.device, dtype=anchor_states.dtype)
