"""lm-evaluation-harness backend: a composition (or a baseline) as an lm-eval model.

``CommLM`` answers the harness's three request types with the same model comm-eval scores:

- ``loglikelihood``: teacher-forced log-probabilities of each continuation, batched (longest
  first, right-padded; positions come from the attention mask, so padding changes nothing);
- ``loglikelihood_rolling``: the same over lm-eval's rolling windows of the model's context;
- ``generate_until``: batched through the model's KV-cached ``generate`` (a composition's own,
  transformers' for a plain model), stopped and cut at the request's ``until`` strings.

Two readings of a request, chosen by the model:

- A plain model, or a composition whose augments share the anchor's tokenizer, goes through
  lm-eval's ``TemplateLM``: the request strings become anchor ids as lm-eval makes them
  (``context + continuation`` tokenised together, trailing context spaces moved to the
  continuation, ``[bos]`` first when ``add_bos_token``).
- A composition with an augment that reads its own tokens gets the strings themselves
  (``model.read_plan`` is set), and reads each request as comm's data pipeline reads a
  prompt/completion pair (``comm_cli.compose.encoding.encode_example``): ``[head] + context +
  continuation``, context and continuation tokenised apart and kept exactly as lm-eval gives them,
  each augment reading the same characters through its own tokenizer. The head is bos when
  ``add_bos_token`` (the default) and the anchor's tokenizer has one; an empty context gets
  lm-eval's prefix token (bos, else eos), so the first continuation token is scored as lm-eval
  scores it; no eos is added. A request longer than ``max_length`` loses context from the left,
  at an anchor token boundary. ``loglikelihood`` then equals comm's own log-probability of the
  continuation (``model(**model.encode([context], [continuation], add_eos=False))``), and
  ``generate_until`` hands the composition's ``generate`` the context text with its ids
  (``[bos] + context``), as comm-generate poses a prompt, so its greedy reply is comm-generate's
  with the request's ``until`` as stop strings and ``max_gen_toks`` new tokens at most.

Three ways in:

    comm-eval checkpoint=DIR harness.tasks=[arc_easy,gsm8k]       results.json, table, tracker
    lm_eval.simple_evaluate(model=CommLM(checkpoint=DIR), tasks=[...])
    comm-lm-eval --model comm --model_args checkpoint=DIR --tasks arc_easy

The installed lm-eval (0.4.x) finds models only in its own registry, not through entry points of
other packages, so ``lm_eval --model comm`` cannot see comm by itself; ``comm-lm-eval`` is lm-eval's
own command line with this module imported (which registers ``comm``). Baselines go through the
same class: ``model=anchor|augment|lora|full`` with ``anchor=PATH`` / ``augment=PATH`` /
``checkpoint=DIR``, and ``bridges_off=true`` scores a composition with its bridges switched off.

Importing this module needs lm-eval: ``pip install 'comm-cli[harness]'``.
"""

from __future__ import annotations

import contextlib
import logging
from types import SimpleNamespace

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from comm_cli.compose import ComposedModel
from comm_cli.compose.encoding import CompletionCollator, augment_pad_ids, encode_example
from comm_cli.compose.specs import ModelSpec
from comm_cli.compose.text import NO_LIMIT, pad_id, to_device
from comm_cli.errors import ConfigError
from comm_cli.evaluation.models import EvalModel, load_eval_model
from comm_cli.evaluation.runner import generate_texts
from comm_cli.schema import GenerationConfig

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256


