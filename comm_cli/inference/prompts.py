"""Where comm-generate's prompts come from: ``prompt=`` on the command line, a file
(``prompts_file=``: ``.jsonl`` rows with a ``prompt`` field, any other file one prompt a line) or
stdin (jsonl when its first line is a JSON object, else one prompt a line). Each prompt is a
record, a dict with ``prompt`` and whatever other fields its jsonl row had (carried to the
output). Every problem is found before a model loads and told in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from comm_cli.errors import ConfigError, DataError

NO_PROMPT = (
    "no prompt: give prompt='...', prompts_file=FILE (.txt, one prompt a line, or .jsonl with a "
    '"prompt" field), or pipe prompts on stdin'
)


def read_prompts(prompt: str | None, prompts_file: str | None, stdin: TextIO) -> list[dict]:
    """The prompts of one comm-generate run, in order."""
    if prompt is not None and prompts_file is not None:
        raise ConfigError("give prompt= or prompts_file=, not both")
    if prompt is not None:
        if not prompt.strip():
            raise ConfigError("prompt= is empty: give the text to continue")
        return [{"prompt": prompt}]
    if prompts_file is not None:
        path = Path(prompts_file).expanduser()
        if not path.is_file():
            raise DataError(
                f"prompts_file '{prompts_file}' does not exist: give a .txt or .jsonl file of prompts"
            )
        text = path.read_text(encoding="utf-8")
        jsonl = path.suffix == ".jsonl"
        where = f"prompts_file '{prompts_file}'"
    else:
        if stdin is None or stdin.isatty():
            raise ConfigError(NO_PROMPT)
        text = stdin.read()
        first = next((line for line in text.splitlines() if line.strip()), "")
        jsonl = first.lstrip().startswith("{") and _is_object(first)
        where = "stdin"
    records = _jsonl_records(text, where) if jsonl else _line_records(text)
    if not records:
        raise DataError(f'{where} holds no prompts: one prompt a line, or jsonl rows with a "prompt" field')
    return records


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _line_records(text: str) -> list[dict]:
    """One prompt a line; blank lines are skipped (a prompt with newlines needs jsonl)."""
    return [{"prompt": line} for line in text.splitlines() if line.strip()]


def _jsonl_records(text: str, where: str) -> list[dict]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where} line {number} is not JSON ({err.msg}): one JSON object a line") from err
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise DataError(
                f'{where} line {number} has no "prompt" string: each row needs {{"prompt": "..."}}'
            )
        records.append(row)
    return records
