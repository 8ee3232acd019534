"""Next-token cross-entropy, the one loss every part of comm computes (training, validation,
evaluation, the composition's own ``labels=`` argument)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Label of a position that carries no loss (prompt tokens, padding); PyTorch's default ignore_index.
IGNORE_INDEX = -100


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting ``labels[:, t + 1]`` from ``logits[:, t]`` over labels != -100,
    computed in float32. ``reduction="sum"`` lets callers normalise by the tokens of a whole
    (accumulated, multi-process) batch rather than per micro-batch."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def loss_token_count(labels: torch.Tensor) -> torch.Tensor:
    """How many next-token predictions in ``labels`` carry loss."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()