@register_model("comm")
class CommLM(TemplateLM):
    """An lm-eval model over a comm composition or baseline (see the module docstring)."""

    def __init__(
        self,
        model: str | EvalModel = "calm",
        checkpoint: str | None = None,
        anchor: str | None = None,
        augment: str | None = None,
        tokenizer=None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str | None = 8,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        add_bos_token: bool = True,
        bridges_off: bool = False,
        seed: int = 0,
        **unused,
    ):
        super().__init__()
        if unused:
            logger.warning("CommLM ignores the model arguments %s", sorted(unused))
        if isinstance(model, EvalModel):
            self.model = model
        else:
            self.model = _load(model, checkpoint, anchor, augment, device, dtype)
        # Set when an augment reads its own tokens: requests are then read as text (module docstring).
        self.plan = self.model.read_plan
        if tokenizer is None and self.plan is not None:
            tokenizer = self.model.model.anchor_tokenizer  # the one the composition reads with
        if tokenizer is None or isinstance(tokenizer, str):
            from comm_cli.training.models import load_tokenizer

            tokenizer = load_tokenizer(tokenizer or self.model.tokenizer_source)
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token  # left padding for generation (never attended)
        self.tokenizer = tokenizer
        self.batch_size = _batch_size(batch_size)
        self.add_bos_token = _flag(add_bos_token)
        self.bridges_off = _flag(bridges_off)
        if self.bridges_off and not isinstance(self.model.model, ComposedModel):
            raise ConfigError("bridges_off=true needs a composition (model=calm)")
        self._max_length = int(max_length) if max_length else _context_length(self.model)
        if self.plan is not None and self._max_length < 3:
            raise ConfigError(f"max_length={self._max_length} leaves no room to score text: use at least 3")
        self.seed = int(seed)
        self._device = self.model.device

    # --- what lm-eval asks of a model ------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if self.add_bos_token and bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "comm")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``, after the bos token when the model was trained with one."""
        ids = self.tokenizer(string, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), greedy?) per (context, continuation) request."""
        if self.plan is None:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        return self._loglikelihood_texts([tuple(req.args) for req in requests], disable_tqdm)

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), greedy?) for (key, context ids, continuation ids)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        collate = CompletionCollator(self.tokenizer.pad_token_id)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        with self._variant(), torch.no_grad():
            for batch in tqdm(batches, desc="loglikelihood", disable=disable_tqdm, leave=False):
                rows, spans = [], []
                for i in batch:
                    context, continuation = requests[i][1], requests[i][2]
                    if not continuation:
                        raise ValueError("lm-eval sent an empty continuation to score")
                    # the model reads context + continuation[:-1]; keep its last max_length tokens
                    whole = (list(context) + list(continuation))[-(self.max_length + 1) :][:-1]
                    prompt_len = max(0, len(whole) - len(continuation) + 1)
                    rows.append(
                        {
                            "input_ids": whole,
                            "prompt_mask": [1] * prompt_len + [0] * (len(whole) - prompt_len),
                        }
                    )
                    # right padding: real tokens first
                    spans.append((len(whole) - len(continuation), list(continuation)))
                tensors = {k: v.to(self.device) for k, v in collate(rows).items()}
                for i, result in zip(batch, self._score(tensors, spans)):
                    results[i] = result
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents over lm-eval's rolling windows of ``max_length``."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            if self.plan is not None:
                pieces = self._text_windows(string)
            else:
                tokens = self.tok_encode(string, add_special_tokens=False)
                rolling = get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1)
                pieces = [(None, *make_disjoint_window(window)) for window in rolling]
            windows += pieces
            owners += [index] * len(pieces)
        if self.plan is not None:
            scores = self._loglikelihood_texts(windows, disable_tqdm, cache=False)
        else:
            scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, scores):
            totals[owner] += score
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched generation, one batch run per distinct set of generation arguments."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), DEFAULT_MAX_GEN_TOKS)
            contexts = [requests[i].args[0] for i in indices]
            with self._variant():
                texts = self._generate(contexts, kwargs, generator, disable_tqdm)
            for i, text in zip(indices, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def get_model_info(self) -> dict:
        """What lm-eval records in its results' config, so a number traces to its model."""
        return {
            "comm_model": self.model.kind,
            "comm_checkpoint": self.model.checkpoint,
            "bridges_off": self.bridges_off,
        }

    def _generate(self, contexts: list[str], kwargs: dict, generator, disable_tqdm: bool) -> list[str]:
        """Each context's continuation through ``generate_texts`` (the model's KV-cached
        ``generate``), the eos text joining the request's stops. A context longer than the room
        ``max_gen_toks`` leaves loses its start: lm-eval's ids cut on the left, or, where an
        augment reads its own tokens, the text cut at an anchor token boundary and handed over
        with its ids (``[bos] + context``, as comm-generate poses a prompt)."""
        eos_text = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        stops = handle_stop_sequences(kwargs.get("until"), eos_text)
        max_new = int(kwargs["max_gen_toks"])
        generation = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=bool(kwargs.get("do_sample", False)),
            temperature=float(kwargs.get("temperature") or 1.0),
            top_k=kwargs.get("top_k"),
            top_p=kwargs.get("top_p"),
            batch_size=self.batch_size,
        )
        keep = max(1, self.max_length - max_new)
        if self.plan is None:
            prompts, texts = [self.tok_encode(context)[-keep:] for context in contexts], None
        else:
            texts = [self._keep_tail(context, max(1, keep - 1)) for context in contexts]  # one place for bos
            prompts = [self.tok_encode(text) for text in texts]
        samples = generate_texts(
            self.model,
            self.tokenizer,
            prompts,
            generation,
            max_new,
            stops,
            generator,
            not disable_tqdm,
            prompts=texts,
        )
        return [sample[0] for sample in samples]

    # --- text (compositions whose augments read their own tokens) --------------------------------

    def _loglikelihood_texts(
        self, pairs: list[tuple[str, str]], disable_tqdm: bool, cache: bool = True
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), greedy?) per (context, continuation) string pair,
        each read as comm reads a prompt/completion pair (``_text_row``); batched longest first."""
        rows = [self._text_row(context, continuation) for context, continuation in pairs]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]["input_ids"]))
        collate = CompletionCollator(pad_id(self.tokenizer), augment_pad_ids=augment_pad_ids(self.plan))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        with self._variant(), torch.no_grad():
            for batch in tqdm(batches, desc="loglikelihood", disable=disable_tqdm, leave=False):
                tensors = to_device(collate([rows[i][0] for i in batch]), self.device)
                # the continuation's n tokens are the row's last: logits at length - n - 1 predict the first
                spans = [(len(rows[i][0]["input_ids"]) - len(rows[i][1]) - 1, rows[i][1]) for i in batch]
                for i, result in zip(batch, self._score(tensors, spans)):
                    results[i] = result
                    if cache:
                        self.cache_hook.add_partial("loglikelihood", pairs[i], result)
        return results

    def _text_row(self, context: str, continuation: str) -> tuple[dict, list[int]]:
        """One request as comm's data pipeline builds a prompt/completion example (``[head] +
        context + continuation``, tokenised apart, the augments' own tokens and the character
        alignment included; no eos), and the continuation's ids. The context is cut from the left
        when the whole is longer than ``max_length``."""
        if not continuation:
            raise ValueError("lm-eval sent an empty continuation to score")
        body = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        room = self.max_length - 1 - len(body)  # one place for the head
        if room < 0:
            raise ConfigError(
                f"a continuation of {len(body)} tokens does not fit in max_length={self.max_length}: "
                "raise max_length (model_args max_length=N)"
            )
        context = self._keep_tail(context, room)
        prompt = self.tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
        example = encode_example(
            prompt,
            body,
            [context, continuation],
            text_format=False,
            bos=self._head(context),
            eos=None,
            max_length=NO_LIMIT,
            plan=self.plan,
        )
        return example, body

    def _head(self, context: str) -> int | None:
        """The token before the context: bos when asked for (and the tokenizer has one); for an
        empty context lm-eval's prefix token, so the first continuation token has a condition."""
        bos = self.tokenizer.bos_token_id
        if context:
            return bos if self.add_bos_token and bos is not None else None
        if self.prefix_token_id is None:
            raise ConfigError(
                "lm-eval asked to score a text with no context, but the anchor's tokenizer has neither a bos nor "
                "an eos token to condition it on: use a task with contexts"
            )
        return self.prefix_token_id

    def _keep_tail(self, text: str, tokens: int) -> str:
        """The longest end of ``text`` that starts at one of its anchor tokens and reads as at most
        ``tokens`` anchor tokens (the context a long request keeps)."""
        reader = self.plan.anchor_reader
        ends = reader.segment(text, final=False).ends
        while len(ends) > tokens:
            if tokens <= 0:
                return ""
            text = text[max(1, ends[len(ends) - tokens - 1]) :]
            ends = reader.segment(text, final=False).ends
        return text

    def _text_windows(self, text: str) -> list[tuple[str, str]]:
        """lm-eval's disjoint rolling windows (``get_rolling_token_windows`` with one token of
        context) in characters: the document cut at anchor token boundaries into pieces that fit
        ``max_length`` with a head and a context, each piece (continuation) after the text of the
        token before it (context; empty for the first piece). The pieces make up the document."""
        ends = self.plan.anchor_reader.segment(text, final=True).ends
        starts = [0, *ends[:-1]]
        size = self.max_length - 2  # the head and the context token
        windows, i = [], 0
        while i < len(ends):
            j = min(len(ends), i + size)
            while True:
                stop = len(text) if j == len(ends) else starts[j]
                piece = text[starts[i] : stop]
                # read apart, a piece may tokenise into more tokens than it had inside the document
                if j == i + 1 or len(self.tokenizer(piece, add_special_tokens=False)["input_ids"]) <= size:
                    break
                j -= 1
            if piece:  # tokens inside one character can leave a piece with no text of its own
                windows.append((text[starts[i - 1] : starts[i]] if i > 0 else "", piece))
            i = j
        return windows

    # --- helpers ---------------------------------------------------------------------------------

    def _score(self, batch: dict, spans: list[tuple[int, list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log-probs, all greedy?) of each row's ``ids``, predicted by the logits from
        position ``start`` on, for the rows' (start, ids) ``spans``."""
        logprobs = torch.log_softmax(self.model.logits(batch).float(), dim=-1)
        out = []
        for row, (start, ids) in enumerate(spans):
            target = torch.tensor(ids, device=self.device)
            scores = logprobs[row, start : start + len(ids)]
            total = float(scores.gather(-1, target[:, None]).sum())
            out.append((total, bool((scores.argmax(dim=-1) == target).all())))
        return out

    def _variant(self):
        if self.bridges_off:
            return self.model.model.bridges_disabled()
        return contextlib.nullcontext()


def _load(kind, checkpoint, anchor, augment, device, dtype) -> EvalModel:
    """An EvalModel from lm-eval's string arguments (``--model_args``)."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        device = "cuda" if torch.cuda.is_available() else "cpu"  # as lm-eval's own hf model falls back
    device = torch.device(device)
    cfg = SimpleNamespace(
        model=kind,
        checkpoint=checkpoint,
        anchor=ModelSpec(anchor) if anchor else None,
        augment=ModelSpec(augment) if augment else None,
        dtype=dtype,
    )
    if kind in ("anchor", "lora") and cfg.anchor is None:
        raise ConfigError(f"model={kind} needs anchor=<hub id or directory of the anchor model>")
    if kind == "augment" and cfg.augment is None:
        raise ConfigError("model=augment needs augment=<hub id or directory of the augmenting model>")
    return load_eval_model(cfg, device)


def _context_length(model: EvalModel) -> int:
    base = model.model.anchor if isinstance(model.model, ComposedModel) else model.model
    config = getattr(base, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_LENGTH


def _batch_size(value) -> int:
    if value in (None, "auto") or str(value).startswith("auto"):
        return 8
    return max(1, int(value))


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")
