"""comm-generate's work: prompt records in, result records out, ``batch_size`` prompts at a time
through ``Session.complete``.

A result is the prompt's record (its other jsonl fields carried along) with the completion, why it
ended (``finish_reason``: "stop" at eos or a stop string, "length" at max_new_tokens), the token
counts and the settings that produced it. A field of the input row that has one of those names
(a reference ``completion``, say) is kept as ``input_<name>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

from comm_cli.inference.session import Completion, Sampling, Session

RESULT_FIELDS = ("prompt", "completion", "finish_reason", "prompt_tokens", "completion_tokens", "settings")


def settings_of(cfg, session: Session, sampling: Sampling) -> dict:
    """What produced a result: the model, how the prompt was posed, how text was generated."""
    return {
        "model": cfg.model,
        "checkpoint": cfg.checkpoint,
        "bridges_off": bool(cfg.bridges_off),
        "device": str(session.loaded.device),
        "dtype": str(next(session.anchor.parameters()).dtype).removeprefix("torch."),
        "chat_template": session.chat,
        "system": session.system if session.chat else None,
        "add_bos": None if session.chat else session.add_bos,
        **dataclasses.asdict(sampling),
    }


def result(record: dict, completion: Completion, settings: dict) -> dict:
    out = {
        "prompt": record["prompt"],
        "completion": completion.text,
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
    }
    for key, value in record.items():
        if key != "prompt":
            out[f"input_{key}" if key in RESULT_FIELDS else key] = value
    out["settings"] = settings
    return out


def generate_records(
    session: Session,
    records: Sequence[dict],
    sampling: Sampling,
    batch_size: int,
    settings: dict,
    stream: Callable[[str], None] | None = None,
) -> Iterator[dict]:
    """Result records in the prompts' order. With ``sampling.seed`` set, a sampled batch that
    starts at prompt i draws from ``seed + i`` (the same command gives the same text).
    ``stream``: each reply's text as it grows, one prompt at a time."""
    size = 1 if stream is not None else batch_size
    on_text = (lambda row, delta: stream(delta)) if stream is not None else None
    for start in range(0, len(records), size):
        batch = records[start : start + size]
        this = sampling
        if sampling.do_sample and sampling.seed is not None:
            this = dataclasses.replace(sampling, seed=sampling.seed + start)
        texts = [session.prompt_text(record["prompt"]) for record in batch]
        completions = session.complete(texts, this, on_text=on_text)
        for record, completion in zip(batch, completions):
            yield result(record, completion, {**settings, "seed": this.seed})
