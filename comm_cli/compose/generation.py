"""Generation for a composition: greedy or sampled, batched, KV-cached.

The anchor and every augmenting model keep their own KV cache. In causal mode each new token
goes through each augmenting model incrementally (only up to its last connected layer; the
paper's iterative decoding) and the bridges append its keys/values to theirs; in prompt mode
the augmenting models read the prompt once. ``use_cache=False`` recomputes the whole sequence
at every step: slow, but the reference the cached path must match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (batch, prompt + new), left-padded prompt
    attention_mask: torch.Tensor
    prompt_length: int
    scores: list[torch.Tensor] | None = None  # per step (batch, vocab) float32 logits before sampling

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]


def to_left_padding(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the right end (generation appends there)."""
    if not bool((attention_mask[:, -1] == 0).any()):
        return input_ids, attention_mask
    batch, length = input_ids.shape
    new_ids = torch.full_like(input_ids, pad_token_id)
    new_mask = torch.zeros_like(attention_mask)
    for row in range(batch):
        real = input_ids[row][attention_mask[row].bool()]
        n = real.shape[0]
        if n:
            new_ids[row, length - n :] = real
            new_mask[row, length - n :] = 1
    return new_ids, new_mask


def _as_list(token_ids: int | Sequence[int] | None) -> list[int]:
    if token_ids is None:
        return []
    return [int(token_ids)] if isinstance(token_ids, int) else [int(t) for t in token_ids]


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    output_scores: bool = False,
    return_dict: bool = False,
    stopping: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor | GenerationOutput:
    """Generate up to ``max_new_tokens`` after each prompt row.

    Rows stop at an ``eos_token_id`` (int or list) and are then filled with ``pad_token_id``.
    ``stopping(sequences, prompt_length)`` -> bool (batch,) marks further rows as done after each
    step (e.g. a stop string has appeared in their text; evaluation uses it). Right-padded prompts
    are moved to left padding first. Returns the sequences (prompt +
    new tokens), or a GenerationOutput with ``return_dict=True``.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    generation_config = getattr(model.anchor, "generation_config", None)
    if eos_token_id is None and generation_config is not None:
        eos_token_id = generation_config.eos_token_id
    eos = _as_list(eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(generation_config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    input_ids, attention_mask = to_left_padding(input_ids, attention_mask.long(), pad_token_id)
    prompt_mask = attention_mask
    prompt_length = input_ids.shape[1]

    warpers = LogitsProcessorList()
    if do_sample:
        if temperature is not None and temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))

    was_training = model.training
    model.eval()
    sequences = input_ids
    scores: list[torch.Tensor] = []
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    eos_tensor = torch.tensor(eos, device=input_ids.device, dtype=input_ids.dtype) if eos else None
    cache = model.new_cache() if use_cache else None
    try:
        if max_new_tokens > 0:
            out = model(input_ids, attention_mask, cache=cache, use_cache=use_cache, logits_to_keep=1)
        for step in range(max_new_tokens):
            logits = out.logits[:, -1, :].float()
            if output_scores:
                scores.append(logits)
            if do_sample:
                probs = torch.softmax(warpers(sequences, logits), dim=-1)
                next_tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
            else:
                next_tokens = logits.argmax(dim=-1)
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            if eos_tensor is not None:
                unfinished = unfinished & ~torch.isin(next_tokens, eos_tensor)
            if stopping is not None:
                unfinished = unfinished & ~stopping(sequences, prompt_length).to(unfinished.device)
            if step == max_new_tokens - 1 or not bool(unfinished.any()):
                break
            if use_cache:
                out = model(next_tokens[:, None], attention_mask, cache=cache, use_cache=True)
            else:
                augment_mask = None
                if model.mask_mode == "prompt":
                    augment_mask = torch.cat(
                        [prompt_mask, torch.zeros_like(attention_mask[:, prompt_length:])], dim=1
                    )
                out = model(sequences, attention_mask, augment_attention_mask=augment_mask, logits_to_keep=1)
    finally:
        model.train(was_training)
    if not return_dict:
        return sequences
    return GenerationOutput(
        sequences=sequences,
        attention_mask=attention_mask,
        prompt_length=prompt_length,
        scores=scores if output_scores else None,
    )
