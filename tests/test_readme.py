"""The README runs as written: every ```python block, and every line of a ```bash block that starts
with a comm command, in document order, in a temporary directory outside the checkout that holds
tiny stand-ins for what the README names (the documented stand-in):

- ``models/anchor``: a Llama-style model on a byte-level BPE (Llama-3 split regex) with a chat
  template; ``models/augment``: a Qwen2-style model on another BPE (GPT-2's): a pair with
  different tokenizers, so every command runs the cross-tokenizer path;
- ``train.jsonl`` and ``test.jsonl`` (prompt/completion rows), ``prompts.jsonl`` and
  ``prompts.txt`` (prompts for comm-generate), ``my_tasks/`` (an lm-eval task YAML, ``my_task``).

A line ending in ``# needs: gpu`` (``hub``, ``network``) is skipped. The commands come from this
checkout's ``[project.scripts]`` (small shims on PATH), so the test runs the code it sits beside.
``comm-serve`` starts in the background, the Python blocks after it talk to it, and it stops when
the module ends; its port is a free one in place of the README's 8000. comm-train runs with a
short budget appended (``TRAIN_BUDGET``): the README's own 1000 steps would only take longer.

Those runs are slow (minutes); the fast tests check every comm command line without running it:
a Hydra command's overrides compose against its schema (every key exists, every value has its
type), comm-launch's and comm-config's names are shipped configs, comm-lm-eval's arguments parse
with lm-eval's own parser and its ``--model_args`` are CommLM's.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import REPO, cli_env

README = REPO / "README.md"
NEEDS = re.compile(r"#\s*needs:\s*([\w, ]+)\s*$")
KNOWN_NEEDS = {"gpu", "hub", "network"}
# Commands (or, for comm-lm-eval, the support for pairs with different tokenizers) that other
# branches are adding, by branch. MARKER FOR THE LEAD: remove a name once its branch is merged.
# The README's comm-train lines run on the stand-ins with this budget appended.
TRAIN_BUDGET = ["trainer.max_steps=30", "trainer.eval_every=15", "trainer.save_every=15"]
# A command kept as it was run for a measurement, on the settings of its day: not checked.
AS_RUN_THEN = "# as run then"
# The Hydra root config of each command that has one.
HYDRA_CONFIG = {
    "comm-train": "train",
    "comm-eval": "eval",
    "comm-generate": "generate",
    "comm-chat": "chat",
    "comm-serve": "serve",
    "comm-launch": "train",
}
README_PORT = "8000"
CHAT_INPUT = "3+4=\n/bridges off\n3+4=\n/reset\n"
TRAIN_TIMEOUT = 1800
COMMAND_TIMEOUT = 600


@dataclass
class Case:
    kind: str  # "python" or "bash"
    text: str
    line: int
    command: str | None = None  # the comm command a case runs or depends on
    needs: list[str] = field(default_factory=list)
    page: str = "README.md"

    @property
    def id(self) -> str:
        head = self.command or self.kind
        where = "" if self.page == "README.md" else f"{self.page}:"
        return f"{where}L{self.line}-{head}"


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line of the first body line) of every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^```(\w*)\s*$", lines[i])
        if opening:
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append((opening.group(1), "\n".join(body), start + 1))
        i += 1
    return blocks


def logical_lines(body: str, first_line: int) -> list[tuple[str, int]]:
    """Shell lines with their backslash continuations joined, each with its line number."""
    out, pending, start = [], "", None
    for number, raw in enumerate(body.splitlines(), first_line):
        if start is None:
            start = number
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        out.append((pending + raw, start))
        pending, start = "", None
    return out


def readme_cases(page: Path = README) -> list[Case]:
    cases, name = [], str(page.relative_to(REPO))
    for language, body, line in fenced_blocks(page.read_text()):
        if language == "python":
            command = "comm-serve" if "from openai import" in body else None
            cases.append(Case("python", body, line, command, page=name))
        elif language == "bash":
            for text, number in logical_lines(body, line):
                words = text.split()
                if not words or not words[0].startswith("comm-"):
                    continue
                needs = NEEDS.search(text)
                cases.append(
                    Case(
                        "bash",
                        text,
                        number,
                        words[0],
                        [n.strip() for n in needs.group(1).split(",")] if needs else [],
                        page=name,
                    )
                )
    return cases


def project_scripts() -> dict[str, str]:
    """``[project.scripts]`` of this checkout's pyproject.toml (name -> ``module:function``); read
    by hand, as Python 3.10 has no tomllib."""
    scripts, inside = {}, False
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        if line.startswith("["):
            inside = line.strip() == "[project.scripts]"
        elif inside and (entry := re.match(r'^\s*"?([\w.-]+)"?\s*=\s*"([^"]+)"', line)):
            scripts[entry.group(1)] = entry.group(2)
    return scripts


CASES = readme_cases()
# The docs pages' command lines are checked to parse too (not run: they name real models).
DOCS_CASES = [
    c for page in sorted((REPO / "docs").rglob("*.md")) for c in readme_cases(page) if c.kind == "bash"
]


def test_the_readme_names_only_commands_comm_has_or_is_adding():
    known = set(project_scripts())
    named = {case.command for case in CASES if case.kind == "bash"}
    assert named <= known, f"commands the README names that comm does not have: {sorted(named - known)}"
    assert {"comm-train", "comm-eval"} <= named


def test_needs_marks_are_the_known_ones():
    for case in CASES:
        assert set(case.needs) <= KNOWN_NEEDS, f"README line {case.line}: unknown needs {case.needs}"


# ------------------------------------------------------------------- every command line parses


def words_of(case: Case) -> list[str]:
    """The line's words as the shell hands them over, without redirections and comments."""
    words, out = shlex.split(case.text, comments=True), []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in ("<", ">", ">>", "2>", "|"):
            skip = True
        elif not word.startswith(("<", ">")):
            out.append(word)
    return out


