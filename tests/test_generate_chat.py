"""comm-generate and comm-chat on tiny local compositions: the text they give is what
``model.generate(prompts=...)`` gives for the same prompt as they pose it (plain, or through the
anchor's chat template), for a pair that shares a tokenizer and one that does not; prompts from
the command line, a .txt or .jsonl file or stdin; streaming shows the same text; each mistake a
user can make ends in one line and exit status 2. comm-chat runs in a pseudo-terminal (a turn,
/bridges off, /reset, Ctrl-C, Ctrl-D) and from piped stdin."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from comm_cli.chat import main as chat_main
from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
from comm_cli.generate import main as generate_main
from tests import tokenizer_zoo as zoo
from tests.conftest import tiny_model
from tests.helpers import cli_env, run_in_process

PROMPTS = ["the quick brown fox", "hello world, 123 + 456 =", "it's we're"]
NEW = 6  # generation.max_new_tokens in most tests
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """Saved compositions of a Llama anchor (byte-level BPE) with strong random bridges:
    ``shared`` (a Qwen2 augment on the anchor's tokenizer), ``aligned`` (a Qwen2 augment on a
    GPT-2 BPE: its own tokens), ``chat`` (``shared`` with a chat template on the anchor's
    tokenizer), and ``anchor`` (the base alone)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("genchat")
    tokenizers = {
        "anchor": zoo.build("byte_bpe"),
        "same": zoo.build("byte_bpe"),
        "other": zoo.build("gpt2_bpe"),
    }
    shapes = {"anchor": ("llama", 0, 48, 4), "same": ("qwen2", 1, 32, 3), "other": ("qwen2", 2, 32, 3)}
    for name, (family, seed, width, layers) in shapes.items():
        model = tiny_model(family, seed=seed, width=width, layers=layers, vocab=len(tokenizers[name]))
        model.save_pretrained(root / name)
        tokenizers[name].save_pretrained(root / name)
    shutil.copytree(root / "anchor", root / "chat_anchor")
    templated = PreTrainedTokenizerFast.from_pretrained(root / "anchor")
    templated.chat_template = TEMPLATE
    templated.save_pretrained(root / "chat_anchor")
    paths = {"anchor": root / "anchor"}
    for name, anchor, augment in (
        ("shared", "anchor", "same"),
        ("aligned", "anchor", "other"),
        ("chat", "chat_anchor", "same"),
    ):
        torch.manual_seed(0)
        bases = [AutoModelForCausalLM.from_pretrained(root / n) for n in (anchor, augment)]
        model = ComposedModel.from_models(
            *bases, MappingSpec(every=1), BridgeConfig(num_heads=4, zero_init_output=False)
        )
        with torch.no_grad():  # bridges strong enough that switching them off changes the text
            for bridge in model.bridges:
                bridge.o_proj.weight.mul_(8)
        paths[name] = model.save_pretrained(root / name)
    return paths


_loaded: dict[Path, ComposedModel] = {}


def reference(path: Path, prompts, bridges: bool = True, **options) -> list[str]:
    """What the Python API gives: ``ComposedModel.from_pretrained(path).generate(prompts=...)``."""
    if path not in _loaded:
        _loaded[path] = ComposedModel.from_pretrained(path).eval()
    model = _loaded[path]
    model.set_bridges_enabled(bridges)
    try:
        return model.generate(prompts=prompts, max_new_tokens=options.pop("max_new_tokens", NEW), **options)
    finally:
        model.set_bridges_enabled(True)


