"""comm-serve through the real ``openai`` client: a server started here on 127.0.0.1 (a free port)
with a tiny saved composition (one sharing the anchor's tokenizer, one whose augment reads its
own) answers plain, chat and streamed requests with exactly the text a ``Session`` (what
comm-generate runs) gives for the same greedy request, batches concurrent requests without
changing any answer, refuses bad requests with OpenAI's error object and keeps serving, stops
generating for a client that leaves, and answers 503 past its queue."""

from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402  (comes with openai)

from comm_cli.inference.session import Sampling, load_session  # noqa: E402
from comm_cli.schema import ServeConfig  # noqa: E402
from tests.helpers import REPO, build_composition, build_workspace, cli_env  # noqa: E402

# A chat template over the characters of comm's character tokenizer (and any byte-level one).
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}; {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant; {% endif %}"
)
PROMPTS = [f"{a}+{b}=" + "x" * (a % 4) for a in range(5) for b in range(4)]  # 20, of mixed lengths
FAULT = "COMM_FAULT_STEP_SECONDS"


def same_tokenizer_composition(root: Path) -> Path:
    """The workspace's anchor and augment (one character tokenizer), the anchor's with a chat template."""
    from transformers import AutoTokenizer

    ws = build_workspace(root / "ws")
    tokenizer = AutoTokenizer.from_pretrained(ws["anchor"])
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(ws["anchor"])
    return build_composition(ws, root / "run" / "composition")


def cross_tokenizer_composition(root: Path) -> Path:
    """A Llama anchor on a byte-level BPE and a Qwen2 augment on a GPT-2-style BPE, saved with
    their tokenizers (as tests/test_text_api.py builds them)."""
    import torch
    from transformers import AutoModelForCausalLM

    from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
    from tests import tokenizer_zoo as zoo
    from tests.conftest import tiny_model

    tokenizers = {"anchor": zoo.build("byte_bpe"), "augment": zoo.build("gpt2_bpe")}
    tokenizers["anchor"].chat_template = TEMPLATE
    shapes = {"anchor": ("llama", 0, 48, 4), "augment": ("qwen2", 1, 32, 3)}
    for name, (family, seed, width, layers) in shapes.items():
        model = tiny_model(family, seed=seed, width=width, layers=layers, vocab=len(tokenizers[name]))
        model.save_pretrained(root / name)
        tokenizers[name].save_pretrained(root / name)
    bases = [AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.float32) for name in shapes]
    torch.manual_seed(0)
    model = ComposedModel.from_models(
        *bases, MappingSpec(every=1), BridgeConfig(num_heads=4, zero_init_output=False)
    )
    model.use_tokenizers(tokenizers["anchor"], [tokenizers["augment"]])
    model.save_pretrained(root / "cross" / "composition")
    return root / "cross" / "composition"


