"""From text to what ``ComposedModel.forward`` takes, one way for training, evaluation and users.

comm's data pipeline (``comm_cli.data.tokenize``) and ``ComposedModel.encode`` both go through
here, so a composition reads a text the same way whichever path built its batch:

- ``encode_example``: one example's anchor ids, labels and prompt mask (``[bos] + prompt +
  completion + [eos]``, prompt and completion tokenised apart so their boundary is exact), and,
  with a ``ReadPlan`` in which augmenting models read their own tokens, the anchor tokens'
  character ends and each such augment's own tokens (``comm_cli.compose.alignment``);
- ``CompletionCollator``: examples padded into tensors (left or right; the logits on real tokens
  do not depend on the side);
- ``pad_reads`` / ``prompt_ends``: the same for augment tokens and generated prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from comm_cli.compose.alignment import ReadPlan, TokenizedText, TokenReader, check_final_tokens
from comm_cli.errors import DataError
from comm_cli.losses import IGNORE_INDEX


def pad_reads(reads: Sequence[TokenizedText], pad_id: int, left: bool = False, min_length: int = 0) -> dict:
    """Pad one augmenting model's reads of a batch of texts into ``augment_inputs[k]`` tensors
    (``input_ids``, ``attention_mask``, ``settled_at``, ``ends``). Padding is never attended;
    its ``settled_at`` is past any text so it could not be read even if it were. ``min_length=1``
    (training batches) keeps one padding column when no row has a token: the bridges then read
    nothing (their output is zeroed) yet stay in the graph, so the loss still has a gradient."""
    length = max(max((len(r) for r in reads), default=0), min_length)
    out = {
        "input_ids": torch.full((len(reads), length), int(pad_id), dtype=torch.long),
        "attention_mask": torch.zeros((len(reads), length), dtype=torch.long),
        "settled_at": torch.full((len(reads), length), 2**30, dtype=torch.long),
        "ends": torch.zeros((len(reads), length), dtype=torch.long),
    }
    for row, read in enumerate(reads):
        n = len(read)
        if n == 0:
            continue
        span = slice(length - n, length) if left else slice(0, n)
        out["input_ids"][row, span] = torch.tensor(read.ids, dtype=torch.long)
        out["attention_mask"][row, span] = 1
        out["settled_at"][row, span] = torch.tensor(read.settled_at, dtype=torch.long)
        out["ends"][row, span] = torch.tensor(read.ends, dtype=torch.long)
    return out


def prompt_ends(reader: TokenReader, prompt: str, ids: Sequence[int]) -> list[int]:
    """Character ends of an anchor prompt's ``ids`` (leading special tokens, then the prompt's own
    tokens, as comm's data pipeline builds them)."""
    own = reader.segment(prompt, final=False)
    extra = len(ids) - len(own.ids)
    if extra < 0 or list(ids[extra:]) != own.ids:
        raise ValueError(
            f"the prompt ids do not end with the anchor's tokenization of the prompt {prompt[:30]!r}: pass the "
            "prompt texts the ids were made from"
        )
    return [0] * extra + own.ends


def augment_pad_ids(plan: ReadPlan | None) -> list[int | None] | None:
    """The pad id of each augmenting model that reads its own tokens (for the collator)."""
    if plan is None:
        return None
    return [None if r is None else (r.tokenizer.pad_token_id or 0) for r in plan.augment_readers]


def encode_example(
    prompt_ids: Sequence[int],
    body_ids: Sequence[int],
    texts: Sequence[str],
    *,
    text_format: bool,
    bos: int | None,
    eos: int | None,
    max_length: int,
    plan: ReadPlan | None = None,
) -> dict:
    """One example as the composition reads it: ``input_ids``, ``labels``, ``prompt_mask``,
    whether it was ``truncated`` at ``max_length`` and whether any token ``has_loss``; with a
    ``plan`` whose augments read their own tokens also ``anchor_ends`` and ``augment{k}_*``.

    ``texts`` are the segments the ids were made from (prompt and completion, or the text)."""
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    prefix = head + list(prompt_ids)
    target = list(body_ids) + tail
    input_ids = prefix + target
    if text_format:
        labels = list(input_ids)
        prompt_mask = [1] * len(input_ids)
    else:
        labels = [IGNORE_INDEX] * len(prefix) + target
        prompt_mask = [1] * len(prefix) + [0] * len(target)
    truncated = len(input_ids) > max_length
    input_ids, labels, prompt_mask = input_ids[:max_length], labels[:max_length], prompt_mask[:max_length]
    example = {
        "input_ids": input_ids,
        "labels": labels,
        "prompt_mask": prompt_mask,
        "truncated": truncated,
        # position 0 is never predicted (the loss shifts labels), so it cannot carry loss
        "has_loss": any(label != IGNORE_INDEX for label in labels[1:]),
    }
    if plan is not None and plan.aligned_indices:
        pieces = [list(body_ids)] if text_format else [list(prompt_ids), list(body_ids)]
        example.update(aligned_columns(plan, texts, pieces, len(head), len(tail), len(input_ids), max_length))
    return example


# Per aligned augment k, the columns augment{k}_<name>.
ALIGNED_FIELDS = ("input_ids", "settled_at", "ends")