def generate(capsys, args: list[str]) -> tuple[int, str, str]:
    """comm-generate in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = run_in_process(generate_main, "comm-generate", [f"generation.max_new_tokens={NEW}", *args])
    out, err = capsys.readouterr()
    return code, out, err


def rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------ comm-generate


@pytest.mark.parametrize("pair", ["shared", "aligned"])
def test_generate_gives_what_the_python_api_gives(made, tmp_path, capsys, pair):
    """A .txt file of prompts, batched, greedy: the completions are model.generate(prompts=...)'s,
    for a pair that shares the anchor's tokenizer and one whose augment reads its own."""
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n\n")  # a blank line is no prompt
    output = tmp_path / "out" / "results.jsonl"
    code, out, err = generate(
        capsys, [f"checkpoint={made[pair]}", f"prompts_file={prompts_file}", f"output={output}"]
    )
    assert code == 0, err
    assert out == ""  # the results go to the file only
    results = rows(output.read_text())
    assert [r["prompt"] for r in results] == PROMPTS
    assert [r["completion"] for r in results] == reference(made[pair], PROMPTS)
    tokenizer = _loaded[made[pair]].anchor_tokenizer
    for r in results:
        assert r["prompt_tokens"] == 1 + len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
        assert r["finish_reason"] in ("stop", "length")
        assert r["completion_tokens"] <= NEW and (
            r["finish_reason"] == "stop" or r["completion_tokens"] == NEW
        )
        settings = r["settings"]
        assert settings["checkpoint"] == str(made[pair]) and settings["max_new_tokens"] == NEW
        assert (
            settings["chat_template"] is False
            and settings["add_bos"] is True
            and settings["do_sample"] is False
        )


def test_prompts_from_jsonl_and_stdin_keep_their_fields(made, tmp_path, capsys, monkeypatch):
    """jsonl rows keep their other fields (a reference completion becomes input_completion);
    stdin gives the same results as a file, as text lines or as jsonl; batch size changes
    nothing."""
    records = [{"prompt": p, "id": i, "completion": f"ref {i}"} for i, p in enumerate(PROMPTS)]
    jsonl = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / "prompts.jsonl").write_text(jsonl)
    shared = f"checkpoint={made['shared']}"
    code, out, err = generate(capsys, [shared, f"prompts_file={tmp_path / 'prompts.jsonl'}", "batch_size=2"])
    assert code == 0, err
    from_file = rows(out)
    assert [r["id"] for r in from_file] == [0, 1, 2]
    assert [r["input_completion"] for r in from_file] == ["ref 0", "ref 1", "ref 2"]
    assert [r["completion"] for r in from_file] == reference(made["shared"], PROMPTS)

    monkeypatch.setattr(sys, "stdin", io.StringIO(jsonl))
    code, out, err = generate(capsys, [shared])
    assert code == 0, err
    assert rows(out) == from_file
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(PROMPTS)))
    code, out, err = generate(capsys, [shared])
    assert code == 0, err
    assert [(r["prompt"], r["completion"]) for r in rows(out)] == [
        (r["prompt"], r["completion"]) for r in from_file
    ]


def test_streaming_shows_the_text_the_results_hold(made, tmp_path, capsys, monkeypatch):
    """stream=true: stdout is the reply as it comes, and equals the completion written to the
    file, a stop string included (text that may begin one is held back until it cannot). By
    default a single prompt streams when stdout is a terminal and gives jsonl when it is not."""
    prompt = PROMPTS[0]
    full = reference(made["aligned"], [prompt], max_new_tokens=12)[0]
    stop = full[4:6]  # cuts the reply after its first few characters
    assert stop.isalnum() and full.find(stop) >= 1
    ckpt = f"checkpoint={made['aligned']}"
    for extra, expected in (([], full), ([f"generation.stop=[{json.dumps(stop)}]"], full[: full.find(stop)])):
        output = tmp_path / "streamed.jsonl"
        code, out, err = generate(
            capsys,
            [
                ckpt,
                f"prompt={json.dumps(prompt)}",
                "stream=true",
                f"output={output}",
                "generation.max_new_tokens=12",
                *extra,
            ],
        )
        assert code == 0, err
        (result,) = rows(output.read_text())
        assert result["completion"] == expected and out == expected + "\n"
        assert result["finish_reason"] == ("stop" if extra else "length")

    code, out, _ = generate(capsys, [ckpt, f"prompt={json.dumps(prompt)}"])
    assert rows(out)[0]["completion"] == reference(made["aligned"], [prompt])[0]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, _ = generate(capsys, [ckpt, f"prompt={json.dumps(prompt)}"])
    assert out == reference(made["aligned"], [prompt])[0] + "\n"


