"""Rotary position embeddings for the bridge's cross-attention.

Both models read the same tokens, so a query at anchor position i and a key at augment
position j carry the positions of the same text; rotating both makes their score depend on
i - j, which lets a bridge find "the augment state at this token" directly.
"""

from __future__ import annotations

import torch


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (batch, 1, seq, head_dim) for integer positions of shape (batch, seq)."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, device=positions.device, dtype=torch.float32) / half))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (batch, seq, half)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (batch, 1, seq, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (batch, heads, seq, head_dim) by the given angles (half-split layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
