"""Pad tokenised examples into the tensors ``ComposedModel.forward`` takes.

Left and right padding both work because the composition computes positions from the attention
mask and masks cross-attention by column (see ``comm_cli/compose/masks.py``): the logits on real
tokens do not depend on the side. Right padding is the usual choice for training; left padding is
what batched generation needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from comm_cli.errors import DataError
from comm_cli.losses import IGNORE_INDEX

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
        from comm_cli.compose.alignment import TokenizedText, pad_reads

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