@contextlib.contextmanager
def running_server(checkpoint: Path, **settings):
    """comm-serve's server for ``checkpoint`` on 127.0.0.1 (a free port), on a thread of this process."""
    from comm_cli.serve import build_server, listen

    cfg = ServeConfig(checkpoint=str(checkpoint), port=0, **settings)
    sock = listen("127.0.0.1", 0)
    server = build_server(cfg, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield Server(f"http://127.0.0.1:{sock.getsockname()[1]}", server.served)
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "the server did not stop"


class Server:
    def __init__(self, url: str, served):
        self.url, self.served, self.name = url, served, served.name

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, **options)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health").json()

    def wait_until(self, condition, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if condition(health):
                return health
            assert time.monotonic() < deadline, f"server state never came: {health}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def compositions(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    return {"same": same_tokenizer_composition(root), "cross": cross_tokenizer_composition(root)}


@pytest.fixture(scope="module", params=["same", "cross"])
def served(request, compositions):
    """A running server and a Session on the same checkpoint (the reference answers)."""
    checkpoint = compositions[request.param]
    with running_server(checkpoint, batch_wait_ms=50) as server:
        server.session = load_session(ServeConfig(checkpoint=str(checkpoint)))
        yield server


def greedy(session, text: str, max_tokens: int, stop=()) -> tuple[str, str, int, int]:
    """(text, finish reason, prompt tokens, completion tokens) of the Session alone on one prompt."""
    [c] = session.complete([text], Sampling(max_new_tokens=max_tokens, stop=list(stop)))
    return c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens


def raw_session(session):
    """The session that poses prompts as they are (comm-generate chat_template=false)."""
    from comm_cli.inference.session import Session

    return Session(session.loaded, session.tokenizer, chat_template=False, add_bos=session.add_bos)


def expected_completion(served, prompt: str, max_tokens: int, stop=()):
    """What comm-generate chat_template=false gives: the prompt as it is."""
    return greedy(raw_session(served.session), prompt, max_tokens, stop)


def expected_chat(served, messages: list[dict], max_tokens: int):
    """What comm-generate (the chat template on) gives for these turns."""
    return greedy(served.session, served.session.prompt_text(messages=messages), max_tokens)


# ------------------------------------------------------------------------------- the answers


def test_models_lists_the_run_by_name(served):
    client = served.client()
    assert [m.id for m in client.models.list().data] == [served.name]
    assert served.name in ("run", "cross")  # outputs/<run>/composition -> <run>
    assert client.models.retrieve(served.name).id == served.name


def test_plain_chat_and_streamed_replies_equal_the_sessions_greedy_text(served):
    client = served.client()
    prompt, messages = "3+4=", [{"role": "user", "content": "1+2="}]
    text, reason, prompt_tokens, completion_tokens = expected_completion(served, prompt, 12)

    reply = client.completions.create(model=served.name, prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text == text and reply.choices[0].finish_reason == reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert reply.usage.total_tokens == prompt_tokens + completion_tokens
    assert reply.object == "text_completion" and reply.model == served.name

    chunks = list(
        client.completions.create(
            model=served.name,
            prompt=prompt,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == completion_tokens and not chunks[-1].choices

    chat_text, chat_reason, chat_prompt_tokens, _ = expected_chat(served, messages, 10)
    reply = client.chat.completions.create(model=served.name, messages=messages, max_tokens=10)
    assert reply.choices[0].message.content == chat_text and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == chat_reason and reply.usage.prompt_tokens == chat_prompt_tokens
    stream = client.chat.completions.create(
        model=served.name, messages=messages, max_completion_tokens=10, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat_text
    assert chunks[-1].choices[0].finish_reason == chat_reason


def test_stop_n_seed_and_a_list_of_prompts(served):
    client = served.client()
    text, *_ = expected_completion(served, "5+5=", 16)
    stop = text[3:5]  # a piece of the greedy reply: the reply ends before it
    want, reason, _, tokens = expected_completion(served, "5+5=", 16, [stop])
    reply = client.completions.create(
        model=served.name, prompt="5+5=", max_tokens=16, stop=stop, temperature=0
    )
    assert (
        reply.choices[0].text == want == text[: text.index(stop)] and reply.choices[0].finish_reason == "stop"
    )
    assert reply.usage.completion_tokens == tokens
    streamed = client.completions.create(
        model=served.name, prompt="5+5=", max_tokens=16, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == want

    # n choices of greedy decoding are the same text; a list of prompts answers each, in order
    reply = client.completions.create(model=served.name, prompt=["1+1=", "2+2="], n=2, max_tokens=6)
    texts = [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
    one, two = (expected_completion(served, p, 6)[0] for p in ("1+1=", "2+2="))
    assert texts == [one, one, two, two]

    # a seed makes sampling repeatable, and it is what the Session samples with that seed
    options = dict(model=served.name, prompt="7+1=", n=3, max_tokens=8, temperature=1.5, top_p=0.95, seed=11)
    first = [c.text for c in client.completions.create(**options).choices]
    assert first == [c.text for c in client.completions.create(**options).choices]
    sampled = Sampling(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95, seed=11)
    assert first == [c.text for c in raw_session(served.session).complete(["7+1="] * 3, sampled)]
    assert first != [c.text for c in client.completions.create(**{**options, "seed": 12}).choices]


def test_concurrent_requests_are_batched_and_answer_as_they_would_alone(served):
    """20 requests at once (streamed and not, plain and chat, different lengths): each equals its
    answer alone, and fewer batches ran than requests."""
    client = served.client(timeout=300)
    jobs = []
    for i, prompt in enumerate(PROMPTS):
        chat, stream, max_tokens = i % 3 == 0, i % 2 == 0, 4 + (i * 7) % 11
        if chat:
            messages = [{"role": "user", "content": prompt}]
            jobs.append((chat, stream, messages, max_tokens, expected_chat(served, messages, max_tokens)[0]))
        else:
            jobs.append(
                (chat, stream, prompt, max_tokens, expected_completion(served, prompt, max_tokens)[0])
            )

    def ask(job):
        chat, stream, what, max_tokens, _ = job
        if chat:
            reply = client.chat.completions.create(
                model=served.name, messages=what, max_tokens=max_tokens, stream=stream
            )
            if stream:
                return "".join(c.choices[0].delta.content or "" for c in reply)
            return reply.choices[0].message.content
        reply = client.completions.create(
            model=served.name, prompt=what, max_tokens=max_tokens, stream=stream
        )
        return "".join(c.choices[0].text for c in reply) if stream else reply.choices[0].text

    before = served.health()
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [job[-1] for job in jobs]
    after = served.health()
    assert after["requests_done"] - before["requests_done"] == len(jobs)
    assert after["batches"] - before["batches"] < len(jobs)  # requests shared batches


# ------------------------------------------------------------------------------- bad requests


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served):
    client, name = served.client(), served.name

    def error_of(call):
        with pytest.raises(openai.APIStatusError) as caught:
            call()
        body = caught.value.body
        assert set(body) == {"message", "type", "param", "code"}, body  # the client unwraps "error"
        return caught.value.status_code, body

    response = httpx.post(f"{served.url}/v1/completions", content=b'{"model": "x", "prompt": ', timeout=30)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response.json()["error"]["code"] == "invalid_json"

    status, body = error_of(lambda: client.completions.create(model="gpt-4", prompt="1+1="))
    assert status == 404 and body["code"] == "model_not_found" and name in body["message"]
    status, body = error_of(lambda: client.completions.create(model=name, prompt="1+1=", max_tokens=-3))
    assert status == 400 and body["param"] == "max_tokens" and body["type"] == "invalid_request_error"
    status, body = error_of(lambda: client.completions.create(model=name, prompt="1+1=", max_tokens=10**9))
    assert status == 400 and body["code"] == "context_length_exceeded" and body["param"] == "max_tokens"
    context = served.session.max_length
    status, body = error_of(
        lambda: client.completions.create(model=name, prompt="1+" * context, max_tokens=4)
    )
    assert status == 400 and body["code"] == "context_length_exceeded" and body["param"] == "prompt"
    status, body = error_of(
        lambda: client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "1+" * context}], max_tokens=4
        )
    )
    assert status == 400 and body["code"] == "context_length_exceeded" and body["param"] == "messages"
    status, body = error_of(
        lambda: client.completions.create(model=name, prompt="1+1=", extra_body={"colour": 1})
    )
    assert status == 400 and body["param"] == "colour" and "Unrecognized request argument" in body["message"]
    status, body = error_of(
        lambda: client.completions.create(model=name, prompt="1+1=", presence_penalty=0.5)
    )
    assert status == 400 and body["param"] == "presence_penalty" and body["code"] == "unsupported_parameter"
    status, body = error_of(lambda: client.completions.create(model=name, prompt=[1, 2, 3]))
    assert status == 400 and body["param"] == "prompt"
    status, body = error_of(lambda: client.chat.completions.create(model=name, messages=[]))
    assert status == 400 and body["param"] == "messages"
    status, body = error_of(lambda: client.completions.create(model=name, prompt="1+1=", temperature="hot"))
    assert status == 400 and body["param"] == "temperature"
    response = httpx.get(f"{served.url}/v1/engines", timeout=30)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"

    # OpenAI's defaults of what comm-serve cannot do are accepted (clients send them)
    reply = client.completions.create(
        model=name, prompt="3+4=", max_tokens=5, presence_penalty=0, frequency_penalty=0.0, user="me"
    )
    assert reply.choices[0].text == expected_completion(served, "3+4=", 5)[0]
    assert served.health() | {"batches": 0, "requests_done": 0, "tokens_generated": 0} == {
        "status": "ok",
        "model": name,
        "waiting": 0,
        "running": 0,
        "batches": 0,
        "requests_done": 0,
        "tokens_generated": 0,
    }


# ------------------------------------------------------------------------------- leaving, queueing


def test_a_client_that_leaves_stops_its_generation(served, monkeypatch):
    """Streamed or not, a request whose client goes away stops generating at once (a few steps,
    not its 200 tokens), nothing stays queued or running, and the next request is answered."""
    monkeypatch.setenv(FAULT, "0.05")  # every decoding step takes 50 ms
    options = {"model": served.name, "prompt": "1+1=", "max_tokens": 200}
    start = served.health()["tokens_generated"]
    with httpx.stream(
        "POST", f"{served.url}/v1/completions", json={**options, "stream": True}, timeout=60
    ) as r:
        events = (line for line in r.iter_lines() if line.startswith("data: {"))
        next(events), next(events)  # two pieces of text, then the client hangs up
    health = served.wait_until(lambda h: h["running"] == 0 and h["requests_done"] > 0)
    assert health["waiting"] == 0 and health["tokens_generated"] - start < 100

    start = health["tokens_generated"]
    with pytest.raises(httpx.ReadTimeout):  # a client that gives up waiting for a whole reply
        httpx.post(f"{served.url}/v1/completions", json=options, timeout=1.0)
    health = served.wait_until(lambda h: h["running"] == 0)
    assert health["waiting"] == 0 and health["tokens_generated"] - start < 100

    monkeypatch.delenv(FAULT)
    reply = served.client().completions.create(model=served.name, prompt="2+2=", max_tokens=6)
    assert reply.choices[0].text == expected_completion(served, "2+2=", 6)[0]


def test_past_the_queue_a_request_gets_503_and_the_server_recovers(compositions, monkeypatch):
    monkeypatch.setenv(FAULT, "0.1")
    with running_server(compositions["same"], max_queue=1, batching=False) as server:
        client, name = server.client(timeout=120), server.name
        running = client.completions.create(model=name, prompt="1+1=", max_tokens=100, stream=True)
        next(iter(running))  # the first request is generating
        queued = concurrent.futures.ThreadPoolExecutor(1).submit(
            client.completions.create, model=name, prompt="2+2=", max_tokens=3
        )
        server.wait_until(lambda h: h["waiting"] == 1)
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model=name, prompt="3+3=", max_tokens=3)
        assert caught.value.status_code == 503
        assert (
            caught.value.body["code"] == "server_overloaded" and caught.value.body["type"] == "server_error"
        )
        running.close()  # the client leaves: its generation stops, the queued request runs
        assert len(queued.result(timeout=120).choices[0].text) <= 3
        monkeypatch.delenv(FAULT)
        assert client.completions.create(model=name, prompt="4+4=", max_tokens=3).choices[0].finish_reason


# ------------------------------------------------------------------------------- the command


def test_the_comm_serve_command_serves_and_stops_on_ctrl_c(compositions):
    env = cli_env()
    process = subprocess.Popen(
        [sys.executable, "-m", "comm_cli.serve", f"checkpoint={compositions['same']}", "port=0"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "serving run at http://127.0.0.1:" in line:
                break
        url = line.split(" at ")[1].split(" ")[0]
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["run"]
        assert (
            client.completions.create(model="run", prompt="1+2=", max_tokens=3).usage.completion_tokens <= 3
        )
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0, "".join(lines) + process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_a_port_in_use_or_a_missing_extra_is_one_line(compositions, capsys, monkeypatch):
    import socket

    from comm_cli.serve import main
    from tests.helpers import run_in_process

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    with taken:
        code = run_in_process(main, "comm-serve", [f"checkpoint={compositions['same']}", f"port={port}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"comm-serve: error: cannot listen on 127.0.0.1:{port}")
    assert len(err.splitlines()) == 1

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the serve extra were not installed
    code = run_in_process(main, "comm-serve", [f"checkpoint={compositions['same']}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "pip install 'comm-cli[serve]'" in err and len(err.splitlines()) == 1


def test_the_session_gives_each_row_its_limit_and_exact_counts(compositions):
    """The batch Session.complete runs for comm-serve: rows with their own max_new_tokens and rows
    cut by a stop string count only their own tokens, as each would alone."""
    session = raw_session(load_session(ServeConfig(checkpoint=str(compositions["cross"]))))
    texts = PROMPTS[:6]
    limits = [3, 9, 5, 12, 1, 7]
    stop = session.complete(texts[:1], Sampling(max_new_tokens=12))[0].text[2:4]
    sampling = Sampling(max_new_tokens=99, stop=[stop])
    alone = [session.complete([t], Sampling(max_new_tokens=n, stop=[stop]))[0] for t, n in zip(texts, limits)]
    assert session.complete(texts, sampling, max_new_tokens=limits) == alone
    assert [c.completion_tokens for c in alone if c.finish_reason == "length"] == [
        n for c, n in zip(alone, limits) if c.finish_reason == "length"
    ]


def test_configs_and_help_name_comm_serve():
    out = subprocess.run(
        [sys.executable, "-m", "comm_cli.serve", "--help"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "comm-serve" in out.stdout and "/v1/chat/completions" in out.stdout
