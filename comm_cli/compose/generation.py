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
    texts: list[str] | None = None  # the decoded continuations (generate(prompts=...) fills them)

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
    prompts: Sequence[str] | None = None,
    stopping: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    streamer=None,
) -> torch.Tensor | GenerationOutput:
    """Generate up to ``max_new_tokens`` after each prompt row.

    Rows stop at an ``eos_token_id`` (int or list) and are then filled with ``pad_token_id``.
    ``stopping(sequences, prompt_length)`` -> bool (batch,) marks further rows as done after each
    step (e.g. a stop string has appeared in their text; evaluation uses it). Right-padded prompts
    are moved to left padding first. ``streamer`` (transformers' protocol, e.g. its TextStreamer
    for one row) gets ``put(prompt ids)``, then ``put(new tokens)`` (batch,) after every step and
    ``end()`` at the end. Returns the sequences (prompt + new tokens), or a GenerationOutput with
    ``return_dict=True``.

    A composition with an augmenting model that has its own tokenizer also needs the prompt
    texts (``prompts``, one per row, the texts ``input_ids`` were made from): the augment reads
    the text through its own tokenizer, and in causal mode each token of it is fed (through its
    KV cache) as soon as the generated text makes it final, never before.
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
    feed = None
    if getattr(model, "aligned", False) and model._bridges_enabled:
        if prompts is None or len(prompts) != input_ids.shape[0]:
            from comm_cli.errors import TokenizerMismatchError

            raise TokenizerMismatchError(
                "this composition reads text through more than one tokenizer: generate from text with "
                "model.generate(prompts=[...]), or pass prompts=[...] (one per row, the texts input_ids were made from)"
            )
        feed = AlignedFeed(model, list(prompts), input_ids, attention_mask)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    try:
        if max_new_tokens > 0:
            extra = feed.first() if feed is not None else {}
            out = model(
                input_ids, attention_mask, cache=cache, use_cache=use_cache, logits_to_keep=1, **extra
            )
        for step in range(max_new_tokens):
            logits = out.logits[:, -1, :].float()
            if output_scores:
                scores.append(logits)
            if do_sample:
                probs = torch.softmax(warpers(sequences, logits), dim=-1)
                next_tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
            else:
                next_tokens = logits.argmax(dim=-1)
            unfinished_before = unfinished
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            if eos_tensor is not None:
                unfinished = unfinished & ~torch.isin(next_tokens, eos_tensor)
            if stopping is not None:
                unfinished = unfinished & ~stopping(sequences, prompt_length).to(unfinished.device)
            if step == max_new_tokens - 1 or not bool(unfinished.any()):
                break
            if feed is not None:
                feed.push(next_tokens, unfinished_before)
            if use_cache:
                extra = feed.step() if feed is not None else {}
                out = model(next_tokens[:, None], attention_mask, cache=cache, use_cache=True, **extra)
            else:
                augment_mask = None
                if model.mask_mode == "prompt":
                    augment_mask = torch.cat(
                        [prompt_mask, torch.zeros_like(attention_mask[:, prompt_length:])], dim=1
                    )
                extra = feed.whole() if feed is not None else {}
                out = model(
                    sequences, attention_mask, augment_attention_mask=augment_mask, logits_to_keep=1, **extra
                )
    finally:
        model.train(was_training)
        if streamer is not None:
            streamer.end()
    if not return_dict:
        return sequences
    return GenerationOutput(
        sequences=sequences,
        attention_mask=attention_mask,
        prompt_length=prompt_length,
        scores=scores if output_scores else None,
    )


class AlignedFeed:
    """What an augmenting model with its own tokenizer reads while the anchor generates.

    Per row it keeps the prompt text, the anchor tokens generated so far and the text they spell
    (``GeneratedText``), and per aligned augment the tokens final so far and how many of them were
    fed. ``first()`` gives the prompt's inputs, ``step()`` the new token's end and the augment
    tokens that became final with it (possibly none), ``whole()`` everything for an uncached
    forward over the text so far: the reference ``step()`` must match.

    Both paths go through ``push()``, which checks that the tokens final before are still final,
    unchanged, and that no token became final at a text length an earlier anchor token already
    had: then the cached and the uncached path read the same tokens at every anchor token, and a
    text on which a tokenizer breaks comm's rule stops both alike, in one line.
    """

    def __init__(self, model, prompts: list[str], input_ids: torch.Tensor, attention_mask: torch.Tensor):
        from comm_cli.compose.alignment import GeneratedText
        from comm_cli.compose.encoding import prompt_ends

        self.model, self.prompts = model, prompts
        self.device = input_ids.device
        self.prompt_width = input_ids.shape[1]
        self.prompt_ends = [
            prompt_ends(model.anchor_reader, prompt, ids[mask.bool()].tolist())
            for prompt, ids, mask in zip(prompts, input_ids, attention_mask)
        ]
        self.texts = [GeneratedText(model.anchor_tokenizer, len(prompt)) for prompt in prompts]
        self.ends: list[list[int]] = [[] for _ in prompts]  # ends of generated tokens per row
        self.final: list[list] = [[None for _ in prompts] for _ in model.augment_readers]
        self.fed: list[list[int]] = [[0 for _ in prompts] for _ in model.augment_readers]
        self.last_end = [len(prompt) for prompt in prompts]
        self._advance(list(self.last_end))

    def _pad_id(self, reader) -> int:
        pad = reader.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0

    def _causal(self):
        return [
            (k, reader)
            for k, reader in enumerate(self.model.augment_readers)
            if reader is not None and self.model.mask_mode == "causal"
        ]

    def _advance(self, before_ends: list[int]) -> None:
        """Recompute each row's final tokens and check them against what was final before (at
        text lengths up to ``before_ends``)."""
        from comm_cli.compose.alignment import TokenizerAlignmentError

        for k, reader in self._causal():
            for row, prompt in enumerate(self.prompts):
                now = reader.settled_prefix([prompt, self.texts[row].text])
                before = self.final[k][row]
                if before is not None:
                    n = len(before.ids)
                    kept = (now.ids[:n], now.ends[:n], now.settled_at[:n]) == (
                        before.ids,
                        before.ends,
                        before.settled_at,
                    )
                    if not kept or any(s <= before_ends[row] for s in now.settled_at[n:]):
                        raise TokenizerAlignmentError(
                            f"the tokenizer of {reader.name} ({reader.components}) changed tokens it had made final once "
                            f"the anchor wrote {self.texts[row].text[-20:]!r}, against comm's rule for when its tokens "
                            "are final: use mask_mode=prompt with this tokenizer, or another tokenizer"
                        )
                self.final[k][row] = now

    def _prompt_reads(self, reader):
        return [reader.read([prompt], add_suffix=True, complete=True) for prompt in self.prompts]

    def _anchor_ends(self, with_prompt: bool = True) -> torch.Tensor:
        """Ends of every anchor column so far, left-padded like the ids."""
        rows = [(p if with_prompt else []) + e for p, e in zip(self.prompt_ends, self.ends)]
        width = self.prompt_width + len(self.ends[0])
        out = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)  # left padding, as the ids
        return out.to(self.device)

    def _inputs(self, reads_of, left: bool = False) -> list:
        """Padded inputs per augment: None for one that reads the anchor's ids, else the prompt's
        reads (prompt mode) or ``reads_of(k, reader)``."""
        from comm_cli.compose.encoding import pad_reads

        inputs = []
        for k, reader in enumerate(self.model.augment_readers):
            if reader is None:
                inputs.append(None)
                continue
            reads = self._prompt_reads(reader) if self.model.mask_mode == "prompt" else reads_of(k, reader)
            inputs.append(_to(pad_reads(reads, self._pad_id(reader), left=left), self.device))
        return inputs

    def first(self) -> dict:
        def final_so_far(k, reader):
            self.fed[k] = [len(read.ids) for read in self.final[k]]
            return list(self.final[k])

        inputs = self._inputs(final_so_far, left=True)
        return {"anchor_ends": self._anchor_ends(with_prompt=True), "augment_inputs": inputs}

    def push(self, tokens: torch.Tensor, unfinished: torch.Tensor) -> None:
        """Record the token each row generated (finished rows generate padding, which adds no text)."""
        before = list(self.last_end)
        for row, (token, alive) in enumerate(zip(tokens.tolist(), unfinished.tolist())):
            if alive:
                self.last_end[row] = self.texts[row].push(token)
            self.ends[row].append(self.last_end[row])
        self._advance(before)

    def step(self) -> dict:
        """The last token's end, and the augment tokens it made final."""
        from comm_cli.compose.alignment import TokenizedText
        from comm_cli.compose.encoding import pad_reads

        inputs = []
        for k, reader in enumerate(self.model.augment_readers):
            if reader is None or self.model.mask_mode == "prompt":
                inputs.append(None if reader is None else _empty(self.device))
                continue
            new_reads = []
            for row, read in enumerate(self.final[k]):
                n = self.fed[k][row]
                new_reads.append(
                    TokenizedText(read.ids[n:], read.ends[n:], read.settled_at[n:], read.prompt_mask[n:])
                )
                self.fed[k][row] = len(read.ids)
            inputs.append(_to(pad_reads(new_reads, self._pad_id(reader)), self.device))
        ends = torch.tensor([[e[-1]] for e in self.ends], dtype=torch.long, device=self.device)
        return {"anchor_ends": ends, "augment_inputs": inputs}

    def whole(self) -> dict:
        """Inputs for an uncached forward over the prompt and everything generated so far."""

        def everything(k, reader):
            return [reader.read([prompt, text.text]) for prompt, text in zip(self.prompts, self.texts)]

        return {
            "anchor_ends": self._anchor_ends(with_prompt=True),
            "augment_inputs": self._inputs(everything),
        }


def _to(batch: dict, device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def _empty(device) -> dict:
    empty = torch.zeros((0, 0), dtype=torch.long, device=device)
    return {"input_ids": empty, "attention_mask": empty, "settled_at": empty, "ends": empty}