def test_the_chat_template_poses_the_prompt_when_the_anchor_has_one(made, capsys):
    """With a chat template the prompt is a user turn (a system turn before it with system=);
    chat_template=false gives the plain prompt with bos; asking for a template the tokenizer
    lacks, or a system turn without one, is one line."""
    tokenizer = ComposedModel.from_pretrained(made["chat"]).anchor_tokenizer
    prompt = PROMPTS[0]
    user = [{"role": "user", "content": prompt}]
    system = [{"role": "system", "content": "Be brief."}, *user]
    posed = [
        tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in (user, system)
    ]
    assert posed[0] == f"<|user|>{prompt}\n<|assistant|>"
    ckpt, p = f"checkpoint={made['chat']}", f"prompt={json.dumps(prompt)}"
    cases = (
        ([], reference(made["chat"], posed[:1], add_bos=False)[0], True),
        (["system='Be brief.'"], reference(made["chat"], posed[1:], add_bos=False)[0], True),
        (["chat_template=false"], reference(made["chat"], [prompt])[0], False),
    )
    for extra, expected, templated in cases:
        code, out, err = generate(capsys, [ckpt, p, *extra])
        assert code == 0, err
        (result,) = rows(out)
        assert result["completion"] == expected and result["settings"]["chat_template"] is templated
    assert reference(made["chat"], posed[:1], add_bos=False) != reference(made["chat"], [prompt])

    code, _, err = generate(capsys, [f"checkpoint={made['shared']}", p, "chat_template=true"])
    assert code == 2 and "has no chat template" in err and len(err.strip().splitlines()) == 1
    code, _, err = generate(capsys, [ckpt, p, "chat_template=false", "system=hi"])
    assert code == 2 and "system=" in err and len(err.strip().splitlines()) == 1


def test_a_runs_checkpoint_poses_prompts_as_the_run_trained(made, tmp_path, capsys):
    """Beside comm-train's run_config.yaml a plain prompt gets bos as the run's data.add_bos said;
    add_bos= on the command line wins. bridges_off=true gives the anchor's own text."""
    run = tmp_path / "run"
    shutil.copytree(made["shared"], run / "composition")
    (run / "run_config.yaml").write_text("data:\n  add_bos: false\n")
    args = [f"checkpoint={run / 'composition'}", f"prompt={json.dumps(PROMPTS[2])}"]
    code, out, err = generate(capsys, args)
    assert code == 0, err
    (result,) = rows(out)
    assert result["settings"]["add_bos"] is False
    assert result["completion"] == reference(made["shared"], PROMPTS[2:], add_bos=False)[0]
    code, out, err = generate(capsys, [*args, "add_bos=true", "bridges_off=true"])
    assert code == 0, err
    (result,) = rows(out)
    assert result["settings"]["add_bos"] is True and result["settings"]["bridges_off"] is True
    assert result["completion"] == reference(made["shared"], PROMPTS[2:], bridges=False)[0]
    assert result["completion"] != reference(made["shared"], PROMPTS[2:])[0]


