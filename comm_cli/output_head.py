"""The output head of a Hugging Face causal LM, described so comm can apply it itself.

Computing the loss only where labels carry it, in chunks, means applying the LM head to chosen
hidden states outside the model's own forward (which would compute every logit). Most heads are
one linear layer; some architectures apply extras after it, and those must be reproduced or the
loss changes:

- Gemma 2 / Gemma 3: final logit soft-capping, ``cap * tanh(logits / cap)``;
- Cohere: ``logits * logit_scale``; Granite: ``logits / logits_scaling``;
- tied embeddings need nothing special: the head's weight *is* the embedding matrix.

Only model types whose head is known (read from transformers' ``*ForCausalLM.forward``) are
described; any other model gets ``None``, and comm asks the model itself for the logits at the
loss positions instead (``logits_to_keep``), which is exact for any head.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Causal LMs whose forward is `lm_head(base_model(...).last_hidden_state)` and nothing more.
PLAIN_HEADS = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "phi",
        "phi3",
        "olmo",
        "olmo2",
        "stablelm",
        "starcoder2",
        "smollm3",
        "gpt2",
        "gpt_bigcode",
        "gptj",
        "codegen",
        "bloom",
        "falcon",
        "gpt_neox",
        "opt",
    }
)
# ... then `cap * tanh(logits / cap)` with cap = config.final_logit_softcapping (None: no cap).
SOFTCAPPED_HEADS = frozenset({"gemma2", "gemma3_text"})
# ... then `logits * model.logit_scale`.
LOGIT_SCALE_HEADS = frozenset({"cohere", "cohere2"})
# ... then `logits / config.logits_scaling`.
LOGITS_SCALING_HEADS = frozenset({"granite", "granitemoe", "granitemoeshared"})


@dataclass(frozen=True)
class OutputHead:
    """``logits = softcap(scale * (hidden @ weight.T + bias))``, the way the model computes them."""

    weight: torch.Tensor  # (vocab, width)
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head applied to ``hidden`` (..., width), in the weight's dtype (the reference the
        chunked loss is tested against)."""
        logits = F.linear(hidden.to(self.weight.dtype), self.weight, self.bias)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _unwrap(model: nn.Module) -> nn.Module:
    """The causal LM inside DDP (``.module``) or PEFT (``get_base_model()``) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _sharded(weight: torch.Tensor) -> bool:
    """A DTensor (FSDP2 outside its module's forward, tensor parallelism) or a DeepSpeed ZeRO-3
    partitioned parameter: not a whole matrix that a matmul here could use."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        DTensor = ()  # noqa: N806
    return isinstance(weight, DTensor) or hasattr(weight, "ds_id")


def knows_head(model: nn.Module) -> bool:
    """Whether this causal LM's forward computes its logits from its base model's last hidden
    state as described here (so the head can be applied, or positions selected, outside it)."""
    model_type = getattr(_unwrap(model).config, "model_type", None)
    return model_type in PLAIN_HEADS | SOFTCAPPED_HEADS | LOGIT_SCALE_HEADS | LOGITS_SCALING_HEADS


def output_head(model: nn.Module) -> OutputHead | None:
    """The head of a causal LM, or None when comm does not know how this architecture computes
    its logits, or when its weight is not a whole matrix here (e.g. partitioned by DeepSpeed
    ZeRO-3 outside the module's own forward)."""
    model = _unwrap(model)
    if not knows_head(model):
        return None
    linear = model.get_output_embeddings()
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0 or _sharded(weight):
        return None
    config = model.config
    model_type = config.model_type
    scale, softcap = 1.0, None
    if model_type in SOFTCAPPED_HEADS:
        softcap = getattr(config, "final_logit_softcapping", None)
    elif model_type in LOGIT_SCALE_HEADS:
        scale = float(getattr(model, "logit_scale", config.logit_scale))
    elif model_type in LOGITS_SCALING_HEADS:
        scale = 1.0 / float(config.logits_scaling)
    return OutputHead(weight=weight, bias=getattr(linear, "bias", None), scale=scale, softcap=softcap)


@functools.cache
def logits_mask_supported() -> bool:
    """Whether this transformers' ``logits_to_keep`` takes a (batch, seq) bool mask and returns the
    logits of the True positions only, (count, vocab) (transformers 5)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep

        kept = slice_logits_to_keep(torch.zeros(1, 2, 1), torch.tensor([[True, False]]))
    except (ImportError, IndexError, RuntimeError, TypeError):
        return False
    return tuple(kept.shape) == (1, 1)


def keeps_loss_logits(model: nn.Module) -> bool:
    """Whether ``model(..., logits_to_keep=loss_mask(labels))`` returns the logits of exactly the
    loss positions, with the model's own head and extras (DDP/FSDP/PEFT wrappers included)."""
    return knows_head(model) and logits_mask_supported()
