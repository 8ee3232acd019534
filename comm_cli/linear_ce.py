"""Cross-entropy of an LM head over hidden states, without the (tokens, vocab) logits tensor.

With a 128k vocabulary the float32 logits of 8 x 1024 tokens take 4 GiB, and autograd keeps
about three tensors of that size (the logits, their log-softmax and its gradient). Here the
head is applied to a chunk of rows at a time; each chunk's logits live only while its loss and
its gradient with respect to the hidden states (and the head's weight and bias, when those
train) are computed, and the gradients are kept (they are the size of the inputs, not of the
vocabulary). Backward only scales them by the incoming gradient. The matmuls are the same two
an unfused head + cross-entropy does (logits forward, hidden-state gradient backward).

Backends (``COMM_LINEAR_CE`` or the ``backend`` argument):

- ``torch``: the chunked function below, on every device;
- ``liger``: Liger Kernel's fused linear cross-entropy (CUDA, ``pip install liger-kernel``);
- ``cce``: Apple's Cut Cross-Entropy (CUDA, ``pip install cut-cross-entropy``);
- ``auto`` (default): on CUDA the first of liger, cce that is installed, else torch.

Liger comes first because it computes exact float32 gradients; Cut Cross-Entropy by default
skips gradient entries below a threshold. Neither has been measured against the torch backend
yet (no GPU was available when this was written): see docs/performance.md, "Logits only where the loss is".
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from comm_cli.errors import ConfigError
from comm_cli.output_head import OutputHead

BACKENDS = ("auto", "torch", "liger", "cce")
BACKEND_ENV = "COMM_LINEAR_CE"
# Bytes of float32 logits per chunk: small beside a model, large enough for efficient matmuls.
CHUNK_BYTES = 64 * 2**20


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so one chunk's float32 logits take about ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * vocab))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``head(hidden)`` against ``targets`` (every row carries loss),
    gradients computed chunk by chunk in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, softcap, rows_per_chunk):
        want_hidden, want_weight, want_bias = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            h = hidden[rows].to(weight.dtype)
            target = targets[rows]
            # the model computes its logits in its own dtype; the loss reads them in float32
            logits = torch.nn.functional.linear(h, weight, bias).float()
            if scale != 1.0:
                logits.mul_(scale)
            capped = None
            if softcap is not None:
                capped = logits.div_(softcap).tanh_()  # tanh(z / cap), kept for its derivative
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
            if not (want_hidden or want_weight or want_bias):
                continue
            # d loss / d logits = softmax - one_hot(target), written over the logits' buffer
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(grad.shape[0], device=grad.device), target] -= 1.0
            if capped is not None:
                grad.mul_(1.0 - capped * capped)
            if scale != 1.0:
                grad.mul_(scale)
            if want_bias:
                grad_bias += grad.sum(0)
            grad = grad.to(weight.dtype)
            if want_hidden:
                grad_hidden[rows] = (grad @ weight).to(hidden.dtype)
            if want_weight:
                grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_total).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def torch_linear_cross_entropy(
    hidden: torch.Tensor, head: OutputHead, targets: torch.Tensor, rows_per_chunk: int | None = None
) -> torch.Tensor:
    """Summed cross-entropy of ``head`` over ``hidden`` (N, width) against ``targets`` (N,), in
    chunks of ``rows_per_chunk`` rows (default: about 64 MiB of float32 logits per chunk)."""
    rows = rows_per_chunk or chunk_rows(head.weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(
        hidden, head.weight, head.bias, targets, float(head.scale), head.softcap, rows
    )


def _liger(hidden, head: OutputHead, targets):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    hidden = hidden.to(head.weight.dtype)
    if head.scale != 1.0:  # (s * h) @ W.T == s * (h @ W.T); no listed head has both a scale and a bias
        hidden = hidden * head.scale
    out = liger_fused_linear_cross_entropy(
        hidden, head.weight, targets, bias=head.bias, reduction="sum", softcap=head.softcap
    )
    out = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
    return out.float()


def _cce(hidden, head: OutputHead, targets):
    from cut_cross_entropy import linear_cross_entropy

    hidden = hidden.to(head.weight.dtype)
    if head.scale != 1.0:
        hidden = hidden * head.scale
    out = linear_cross_entropy(
        hidden, head.weight, targets, bias=head.bias, softcap=head.softcap, reduction="sum"
    )
    return out.float()


_LIBRARIES = {
    "liger": ("liger_kernel", "liger-kernel", _liger),
    "cce": ("cut_cross_entropy", "cut-cross-entropy", _cce),
}


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def select_backend(device: torch.device | str, head: OutputHead, backend: str | None = None) -> str:
    """Which backend computes the loss on ``device`` (``backend`` or ``$COMM_LINEAR_CE``, default
    auto). A library backend named explicitly must be usable, or this says what to change."""
    name = (backend or os.environ.get(BACKEND_ENV) or "auto").lower()
    if name not in BACKENDS:
        raise ConfigError(f"{BACKEND_ENV}={name!r} is not one of {', '.join(BACKENDS)}: pick one of them")
    cuda = torch.device(device).type == "cuda"
    fits = head.scale == 1.0 or head.bias is None
    if name == "auto":
        if cuda and fits:
            for library, (module, _, _) in _LIBRARIES.items():
                if _installed(module):
                    return library
        return "torch"
    if name == "torch":
        return name
    module, package, _ = _LIBRARIES[name]
    if not cuda:
        raise ConfigError(f"{BACKEND_ENV}={name} needs a CUDA device: unset it or set {BACKEND_ENV}=torch")
    if not _installed(module):
        raise ConfigError(
            f"{BACKEND_ENV}={name} needs {package}: pip install {package}, or set {BACKEND_ENV}=torch"
        )
    if not fits:
        raise ConfigError(
            f"{BACKEND_ENV}={name} cannot apply a logit scale after a bias: set {BACKEND_ENV}=torch"
        )
    return name


def backend_function(name: str) -> Callable:
    """The loss function of a backend: (hidden (N, width), head, targets (N,)) -> summed loss."""
    if name == "torch":
        return torch_linear_cross_entropy
    return _LIBRARIES[name][2]


def linear_cross_entropy(
    hidden: torch.Tensor, head: OutputHead, targets: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """Summed float32 cross-entropy of ``head`` applied to ``hidden`` (N, width) against
    ``targets`` (N,), every row carrying loss, never holding more than a chunk of logits."""
    if hidden.shape[0] == 0:
        return hidden.sum(dtype=torch.float32) * 0.0  # keeps the graph (and DDP) connected
    return backend_function(select_backend(hidden.device, head, backend))(hidden, head, targets)
