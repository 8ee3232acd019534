"""One loaded model and its tokenizer, turning prompts (or chat messages) into text.

comm-generate, comm-chat and comm-serve all go through ``Session``: it loads what comm-eval
loads (a saved composition, or the anchor, augment, LoRA or fully fine-tuned baseline;
``comm_cli.evaluation.models``), poses a prompt through the anchor's chat template when asked
(or when the tokenizer has one), and generates a batch of replies through the KV-cached loop,
streaming each row's text as it grows (``TextStream``) and stopping a row at eos, at a stop
string, or when its caller cancels it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from comm_cli.errors import ConfigError
from comm_cli.evaluation.stopping import StopStrings, cut_at_stops
from comm_cli.training.faults import step_seconds

logger = logging.getLogger(__name__)


@dataclass
class Sampling:
    """One request's generation settings."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    @classmethod
    def from_config(cls, cfg) -> Sampling:
        return cls(cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k, list(cfg.stop))

    def key(self) -> tuple:
        """Requests with equal keys can share one batch: greedy ones with the same stop strings
        (a batch has one list of them), sampled ones with the same settings as well."""
        if not self.do_sample:
            return ("greedy", tuple(self.stop))
        return ("sample", self.temperature, self.top_p, self.top_k, self.seed, tuple(self.stop))


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop": eos or a stop string; "length": max_new_tokens reached
    prompt_tokens: int
    completion_tokens: int


class TextStream:
    """A transformers-protocol streamer over a batch: after every step, each live row's new text
    (decoded from all its tokens so far, so multi-token characters come out whole) goes to
    ``on_text(row, delta)``. Text that could be the start of a stop string, or an unfinished
    character, is held back until it settles."""

    def __init__(self, tokenizer, rows: int, on_text: Callable[[int, str], None], stops: Sequence[str], eos):
        self.tokenizer, self.on_text, self.stops = tokenizer, on_text, [s for s in stops if s]
        self.eos = set(eos)
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [0] * rows
        self.done = [False] * rows
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token in self.eos:
                self.done[row] = True
                continue
            self.ids[row].append(token)
            self._emit(row, final=False)

    def end(self) -> None:
        for row in range(len(self.ids)):
            self._emit(row, final=True)

    def _emit(self, row: int, final: bool) -> None:
        text = cut_at_stops(self.tokenizer.decode(self.ids[row], skip_special_tokens=True), self.stops)
        safe = len(text) if final else len(text.rstrip("\ufffd"))
        if not final:
            for stop in self.stops:  # a suffix that may still become a stop string
                for k in range(min(len(stop) - 1, safe), 0, -1):
                    if text[safe - k : safe] == stop[:k]:
                        safe -= k
                        break
        if safe > self.sent[row]:
            self.on_text(row, text[self.sent[row] : safe])
            self.sent[row] = safe


