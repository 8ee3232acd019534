"""Greedy answers of a plain causal LM or a composition to a list of prompts, for the
experiment's own measurements (the anchor's city skill, the specialist's recall) and the
attention pictures. The table itself is scored by ``comm-eval``."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_padded(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids (no special tokens added: the prompts carry their own chat markup) left-padded."""
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def greedy_answers(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 64
) -> list[str]:
    """The greedy continuation of every prompt, cut at the tokenizer's eos."""
    from comm_cli.compose import ComposedModel

    eos = tokenizer.eos_token_id
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_padded(tokenizer, prompts[start : start + batch_size])
        if isinstance(model, ComposedModel):
            out = model.generate(
                ids,
                mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        else:
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row in out[:, ids.shape[1] :].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers
