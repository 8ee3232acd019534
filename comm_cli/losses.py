"""Next-token cross-entropy, the one loss every part of comm computes (training, validation,
evaluation, the composition's own ``labels=`` argument).

Only positions whose next label carries loss are scored. Three entry points, from the cheapest:

- ``hidden_states_loss``: final hidden states + the model's output head; the head runs only at
  the loss positions, in chunks (``comm_cli.linear_ce``), so no (batch, seq, vocab) tensor exists;
- ``kept_logits_loss``: logits the model computed at the loss positions only
  (``logits_to_keep=loss_mask(labels)``);
- ``next_token_loss``: logits at every position (generation-style outputs, a user's own logits).

All three give the same value (float32) and the same gradients. ``causal_lm_loss`` runs a causal
LM the cheapest way its head allows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from comm_cli.linear_ce import linear_cross_entropy
from comm_cli.output_head import OutputHead, keeps_loss_logits, output_head

# Label of a position that carries no loss (prompt tokens, padding); PyTorch's default ignore_index.
IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum")


def loss_mask(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: position t predicts a loss-carrying label at t + 1 (the last column
    predicts nothing). In transformers' ``logits_to_keep`` form."""
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def loss_targets(labels: torch.Tensor) -> torch.Tensor:
    """The loss-carrying next-token labels, in ``loss_mask`` order (row-major)."""
    shifted = labels[:, 1:]
    return shifted[shifted != IGNORE_INDEX]


def loss_token_count(labels: torch.Tensor) -> torch.Tensor:
    """How many next-token predictions in ``labels`` carry loss."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def _reduce(total: torch.Tensor, count: int, reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return total / count if reduction == "mean" else total


def kept_logits_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (float32) of logits computed only at the loss positions (N, vocab) against
    their targets (N,)."""
    total = F.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")
    return _reduce(total, targets.numel(), reduction)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting ``labels[:, t + 1]`` from ``logits[:, t]`` over labels != -100,
    computed in float32. ``reduction="sum"`` lets callers normalise by the tokens of a whole
    (accumulated, multi-process) batch rather than per micro-batch."""
    labels = labels.to(logits.device)
    selected = logits[loss_mask(labels)]
    return kept_logits_loss(selected, loss_targets(labels), reduction)


def hidden_states_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: OutputHead,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy from final hidden states (batch, seq, width) and the model's output
    head, computed only at loss positions and never holding more than a chunk of logits
    (``backend``: see ``comm_cli.linear_ce``)."""
    labels = labels.to(hidden.device)
    targets = loss_targets(labels)
    total = linear_cross_entropy(hidden[loss_mask(labels)], head, targets, backend)
    return _reduce(total, targets.numel(), reduction)


def causal_lm_loss(model, inputs: dict, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The next-token loss of a causal LM over ``inputs`` without its full logits: its base model's
    hidden states through its head at the loss positions only, or, for a head comm cannot apply
    itself, the logits of those positions (or, where the model cannot keep only them, all)."""
    head = output_head(model)
    if head is not None:
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
        return hidden_states_loss(hidden, labels, head, reduction)
    if keeps_loss_logits(model):
        logits = model(**inputs, use_cache=False, logits_to_keep=loss_mask(labels)).logits
        return kept_logits_loss(logits, loss_targets(labels.to(logits.device)), reduction)
    return next_token_loss(model(**inputs, use_cache=False).logits, labels, reduction)