def aligned_columns(
    plan: ReadPlan,
    texts: list[str],
    pieces: list[list[int]],
    n_head: int,
    n_tail: int,
    kept: int,
    max_length: int,
) -> dict:
    """The anchor tokens' character ends and each aligned augment's own tokens of one example.

    The anchor's ids are the ones above ([bos] + prompt + completion + [eos]); its reader gives
    the same ids with their spans. Tokens the anchor lost to truncation take their augment
    tokens with them: in causal mode an augment token is kept only if some kept anchor token may
    read it (final by that token's end). An augment tokenizer whose settle rule is not argued
    for (``reader.proven`` false) is checked on this example at every anchor token's end."""
    ends, offset = [0] * n_head, 0
    out = {"anchor_ends": None}
    for text, ids in zip(texts, pieces):
        segment = plan.anchor_reader.segment(text, final=False)
        if segment.ids != ids:
            raise DataError(
                f"the anchor's tokenizer gives other ids through its fast backend than through "
                f"{type(plan.anchor_reader.tokenizer).__name__} for {text[:30]!r}, so their character spans "
                "cannot be trusted: load the anchor's tokenizer.json as a PreTrainedTokenizerFast (tokenizer=DIR)"
            )
        ends += [offset + e for e in segment.ends]
        offset += len(text)
    ends = (ends + [offset] * n_tail)[:kept]
    out["anchor_ends"] = ends
    for k in plan.aligned_indices:
        read = plan.augment_read(k, texts)
        if plan.mask_mode == "causal":
            if not plan.augment_readers[k].proven:  # the rule is not argued for it: check this text
                check_final_tokens(plan.augment_readers[k], texts, ends, whole=read)
            keep = sum(1 for s in read.settled_at if s <= ends[-1])
        else:
            keep = min(len(read), max_length)
        out[f"augment{k}_input_ids"] = read.ids[:keep]
        out[f"augment{k}_settled_at"] = read.settled_at[:keep]
        out[f"augment{k}_ends"] = read.ends[:keep]
    return out


PADDING_SIDES = ("left", "right")


class CompletionCollator:
    """Turn a list of examples into ``input_ids``, ``attention_mask``, ``labels``, ``augment_attention_mask``.

    Each example is a mapping with ``input_ids`` and optionally ``labels`` (default: a copy of
    ``input_ids``) and ``prompt_mask`` (default: all ones), as lists of ints or 1-d tensors, as
    ``tokenize_split`` writes them. Other keys are ignored. Padding gets ``pad_token_id`` in
    ``input_ids``, 0 in both masks and -100 in ``labels``, so it never carries loss and no
    model attends to it. ``augment_attention_mask`` is the prompt mask: the augmenting models' view
    in CALM's "prompt" mask mode (the "causal" mode ignores it).

    ``pad_to_multiple_of`` rounds the batch length up (e.g. to 8 for tensor cores).

    Examples of a composition whose augmenting models read their own tokens (``tokenize_split``
    with a ``ReadPlan``) also carry ``anchor_ends`` and ``augment{k}_*`` columns: they become
    ``anchor_ends`` (padded like ``input_ids``) and ``augment_inputs`` (one dict per augmenting
    model, None for one that reads the anchor's ids), padded on the same side with
    ``augment_pad_ids[k]``.
    """

    def __init__(
        self,
        pad_token_id: int,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        augment_pad_ids: Sequence[int | None] | None = None,
    ):
        if pad_token_id is None:
            raise DataError(
                "the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)"
            )
        if padding_side not in PADDING_SIDES:
            raise DataError(f"padding_side={padding_side!r} is not one of {', '.join(PADDING_SIDES)}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise DataError(f"pad_to_multiple_of={pad_to_multiple_of} must be a positive integer, or null")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.augment_pad_ids = list(augment_pad_ids) if augment_pad_ids is not None else None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("CompletionCollator got an empty batch")
        rows = [_as_list(example["input_ids"]) for example in examples]
        length = max(len(row) for row in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        prompt_mask = torch.zeros((batch, length), dtype=torch.long)
        for i, (example, ids) in enumerate(zip(examples, rows)):
            row_labels = _as_list(example["labels"]) if "labels" in example else ids
            row_prompt = _as_list(example["prompt_mask"]) if "prompt_mask" in example else [1] * len(ids)
            if len(row_labels) != len(ids) or len(row_prompt) != len(ids):
                raise ValueError(
                    f"example {i}: input_ids, labels and prompt_mask differ in length "
                    f"({len(ids)}, {len(row_labels)}, {len(row_prompt)})"
                )
            n = len(ids)
            span = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, span] = 1
            labels[i, span] = torch.tensor(row_labels, dtype=torch.long)
            prompt_mask[i, span] = torch.tensor(row_prompt, dtype=torch.long)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "augment_attention_mask": prompt_mask,
        }
        if "anchor_ends" in examples[0]:
            self._aligned(examples, batch, length)
        return batch

    def _aligned(self, examples, batch: dict, length: int) -> None:
        left = self.padding_side == "left"
        ends = torch.zeros((len(examples), length), dtype=torch.long)
        for i, example in enumerate(examples):
            row = torch.tensor(_as_list(example["anchor_ends"]), dtype=torch.long)
            ends[i, slice(length - len(row), length) if left else slice(0, len(row))] = row
        batch["anchor_ends"] = ends
        count = len(self.augment_pad_ids) if self.augment_pad_ids is not None else 0
        inputs = []
        for k in range(count):
            if f"augment{k}_input_ids" not in examples[0]:
                inputs.append(None)
                continue
            reads = [
                TokenizedText(
                    ids=_as_list(e[f"augment{k}_input_ids"]),
                    ends=_as_list(e[f"augment{k}_ends"]),
                    settled_at=_as_list(e[f"augment{k}_settled_at"]),
                    prompt_mask=[],
                )
                for e in examples
            ]
            inputs.append(pad_reads(reads, self.augment_pad_ids[k] or 0, left=left, min_length=1))
        if not any(x is not None for x in inputs):
            raise ValueError("examples carry anchor_ends but the collator knows no augment_pad_ids")
        batch["augment_inputs"] = inputs


def _as_list(values: Any) -> list[int]:
    if isinstance(values, torch.Tensor):
        return values.tolist()
    return list(values)
