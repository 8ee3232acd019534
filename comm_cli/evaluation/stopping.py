"""Stop sequences for generation: a row is done once one of its stop strings appears in the text
it generated (not in the prompt), and its text is then cut before the stop string.

Code benchmarks and lm-evaluation-harness's ``generate_until`` both need this: a code model keeps
writing after the function body, and the harness says where an answer ends (``until``).
The same criterion serves a composition's ``generate`` and transformers' ``generate``, so a
composition with its bridges off and the anchor alone stop at the same token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StopStrings:
    """``stop(sequences, prompt_length)`` -> bool (batch,): has a stop string appeared in the new text."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        # A stop string that just appeared ends within the last len(stop) tokens (a token is at
        # least one character); a few more cover byte-level tokens that split a character.
        self.window = max((len(s) for s in self.stops), default=0) + 4

    def __call__(self, sequences: torch.Tensor, prompt_length: int) -> torch.Tensor:
        done = torch.zeros(sequences.shape[0], dtype=torch.bool)
        if not self.stops:
            return done
        new = sequences[:, prompt_length:]
        start = max(0, new.shape[1] - self.window)
        texts = self.tokenizer.batch_decode(new[:, start:].tolist(), skip_special_tokens=True)
        for row, text in enumerate(texts):
            done[row] = any(stop in text for stop in self.stops)
        return done

    def for_transformers(self, prompt_length: int):
        """The same criterion as a transformers ``StoppingCriteria`` (for plain models' ``generate``)."""
        return as_transformers_criteria(self, prompt_length)


def as_transformers_criteria(stop, prompt_length: int):
    """Any ``stop(sequences, prompt_length) -> done rows`` as a transformers ``StoppingCriteria``."""
    from transformers import StoppingCriteria

    class _Criteria(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop(input_ids, prompt_length).to(input_ids.device)

    return _Criteria()


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to its earliest stop string."""
    end = len(text)
    for stop in stops:
        if stop:
            found = text.find(stop)
            if found != -1:
                end = min(end, found)
    return text[:end]