def hydra_overrides(words: list[str]) -> list[str]:
    """The overrides of a Hydra command line: its flags (``--cfg job``, ``--help``, ``-m``) dropped."""
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("--cfg", "-c", "--package", "-p", "--config-dir", "-cd", "--config-name", "-cn"):
            skip = True
        elif not word.startswith("-"):
            out.append(word)
    return out


def launch_parts(words: list[str]) -> tuple[str, list[str]]:
    """comm-launch NAME [accelerate options] overrides: (NAME, the comm-train overrides)."""
    name, rest, out, skip = words[0], words[1:], [], False
    for word in rest:
        if skip:
            skip = False
        elif word.startswith("--"):
            skip = "=" not in word
        else:
            out.append(word)
    return name, out


def compose_typed(config_name: str, overrides: list[str]):
    """The typed config a Hydra command would run, composed in this process (nothing loads)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from comm_cli.cli import config_dir, register_configs, to_typed

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return to_typed(cfg)


def check_lm_eval_line(words: list[str]) -> None:
    import inspect

    lm_eval_main = pytest.importorskip("lm_eval.__main__")
    from comm_cli.evaluation.harness import CommLM

    args = lm_eval_main.HarnessCLI()._parser.parse_args(["run", *words])
    assert args.model == "comm"
    accepted = set(inspect.signature(CommLM.__init__).parameters) - {"self", "unused"}
    model_args = args.model_args or {}  # lm-eval parses it to a dict (older versions: a string)
    if isinstance(model_args, str):
        model_args = dict(pair.split("=", 1) for pair in model_args.split(",") if pair)
    keys = set(model_args)
    assert keys <= accepted, f"model_args CommLM does not take: {sorted(keys - accepted)}"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES + DOCS_CASES if c.kind == "bash"])
def test_every_readme_command_line_parses(case: Case):
    """Without running anything: the line's keys exist, its values have their types, the configs
    it names are shipped (the paths it names are the stand-ins', and need not exist here)."""
    from comm_cli.cli import config_dir

    program, words = case.command, words_of(case)[1:]
    if "..." in words or "--config-dir" in words or AS_RUN_THEN in case.text:
        pytest.skip(
            "a line with elided parts, the user's own config files, or a past run's command as it was run"
        )
    if "--help" in words or "-h" in words:
        assert program in set(project_scripts())
    elif program == "comm-launch":
        name, overrides = launch_parts(words)
        assert (Path(config_dir()) / "accelerate" / f"{name}.yaml").is_file(), f"no launch config {name}"
        compose_typed("train", overrides)
    elif program == "comm-config":
        assert words[0] == "accelerate" and (Path(config_dir()) / "accelerate" / f"{words[1]}.yaml").is_file()
    elif program == "comm-lm-eval":
        check_lm_eval_line(words)
    else:
        typed = compose_typed(HYDRA_CONFIG[program], hydra_overrides(words))
        for override in hydra_overrides(words):
            key, _, value = override.partition("=")
            if key == "checkpoint":
                assert typed.checkpoint == value


# ------------------------------------------------------------------------------------ stand-ins

ANCHOR_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MY_TASK = """\
task: my_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: my_tasks/my_task.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def build_standins(root: Path) -> None:
    """Tiny models, data, prompts and a task, as the README names them."""
    from tests import tokenizer_zoo as zoo
    from tests.conftest import tiny_model

    tokenizers = {"anchor": zoo.build("byte_bpe"), "augment": zoo.build("gpt2_bpe")}
    tokenizers["anchor"].chat_template = ANCHOR_CHAT_TEMPLATE
    shapes = {"anchor": ("llama", 0, 48, 4), "augment": ("qwen2", 1, 32, 4)}
    for name, (family, seed, width, layers) in shapes.items():
        path = root / "models" / name
        tiny_model(
            family, seed=seed, width=width, layers=layers, vocab=len(tokenizers[name])
        ).save_pretrained(path)
        tokenizers[name].save_pretrained(path)

    rng = random.Random(0)

    def rows(n):
        out = []
        for _ in range(n):
            x, y = rng.randint(0, 9), rng.randint(0, 9)
            out.append({"prompt": f"{x}+{y}=", "completion": str(x + y)})
        return out

    def write_jsonl(path: Path, records) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))

    write_jsonl(root / "train.jsonl", rows(64))
    write_jsonl(root / "test.jsonl", rows(16))
    prompts = ["Where does Ada Lovelace live?", "3+4="]
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in prompts])
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (root / "my_tasks").mkdir()
    (root / "my_tasks" / "my_task.yaml").write_text(MY_TASK)
    questions = [(f"{x}+{y}=", x + y) for x, y in ((1, 2), (3, 4), (5, 1), (2, 2))]
    write_jsonl(
        root / "my_tasks" / "my_task.jsonl",
        [{"question": q, "choices": [str(a), str(a + 1), str(a - 1)], "answer": 0} for q, a in questions],
    )


def write_shims(directory: Path) -> None:
    """One executable per console script of this checkout's pyproject, running this checkout."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, target in project_scripts().items():
        module, _, function = target.partition(":")
        code = (
            f"import sys; from {module} import {function} as main; sys.argv[0] = {name!r}; sys.exit(main())"
        )
        shim = directory / name
        shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)} "$@"\n')
        shim.chmod(0o755)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workspace:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.env = cli_env()
        self.env["PATH"] = f"{root / '.bin'}{os.pathsep}{self.env.get('PATH', '')}"
        self.server: subprocess.Popen | None = None
        self.server_log = root / "comm-serve.log"

    def with_port(self, text: str) -> str:
        return text.replace(f"port={README_PORT}", f"port={self.port}").replace(
            f":{README_PORT}", f":{self.port}"
        )

    def start_server(self, line: str) -> None:
        log = open(self.server_log, "w")
        self.server = subprocess.Popen(
            ["bash", "-c", f"exec {line}"],
            cwd=self.root,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise AssertionError(f"comm-serve exited with {self.server.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"comm-serve did not answer within {COMMAND_TIMEOUT} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.server_log.read_text()[-3000:] if self.server_log.exists() else ""

    def stop_server(self) -> None:
        if self.server is None or self.server.poll() is not None:
            return
        self.server.terminate()
        try:
            self.server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    assert REPO not in root.parents, "the README's commands must run outside the checkout"
    build_standins(root)
    write_shims(root / ".bin")
    ws = Workspace(root)
    yield ws
    ws.stop_server()


def _marks(case: Case) -> list:
    marks = [pytest.mark.slow]
    if case.needs:
        marks.append(pytest.mark.skip(reason=f"needs {', '.join(case.needs)} (marked in the README)"))
    return marks


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=_marks(c)) for c in CASES])
def test_readme_runs_as_written(case: Case, workspace: Workspace):
    if case.kind == "python":
        command = [sys.executable, "-c", workspace.with_port(case.text)]
        stdin = ""
    else:
        line = workspace.with_port(case.text)
        if case.command == "comm-serve":
            workspace.start_server(line)
            return
        if case.command == "comm-train" and "--cfg" not in line:
            line = f"{line} {' '.join(TRAIN_BUDGET)}"
        command = ["bash", "-c", line]
        stdin = CHAT_INPUT if case.command == "comm-chat" else ""
    timeout = TRAIN_TIMEOUT if case.command == "comm-train" else COMMAND_TIMEOUT
    done = subprocess.run(
        command,
        cwd=workspace.root,
        env=workspace.env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"README line {case.line} exited with {done.returncode}:\n{case.text}\n"
        f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    )