class Session:
    """A loaded model (``comm_cli.evaluation.models.EvalModel``) and its tokenizer."""

    def __init__(
        self, loaded, tokenizer, chat_template: bool | None = None, add_bos: bool = True, system=None
    ):
        self.loaded, self.tokenizer, self.system = loaded, tokenizer, system
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise ConfigError(
                "chat_template=true but the anchor's tokenizer has no chat template (not an instruct model's): "
                "set chat_template=false"
            )
        self.chat = has_template if chat_template is None else chat_template
        if system is not None and not self.chat:
            why = "chat_template=false" if has_template else "the anchor's tokenizer has none"
            raise ConfigError(
                f"system=... is a turn of a chat template, and prompts are posed without one ({why}): "
                "drop system=, or write it into the prompt"
            )
        self.add_bos = add_bos
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token

    @property
    def model(self):
        return self.loaded.model

    @property
    def anchor(self):
        """The model that writes the text: a composition's anchor, or the baseline itself."""
        from comm_cli.compose import ComposedModel

        return self.model.anchor if isinstance(self.model, ComposedModel) else self.model

    @property
    def max_length(self) -> int:
        """The anchor's context length (prompt plus reply)."""
        return int(getattr(self.anchor.config, "max_position_embeddings", None) or 1 << 30)

    def eos_ids(self) -> list[int]:
        """What ends a reply: the tokenizer's eos and the model's (an instruct model's end of turn)."""
        found = getattr(getattr(self.anchor, "generation_config", None), "eos_token_id", None)
        found = [found] if isinstance(found, int) else list(found or [])
        if self.tokenizer.eos_token_id is not None:
            found.append(self.tokenizer.eos_token_id)
        return sorted(set(found))

    # ------------------------------------------------------------------ prompts

    def prompt_text(self, prompt: str | None = None, messages: Sequence[dict] | None = None) -> str:
        """The text a reply follows: a plain prompt, or chat ``messages`` (or one user ``prompt``)
        through the chat template, with the system turn first when one is set."""
        if messages is None and not self.chat:
            return prompt or ""
        if messages is None:
            messages = [{"role": "user", "content": prompt or ""}]
        if not self.chat:
            raise ConfigError("chat messages need a chat template: this tokenizer has none")
        if self.system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.system}, *messages]
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.add_bos and not self.chat and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id, *ids]
        return ids

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def complete(
        self,
        texts: Sequence[str],
        sampling: Sampling,
        on_text: Callable[[int, str], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Completion]:
        """Replies to ``texts`` (prompt texts, as ``prompt_text`` makes them), one batch, left-padded.
        ``on_text(row, delta)`` streams each row's text; ``cancelled(row)`` stops a row early;
        ``max_new_tokens`` gives each row its own limit (default: ``sampling.max_new_tokens``), so
        requests that differ only in length share a batch. ``COMM_FAULT_STEP_SECONDS`` makes every
        decoding step last at least that long (tests of cancelling and queueing)."""
        rows = [self.prompt_ids(text) for text in texts]
        limits = list(max_new_tokens) if max_new_tokens is not None else [sampling.max_new_tokens] * len(rows)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = self.loaded.device
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        eos = self.eos_ids()
        stops = StopStrings(self.tokenizer, sampling.stop)
        streamer = TextStream(self.tokenizer, len(rows), on_text, sampling.stop, eos) if on_text else None
        # Where each row was stopped (new tokens so far) by a stop string, its limit or its caller:
        # the batch runs on, the row gets padding, which is neither its text nor its token count.
        stopped_at: list[int | None] = [None] * len(rows)
        delay = step_seconds()

        def stopping(sequences, prompt_length):
            if delay:
                time.sleep(delay)
            made = sequences.shape[1] - prompt_length
            done = stops(sequences, prompt_length)
            for row in range(len(rows)):
                if made >= limits[row] or (cancelled is not None and cancelled(row)):
                    done[row] = True
                if done[row] and stopped_at[row] is None:
                    stopped_at[row] = made
                    if streamer is not None:
                        streamer.done[row] = True
            return done

        generator = None
        if sampling.do_sample:
            seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)))
            generator = torch.Generator(device=device).manual_seed(seed)
        new = self.loaded.generate(
            ids,
            mask,
            sampling,
            max(limits),
            eos,
            pad,
            generator,
            stopping,
            prompts=list(texts),
            streamer=streamer,
        )
        out = []
        for prompt, row, stop in zip(rows, new.tolist(), stopped_at):
            ended = next((i for i, token in enumerate(row) if token in eos), None)
            if stop is not None and (ended is None or stop <= ended):
                ended, row = None, row[:stop]
            tokens = row if ended is None else row[:ended]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = cut_at_stops(text, sampling.stop)
            reason = "stop" if ended is not None or cut != text else "length"
            out.append(Completion(cut, reason, len(prompt), len(tokens) + (ended is not None)))
        return out


def log_to_stderr(verbose: bool) -> None:
    """The use commands' console: stdout is their output (jsonl, a reply, a chat), so log lines go
    to stderr, and only warnings unless ``verbose``."""
    import sys

    from comm_cli.logs import setup_logging

    setup_logging(main_process=True, console=sys.stderr, level=logging.INFO if verbose else logging.WARNING)


def load_session(cfg) -> Session:
    """The model and tokenizer a use command (``UseConfig``) names, ready to generate."""
    from comm_cli.compose import ComposedModel
    from comm_cli.compose.loading import load_tokenizer
    from comm_cli.evaluation.models import check_model_choice, choose_device, load_eval_model

    check_model_choice(cfg)
    device = choose_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    loaded = load_eval_model(cfg, device)
    model = loaded.model
    if cfg.bridges_off:
        if not isinstance(model, ComposedModel):
            raise ConfigError("bridges_off=true needs model=calm (a composition)")
        model.set_bridges_enabled(False)
    tokenizer = getattr(model, "anchor_tokenizer", None) if cfg.tokenizer is None else None
    if tokenizer is None:
        tokenizer = load_tokenizer(
            cfg.tokenizer or loaded.tokenizer_source, None if cfg.tokenizer else loaded.tokenizer_spec
        )
    add_bos = True if cfg.add_bos is None else cfg.add_bos
    return Session(loaded, tokenizer, cfg.chat_template, add_bos, cfg.system)
