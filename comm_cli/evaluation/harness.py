"""lm-evaluation-harness backend: a composition (or a baseline) as an lm-eval model.

``CommLM`` answers the harness's three request types with the same model comm-eval scores:

- ``loglikelihood``: teacher-forced log-probabilities of each continuation, batched (longest
  first, right-padded; positions come from the attention mask, so padding changes nothing);
- ``loglikelihood_rolling``: the same over lm-eval's rolling windows of the model's context;
- ``generate_until``: batched through the model's KV-cached ``generate`` (a composition's own,
  transformers' for a plain model), stopped and cut at the request's ``until`` strings.

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
from comm_cli.compose.encoding import CompletionCollator
from comm_cli.compose.specs import ModelSpec
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
        if self.model.read_plan is not None:
            # lm-eval hands over token ids; an augment with its own tokenizer needs the text behind them
            raise ConfigError(
                "the lm-eval backend scores compositions whose augments share the anchor's tokenizer; this one "
                "has an augment with its own tokenizer: use comm-eval's own tasks for it"
            )
        if tokenizer is None or isinstance(tokenizer, str):
            from comm_cli.training.models import load_tokenizer

            tokenizer = load_tokenizer(tokenizer or self.model.tokenizer_source)
        self.tokenizer = tokenizer
        self.batch_size = _batch_size(batch_size)
        self.add_bos_token = _flag(add_bos_token)
        self.bridges_off = _flag(bridges_off)
        if self.bridges_off and not isinstance(self.model.model, ComposedModel):
            raise ConfigError("bridges_off=true needs a composition (model=calm)")
        self._max_length = int(max_length) if max_length else _context_length(self.model)
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
                rows = []
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
                tensors = {k: v.to(self.device) for k, v in collate(rows).items()}
                logprobs = torch.log_softmax(self.model.logits(tensors).float(), dim=-1)
                for row, i in enumerate(batch):
                    continuation = torch.tensor(requests[i][2], device=self.device)
                    n, length = len(continuation), len(rows[row]["input_ids"])
                    scores = logprobs[row, length - n : length]  # right padding: real tokens first
                    total = float(scores.gather(-1, continuation[:, None]).sum())
                    greedy = bool((scores.argmax(dim=-1) == continuation).all())
                    results[i] = (total, greedy)
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents over lm-eval's rolling windows of ``max_length``."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                windows.append((None, *make_disjoint_window(window)))
                owners.append(index)
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
        eos_text = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), DEFAULT_MAX_GEN_TOKS)
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
            prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in indices]
            with self._variant():
                texts = generate_texts(
                    self.model,
                    self.tokenizer,
                    prompts,
                    generation,
                    max_new,
                    stops,
                    generator,
                    not disable_tqdm,
                )
            for i, samples in zip(indices, texts):
                out[i] = samples[0]
                self.cache_hook.add_partial("generate_until", requests[i].args, samples[0])
        return out

    def get_model_info(self) -> dict:
        """What lm-eval records in its results' config, so a number traces to its model."""
        return {
            "comm_model": self.model.kind,
            "comm_checkpoint": self.model.checkpoint,
            "bridges_off": self.bridges_off,
        }

    # --- helpers ---------------------------------------------------------------------------------

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