def test_device_and_dtype_are_chosen_and_recorded(made, capsys, monkeypatch):
    """Without device= the model runs on cpu when torch sees no GPU; device= and dtype= load it
    there and so, and each result records where and in what precision it was made."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [f"checkpoint={made['shared']}", f"prompt={json.dumps(PROMPTS[0])}"]
    code, out, err = generate(capsys, args)
    assert code == 0, err
    (result,) = rows(out)
    assert result["settings"]["device"] == "cpu" and result["settings"]["dtype"] == "float32"
    assert result["completion"] == reference(made["shared"], PROMPTS[:1])[0]
    code, out, err = generate(capsys, [*args, "device=cpu", "dtype=bfloat16"])
    assert code == 0, err
    (result,) = rows(out)
    assert result["settings"]["device"] == "cpu" and result["settings"]["dtype"] == "bfloat16"
    assert result["completion_tokens"] >= 1


def test_sampling_with_a_seed_repeats_itself(made, capsys):
    args = [f"checkpoint={made['shared']}", f"prompt={json.dumps(PROMPTS[0])}", "generation.do_sample=true"]
    args += ["generation.max_new_tokens=12", "generation.top_k=50"]
    first, again, other = (rows(generate(capsys, [*args, f"seed={s}"])[1])[0] for s in (1, 1, 2))
    assert first["completion"] == again["completion"] != other["completion"]
    assert first["settings"]["seed"] == 1 and first["settings"]["do_sample"] is True


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _moved_base(made, tmp_path) -> Path:
    moved = tmp_path / "moved"
    shutil.copytree(made["shared"], moved)
    config = json.loads((moved / "composition_config.json").read_text())
    config["anchor"]["name_or_path"] = str(tmp_path / "where_the_anchor_was")
    (moved / "composition_config.json").write_text(json.dumps(config))
    return moved


def test_a_moved_anchor_named_on_the_command_line_is_used(made, tmp_path, capsys):
    from comm_cli.generate import main as generate_main
    from tests.helpers import run_in_process

    moved = _moved_base(made, tmp_path)
    where = made["shared"].parent / "anchor"
    assert (
        run_in_process(
            generate_main,
            "comm-generate",
            [f"checkpoint={moved}", "prompt=hi", f"anchor.name_or_path={where}"],
        )
        == 0
    )


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing checkpoint", "checkpoint '{tmp}/nowhere' does not exist"),
        ("moved base", "the anchor '{tmp}/where_the_anchor_was' of the composition in"),
        ("base that does not fit", "is out of range: the model has 3 layers"),
        ("empty prompt file", "prompts_file '{tmp}/empty.txt' holds no prompts"),
        ("no prompt file", "prompts_file '{tmp}/absent.txt' does not exist"),
        ("terminal on stdin", "no prompt: give prompt="),
        ("bad jsonl row", 'line 2 has no "prompt" string'),
        ("no gpu", "device=cuda but torch sees no CUDA GPU on this machine: give device=cpu"),
        ("gpu not there", "device=cuda:1 but this machine has 1 CUDA GPU(s): cuda:0 to cuda:0"),
        ("mistyped device", "device=gpu is not a device: give cpu, cuda, cuda:N or mps"),
    ],
)
def test_each_mistake_is_one_line_and_exit_2(made, tmp_path, capsys, monkeypatch, case, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    ckpt, prompt = f"checkpoint={made['shared']}", "prompt=hi"
    args = {
        "missing checkpoint": [f"checkpoint={tmp_path / 'nowhere'}", prompt],
        "moved base": [f"checkpoint={_moved_base(made, tmp_path)}", prompt],
        "base that does not fit": [ckpt, prompt, f"anchor.name_or_path={made['shared'].parent / 'same'}"],
        "empty prompt file": [ckpt, f"prompts_file={tmp_path / 'empty.txt'}"],
        "no prompt file": [ckpt, f"prompts_file={tmp_path / 'absent.txt'}"],
        "terminal on stdin": [ckpt],
        "bad jsonl row": [ckpt, f"prompts_file={tmp_path / 'bad.jsonl'}"],
        "no gpu": [ckpt, prompt, "device=cuda"],
        "gpu not there": [ckpt, prompt, "device=cuda:1"],
        "mistyped device": [ckpt, prompt, "device=gpu"],
    }[case]
    gpus = {"no gpu": 0, "gpu not there": 1}.get(case)
    if gpus is not None:  # the machine as the case has it, whatever this one has
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(sys, "stdin", _Terminal())
    code, out, err = generate(capsys, [*args, f"output={tmp_path / 'out.jsonl'}"])
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith("comm-generate: error: ")
    assert message.format(tmp=tmp_path) in err
    assert out == "" and not (tmp_path / "out.jsonl").exists()


# ------------------------------------------------------------------------------------ comm-chat


def chat_piped(capsys, monkeypatch, args: list[str], lines: list[str]) -> tuple[int, str, str]:
    """comm-chat in this process with ``lines`` on a real pipe as stdin: (status, stdout, stderr)."""
    read_end, write_end = os.pipe()
    os.write(write_end, "".join(line + "\n" for line in lines).encode())
    os.close(write_end)
    with os.fdopen(read_end, encoding="utf-8") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        capsys.readouterr()
        code = run_in_process(chat_main, "comm-chat", [f"generation.max_new_tokens={NEW}", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("pair", ["shared", "aligned"])
def test_chat_from_a_pipe_keeps_the_conversation(made, capsys, monkeypatch, pair):
    """Without a chat template (said once) each turn reads the conversation joined as text; the
    bridges switch off and on; /reset starts over; replies are one a line on stdout. The same
    for a pair whose augment reads its own tokens."""
    path = made[pair]
    first = reference(path, ["hello"])[0]
    second_text = f"hello{first}\nagain"
    second = reference(path, [second_text])[0]
    third = reference(path, [f"{second_text}{second}\nhello"], bridges=False)[0]
    lines = ["hello", "again", "/bridges off", "hello", "/bridges on", "/reset", "hello", "/what"]
    code, out, err = chat_piped(capsys, monkeypatch, [f"checkpoint={path}"], lines)
    assert code == 0, err
    assert out == f"{first}\n{second}\n{third}\n{first}\n"
    assert err.count("no chat template") == 1
    assert "bridges off" in err and "bridges on" in err and "conversation cleared" in err
    assert "unknown command /what" in err


def test_chat_through_the_template_and_on_a_base_model(made, capsys, monkeypatch):
    """With a chat template the history is messages; a base model alone refuses /bridges."""
    path = made["chat"]
    tokenizer = ComposedModel.from_pretrained(path).anchor_tokenizer

    def posed(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    first = reference(path, [posed(messages)], add_bos=False)[0]
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "more"}]
    second = reference(path, [posed(messages)], add_bos=False)[0]
    code, out, err = chat_piped(
        capsys, monkeypatch, [f"checkpoint={path}", "system='Be brief.'"], ["hi", "more"]
    )
    assert code == 0, err
    assert out == f"{first}\n{second}\n" and "no chat template" not in err

    anchor = ["model=anchor", f"anchor.name_or_path={made['anchor']}"]
    code, out, err = chat_piped(capsys, monkeypatch, anchor, ["/bridges off", "hello"])
    assert code == 0, err
    assert "/bridges needs a composition" in err
    assert out == reference(made["shared"], ["hello"], bridges=False)[0] + "\n"  # the anchor alone


class Pty:
    """A program run in a pseudo-terminal, as a user at a terminal runs it."""

    def __init__(self, args: list[str], cwd: Path):
        import codecs

        env = {**cli_env(), "TERM": "dumb"}
        pid, fd = pty.fork()
        if pid == 0:  # the child: the program, with the terminal as its stdin, stdout and stderr
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, "-m", *args], env)
        self.pid, self.fd, self.text, self.pos = pid, fd, "", 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def screen(self) -> str:
        """What the terminal shows, line ends as "\n", escape sequences left out."""
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.text.replace("\r\n", "\n"))

    def read(self, timeout: float) -> bool:
        """Take what the program wrote within ``timeout`` seconds; False when nothing came."""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        try:
            data = os.read(self.fd, 4096) if ready else b""
        except OSError:  # the program ended
            data = b""
        self.text += self.decoder.decode(data)
        return bool(data)

    def expect(self, text: str, timeout: float = 240) -> str:
        """Wait until ``text`` appears after what was matched so far; the screen up to it."""
        deadline = time.monotonic() + timeout
        while text not in self.screen[self.pos :]:
            if not self.read(deadline - time.monotonic()):
                raise AssertionError(f"no {text!r} on the terminal; it shows:\n{self.screen[-3000:]}")
        start = self.pos
        self.pos = self.screen.index(text, self.pos) + len(text)
        return self.screen[start : self.pos]

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def exit_status(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            if not self.read(0.1):  # keep draining, or a full terminal buffer blocks the program
                time.sleep(0.1)
        os.kill(self.pid, 9)
        raise AssertionError(f"the program did not end; the terminal shows:\n{self.screen[-3000:]}")


def test_chat_in_a_terminal(made, tmp_path):
    """A turn streams its reply; /bridges off changes the reply of a composition whose bridges
    matter and /bridges on brings it back; /reset forgets; Ctrl-D leaves with status 0."""
    path = made["shared"]
    first = reference(path, ["hello"])[0]
    history = f"hello{first}\nhello"
    on, off = reference(path, [history])[0], reference(path, [history], bridges=False)[0]
    assert on != off
    term = Pty(["comm_cli.chat", f"checkpoint={path}", f"generation.max_new_tokens={NEW}"], tmp_path)
    term.expect("/help lists the commands")
    term.expect("no chat template")
    term.expect("\n> ")

    def turn(line: str) -> str:
        """What the terminal shows for one line typed at the prompt, up to the next prompt."""
        term.send(line + "\n")
        return term.expect(f"{line}\n") + term.expect("\n> ")[: -len("\n> ")]

    assert turn("hello") == f"hello\n{first}"
    assert turn("/bridges off") == "/bridges off\nbridges off: the anchor alone"
    assert turn("hello") == f"hello\n{off}"
    assert turn("/reset") == "/reset\nconversation cleared"
    assert turn("/bridges on").startswith("/bridges on\nbridges on")
    assert turn("hello") == f"hello\n{first}"
    term.send("\x04")  # Ctrl-D
    assert term.exit_status() == 0


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(made, tmp_path):
    term = Pty(
        ["comm_cli.chat", f"checkpoint={made['shared']}", "generation.max_new_tokens=100000"], tmp_path
    )
    term.expect("\n> ")
    term.send("hello\n")
    term.expect("hello\n")
    shown = len(term.screen)
    while len(term.screen) < shown + 20:  # the reply is coming
        assert term.read(60), "no reply"
    term.send("\x03")  # Ctrl-C
    term.expect("[stopped]")
    term.expect("\n> ")
    term.send("/help\n")
    term.expect("/reset          forget the conversation")
    term.expect("\n> ")
    term.send("\x04")
    assert term.exit_status() == 0


def test_ctrl_c_stops_a_streamed_generation_and_writes_nothing(made, tmp_path):
    """comm-generate streaming one prompt to a terminal: Ctrl-C ends it with status 130 and the
    output file is not written (no half a result)."""
    output = tmp_path / "out.jsonl"
    term = Pty(
        [
            "comm_cli.generate",
            f"checkpoint={made['shared']}",
            "prompt=hello",
            "generation.max_new_tokens=100000",
            f"output={output}",
        ],
        tmp_path,
    )
    while len(term.screen) < 20:  # the reply is coming
        assert term.read(240), "no reply"
    term.send("\x03")  # Ctrl-C
    term.expect(f"comm-generate: interrupted; {output} not written")
    assert term.exit_status() == 130
    assert [p.name for p in tmp_path.iterdir() if "out.jsonl" in p.name] == []  # nor a temporary file
