"""Text in, text out: a composition driven by strings, whatever tokenizers its models read with.

``encode`` builds everything ``ComposedModel.forward`` takes from texts (and completions), the
way comm's data pipeline does (``comm_cli.compose.encoding``): the anchor's ids and masks, labels,
and for an augmenting model with its own tokenizer its own tokens and the character alignment.
``generate_text`` tokenizes prompts as training did (``[bos] + prompt``), generates through the
KV-cached loop and returns the decoded continuations. Both need the composition's tokenizers
(``use_tokenizers``; ``from_pretrained`` attaches them by itself).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from comm_cli.compose.encoding import CompletionCollator, augment_pad_ids, encode_example
from comm_cli.errors import ConfigError

logger = logging.getLogger(__name__)

NO_LIMIT = 1 << 30


def anchor_tokenizer(model):
    """The composition's anchor tokenizer, or one line naming how to attach it."""
    tokenizer = getattr(model, "anchor_tokenizer", None)
    if tokenizer is None:
        raise ConfigError(
            "this composition has no tokenizers attached: call model.use_tokenizers(anchor_tokenizer, "
            "[augment_tokenizer, ...]) first (a composition loaded with from_pretrained attaches its own)"
        )
    return tokenizer


def _as_list(texts) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("give one text or a non-empty list of texts")
    return texts


def pad_id(tokenizer) -> int:
    """The id padding gets (never attended): the pad token, else eos, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def to_device(batch: dict, device) -> dict:
    """A batch (nested augment inputs included) on ``device``."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device)
        elif isinstance(value, list):
            out[key] = [None if v is None else {k: t.to(device) for k, t in v.items()} for v in value]
        else:
            out[key] = value
    return out


def encode(
    model,
    texts: str | Sequence[str],
    completions: str | Sequence[str] | None = None,
    *,
    add_bos: bool = True,
    add_eos: bool | None = None,
    max_length: int | None = None,
    padding_side: str = "right",
) -> dict:
    """A batch for ``model(**batch)``: ``texts`` alone are scored as text (``labels`` on every
    token), ``texts`` with ``completions`` as prompt/completion pairs (``labels`` on the completion
    only, ``[eos]`` after it by default, as training builds them)."""
    tokenizer = anchor_tokenizer(model)
    texts = _as_list(texts)
    text_format = completions is None
    bodies = texts if text_format else _as_list(completions)
    if len(bodies) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(bodies)} completions: give one completion per text")
    add_eos = (not text_format) if add_eos is None else add_eos
    eos = tokenizer.eos_token_id if add_eos else None
    if add_eos and eos is None:
        raise ConfigError("add_eos=True but the anchor's tokenizer has no eos token: pass add_eos=False")
    body_ids = tokenizer(bodies, add_special_tokens=False)["input_ids"]
    prompt_ids = (
        [[] for _ in texts] if text_format else tokenizer(texts, add_special_tokens=False)["input_ids"]
    )
    plan = model.read_plan()
    examples = []
    for text, body, prompt, ids in zip(texts, bodies, prompt_ids, body_ids):
        segments = [text] if text_format else [text, body]
        example = encode_example(
            prompt,
            ids,
            segments,
            text_format=text_format,
            bos=tokenizer.bos_token_id if add_bos else None,
            eos=eos,
            max_length=max_length or NO_LIMIT,
            plan=plan,
        )
        if example.pop("truncated"):
            logger.warning("a text longer than max_length=%d tokens was cut on the right", max_length)
        example.pop("has_loss")
        examples.append(example)
    collate = CompletionCollator(
        pad_id(tokenizer), padding_side=padding_side, augment_pad_ids=augment_pad_ids(plan)
    )
    return to_device(collate(examples), next(model.anchor.parameters()).device)


@torch.no_grad()
def generate_text(
    model,
    prompts: str | Sequence[str],
    *,
    add_bos: bool = True,
    return_dict: bool = False,
    **options,
):
    """Continuations of ``prompts`` (decoded, cut at eos), greedy unless ``do_sample=True``;
    ``options`` are ``comm_cli.compose.generation.generate``'s (``max_new_tokens``, ``temperature``,
    ``top_p``, ``streamer``, ...). ``return_dict=True``: the GenerationOutput, ``texts`` filled."""
    from comm_cli.compose.generation import generate

    tokenizer = anchor_tokenizer(model)
    prompts = _as_list(prompts)
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    if add_bos and tokenizer.bos_token_id is not None:
        ids = [[tokenizer.bos_token_id, *row] for row in ids]
    width = max(len(row) for row in ids)
    pad = pad_id(tokenizer)
    device = next(model.anchor.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
    options.setdefault("eos_token_id", tokenizer.eos_token_id)
    options.setdefault("pad_token_id", pad)
    out = generate(model, input_ids, mask, prompts=prompts, return_dict=True, **options)
    out.texts = decode_new(tokenizer, out.new_tokens, options["eos_token_id"])
    return out if return_dict else out.texts


def decode_new(tokenizer, new_tokens: torch.Tensor, eos) -> list[str]:
    """Each row's generated text, up to its first eos."""
    stops = set([eos] if isinstance(eos, int) else list(eos or []))
    texts = []
    for row in new_tokens.tolist():
        cut = next((i for i, token in enumerate(row) if token in stops), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts
