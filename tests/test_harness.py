"""The lm-evaluation-harness backend: CommLM's numbers are comm's own, and harness tasks run
through comm-eval, lm_eval.simple_evaluate and comm-lm-eval (tasks: tests/harness_tasks, local
YAML over local json; nothing is downloaded)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

# The harness extra is part of `make install` (CI included): a missing lm-eval fails here, never skips.
from lm_eval.api.instance import Instance  # noqa: E402

from comm_cli.compose.encoding import CompletionCollator  # noqa: E402
from comm_cli.data.loading import DataConfig  # noqa: E402
from comm_cli.data.tokenize import tokenize_split  # noqa: E402
from comm_cli.eval import main as eval_main  # noqa: E402
from comm_cli.evaluation.harness import CommLM  # noqa: E402
from comm_cli.losses import next_token_loss  # noqa: E402
from tests.helpers import REPO, build_composition, build_workspace, cli_env, run_in_process  # noqa: E402

TASKS = REPO / "tests" / "harness_tasks"
NO_KV_TASKS = []


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    ws = build_workspace(root / "ws")
    return ws, root, build_composition(ws, root / "composition")


def comm_logprob(lm: CommLM, context: str, continuation: str, bridges_off: bool = False) -> float:
    """comm's own teacher-forced log-probability: its tokenisation, collator and loss."""
    import datasets

    rows = datasets.Dataset.from_list([{"prompt": context, "completion": continuation}])
    tokenized, _ = tokenize_split(rows, lm.tokenizer, DataConfig(add_bos=True, add_eos=False, max_length=256))
    batch = CompletionCollator(lm.tokenizer.pad_token_id)([tokenized[0]])
    with torch.no_grad(), lm.model.model.bridges_disabled() if bridges_off else torch.no_grad():
        logits = lm.model.logits(batch)
    return -float(next_token_loss(logits.float(), batch["labels"], reduction="sum"))


def test_loglikelihood_equals_comms_teacher_forced_logprob(composed):
    ws, _, composition = composed
    lm = CommLM(checkpoint=str(composition), device="cpu", batch_size=3)
    pairs = [("3+4=", "7"), ("3+4=", "12 ok"), ("9+9=", "18"), ("", "5+5=10")]
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)
    ]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, _) in zip(pairs, got):
        assert logprob == pytest.approx(comm_logprob(lm, context, continuation), abs=1e-4)
    # rolling: the whole text after bos, in one window here
    text = "1+2=3 ok\n4+4=8"
    (rolling,) = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True
    )
    assert rolling == pytest.approx(comm_logprob(lm, "", text), abs=1e-4)
    # bridges off: the anchor's own numbers
    off = CommLM(checkpoint=str(composition), device="cpu", bridges_off="true")
    anchor = CommLM(model="anchor", anchor=str(ws["anchor"]), device="cpu")
    off_ll = off.loglikelihood(requests, disable_tqdm=True)
    anchor_ll = anchor.loglikelihood(requests, disable_tqdm=True)
    for (a, _), (b, _), (c, _) in zip(off_ll, anchor_ll, got):
        assert a == pytest.approx(b, abs=1e-5)
        assert abs(a - c) > 1e-3  # the bridges do change the composition's numbers


def harness_args(ws, root, name, *extra):
    return [
        f"name={name}",
        f"output_root={root}",
        f"anchor.name_or_path={ws['anchor']}",
        f"augment.name_or_path={ws['augment']}",
        *NO_KV_TASKS,
        "harness.tasks=[comm_test_mc,comm_test_gen]",
        f"harness.include_path={TASKS}",
        "harness.batch_size=4",
        "logger=none",
        *extra,
    ]


def test_comm_eval_runs_harness_tasks_and_bridges_off_is_the_anchor(composed):
    ws, root, composition = composed
    args = harness_args(ws, root, "h_calm", f"checkpoint={composition}", "bridges_off=true")
    assert run_in_process(eval_main, "comm-eval", args) == 0
    assert run_in_process(eval_main, "comm-eval", harness_args(ws, root, "h_anchor", "model=anchor")) == 0
    calm = json.loads((root / "h_calm" / "results.json").read_text())
    anchor = json.loads((root / "h_anchor" / "results.json").read_text())

    def values(data, variant):
        return {(r["task"], r["metric"]): r["value"] for r in data["results"] if r["variant"] == variant}

    on, off, alone = values(calm, None), values(calm, "bridges off"), values(anchor, None)
    assert {("comm_test_mc", "acc"), ("comm_test_gen", "exact_match")} <= set(on)
    assert all(r["n"] == 6 for r in calm["results"])
    assert off == alone
    # lm-eval's own record (versions, task configs) is kept for tracing a number to its task
    assert calm["harness"]["default"]["versions"]["comm_test_mc"] == 1.0
    assert "comm_test_gen" in calm["harness"]["bridges off"]["configs"]

    def loglikelihoods(run, variant_model):
        lines = [json.loads(line) for line in (root / run / "predictions.jsonl").read_text().splitlines()]
        return [p["prediction"] for p in lines if p["task"] == "comm_test_mc" and p["model"] == variant_model]

    mc_off, mc_anchor = loglikelihoods("h_calm", "calm (bridges off)"), loglikelihoods("h_anchor", "anchor")
    assert len(mc_off) == 6 and len(mc_anchor) == 6
    for a, b in zip(mc_off, mc_anchor):
        assert [x[0] for x in a] == pytest.approx([x[0] for x in b], abs=1e-5)
    gen = [
        json.loads(line)
        for line in (root / "h_anchor" / "predictions.jsonl").read_text().splitlines()
        if '"comm_test_gen"' in line
    ]
    # generate_until stops at the task's until strings and never returns them
    assert len(gen) == 6 and all(
        "\n" not in p["prediction"][0] and ";" not in p["prediction"][0] for p in gen
    )


def test_simple_evaluate_finds_comm_by_name(composed):
    import lm_eval
    from lm_eval.tasks import TaskManager

    ws, _, composition = composed
    out = lm_eval.simple_evaluate(
        model="comm",
        model_args=f"checkpoint={composition},device=cpu",
        tasks=["comm_test_mc"],
        task_manager=TaskManager(include_path=str(TASKS)),
        limit=3,
    )
    assert out["results"]["comm_test_mc"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert out["config"]["comm_checkpoint"] == str(composition)


def test_harness_errors_are_one_line(composed, tmp_path, capsys, monkeypatch):
    ws, root, composition = composed
    args = harness_args(ws, tmp_path, "h_bad", f"checkpoint={composition}", "harness.tasks=[comm_test_mcq]")
    assert run_in_process(eval_main, "comm-eval", args) == 2
    assert "lm-eval knows no task comm_test_mcq (did you mean comm_test_mc?)" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    assert (
        run_in_process(eval_main, "comm-eval", harness_args(ws, tmp_path, "h_missing", "model=anchor")) == 2
    )
    assert "pip install 'comm-cli[harness]'" in capsys.readouterr().err
    assert not (tmp_path / "h_bad" / "results.json").exists()


@pytest.mark.slow
def test_comm_lm_eval_command(composed, tmp_path):
    ws, _, _ = composed
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "comm_cli.evaluation.harness_cli",
            "--model",
            "comm",
            "--model_args",
            f"model=anchor,anchor={ws['anchor']}",
            "--device",
            "cpu",
            "--tasks",
            "comm_test_gen",
            "--include_path",
            str(TASKS),
            "--output_path",
            str(tmp_path / "lm_eval_out"),
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (results,) = list((tmp_path / "lm_eval_out").rglob("results_*.json"))
    data = json.loads(results.read_text())
    assert data["results"]["comm_test_gen"]["exact_match,none"] >= 0.0
    assert data["config"]["comm_model"] == "anchor"


# --- compositions whose augment reads its own tokens -------------------------------------------------

CROSS_PAIRS = [
    ("6+6=", "12"),
    ("the quick brown", " fox"),
    ("", "hello world"),  # lm-eval's empty context: the prefix token (bos) conditions the text
    ("it's 123 +", " 4567 = we're"),
    ("hello", " wor"),
]


def save_cross_composition(root, mask_mode: str = "causal"):
    """A saved Llama anchor (Llama-3-style byte-level BPE) and Qwen2 augment (GPT-2's BPE) with
    their tokenizers and random non-zero bridges: the augment reads its own tokens."""
    from transformers import AutoModelForCausalLM

    from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
    from tests import tokenizer_zoo as zoo
    from tests.conftest import tiny_model

    tokenizers = {"anchor": zoo.build("byte_bpe"), "augment": zoo.build("gpt2_bpe")}
    shapes = {"anchor": ("llama", 0, 48, 4), "augment": ("qwen2", 1, 32, 3)}
    for name, (family, seed, width, layers) in shapes.items():
        if not (root / name).exists():
            model = tiny_model(family, seed=seed, width=width, layers=layers, vocab=len(tokenizers[name]))
            model.save_pretrained(root / name)
            tokenizers[name].save_pretrained(root / name)
    bases = [AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.float32) for name in shapes]
    torch.manual_seed(0)
    bridge = BridgeConfig(num_heads=4, zero_init_output=False)
    model = ComposedModel.from_models(*bases, MappingSpec(every=1), bridge, mask_mode=mask_mode)
    model.use_tokenizers(tokenizers["anchor"], [tokenizers["augment"]])
    return model.save_pretrained(root / f"composition_{mask_mode}")


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness_cross")
    return root, {mode: save_cross_composition(root, mode) for mode in ("causal", "prompt")}


def own_logprob(model, context: str, continuation: str) -> tuple[float, bool]:
    """comm's own log-probability of the continuation (and whether it is the greedy one):
    ``model(**model.encode([context], [continuation], add_eos=False))``, per-token log-probs summed
    over the label positions."""
    return label_logprob(model, model.encode([context], [continuation], add_eos=False))


def label_logprob(model, batch) -> tuple[float, bool]:
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**batch).logits[0, :-1].float(), dim=-1)
    labels = batch["labels"][0, 1:]
    scored = labels != -100
    picked = logprobs[scored].gather(-1, labels[scored][:, None])
    return float(picked.sum()), bool((logprobs[scored].argmax(-1) == labels[scored]).all())


def loglikelihood_requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def rolling(lm, text: str) -> float:
    (total,) = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True
    )
    return total


@pytest.mark.parametrize("mask_mode", ["causal", "prompt"])
def test_cross_tokenizer_loglikelihood_is_comms_own(cross, mask_mode):
    _, compositions = cross
    lm = CommLM(checkpoint=str(compositions[mask_mode]), device="cpu", batch_size=3)
    model = lm.model.model
    assert model.read_plan() is not None  # the augment reads its own tokens
    # a continuation that is the composition's greedy next token after a prompt (a prompt is read
    # complete, as generation reads it, so any completion gives the same logits at its end): is_greedy
    tokenizer = model.anchor_tokenizer
    with torch.no_grad():
        batch = model.encode(["the lazy"], [" dog"], add_eos=False)
        first = int((batch["labels"][0] != -100).nonzero()[0])
        best = int(model(**batch).logits[0, first - 1].argmax())
    greedy_text = tokenizer.decode([best])
    assert tokenizer(greedy_text, add_special_tokens=False)["input_ids"] == [best]
    pairs = [*CROSS_PAIRS, ("the lazy", greedy_text)]
    got = lm.loglikelihood(loglikelihood_requests(pairs), disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        own, own_greedy = own_logprob(model, context, continuation)
        assert logprob == pytest.approx(own, abs=1e-4), (context, continuation)
        assert greedy == own_greedy
    assert got[-1][1] and not all(greedy for _, greedy in got)
    # rolling, one window: the text after lm-eval's prefix token (here bos)
    text = "the quick brown fox jumps over the lazy dog; it's 123"
    assert rolling(lm, text) == pytest.approx(own_logprob(model, "", text)[0], abs=1e-4)
    if mask_mode == "causal":  # where it is also comm's own score of the text (model.encode([text]))
        assert rolling(lm, text) == pytest.approx(
            label_logprob(model, model.encode([text], add_eos=False))[0], abs=1e-4
        )


def test_cross_tokenizer_requests_longer_than_the_context(cross):
    """Long documents go in rolling windows that make up the document, each read within
    max_length; a long context keeps its end."""
    _, compositions = cross
    lm = CommLM(checkpoint=str(compositions["causal"]), device="cpu", batch_size=4, max_length=8)
    text = "the quick brown fox jumps over the lazy dog; hello world, it's 123 + 4567 = we're über"
    windows = lm._text_windows(text)
    assert len(windows) > 3 and "".join(piece for _, piece in windows) == text
    assert windows[0][0] == "" and all(context for context, _ in windows[1:])
    assert all(len(lm._text_row(context, piece)[0]["input_ids"]) <= 8 for context, piece in windows)
    scores = lm.loglikelihood(loglikelihood_requests(windows), disable_tqdm=True)
    assert rolling(lm, text) == pytest.approx(sum(score for score, _ in scores), abs=1e-4)
    (long,) = lm.loglikelihood(loglikelihood_requests([(text, " fox")]), disable_tqdm=True)
    kept = lm._keep_tail(text, 8 - 1 - 1)  # one place for bos, one for " fox"
    assert text.endswith(kept) and 0 < len(kept) < len(text)
    assert long[0] == pytest.approx(own_logprob(lm.model.model, kept, " fox")[0], abs=1e-4)


def test_cross_tokenizer_bridges_off_is_the_anchor_in_lm_evals_own_reading(cross):
    """With the bridges off the text reading gives what lm-eval's own (TemplateLM, token ids) gives
    for the anchor alone, on requests both tokenise alike; and the bridges do change the numbers."""
    root, compositions = cross
    checkpoint = str(compositions["causal"])
    on = CommLM(checkpoint=checkpoint, device="cpu", batch_size=2)
    off = CommLM(checkpoint=checkpoint, device="cpu", batch_size=2, bridges_off="true")
    anchor = CommLM(model="anchor", anchor=str(root / "anchor"), device="cpu", batch_size=2)
    assert anchor.plan is None and off.plan is not None
    pairs = [("6+6=", "12"), ("", "hello world"), ("the quick", " brown fox")]
    requests = loglikelihood_requests(pairs)
    for (context, _), (a, _), (b, _), (c, _) in zip(
        pairs,
        off.loglikelihood(requests, disable_tqdm=True),
        anchor.loglikelihood(requests, disable_tqdm=True),
        on.loglikelihood(requests, disable_tqdm=True),
    ):
        assert a == pytest.approx(b, abs=1e-5)
        # a context is read complete, so the bridges have augment tokens to read when scoring
        assert abs(a - c) > 1e-3 or not context
    generation = [
        Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}), i)
        for i, p in enumerate(["6+6=", "hello", "the quick brown"])
    ]
    assert off.generate_until(generation, disable_tqdm=True) == anchor.generate_until(
        generation, disable_tqdm=True
    )


def comm_generate(checkpoint, prompts, max_new_tokens, stop, **options) -> list[str]:
    """comm-generate's replies, one prompt at a time (the Session it runs on, loaded as it loads it)."""
    from comm_cli.inference.session import Sampling, load_session
    from comm_cli.schema import UseConfig

    session = load_session(UseConfig(checkpoint=str(checkpoint), device="cpu", **options))
    sampling = Sampling(max_new_tokens=max_new_tokens, stop=list(stop))
    return [session.complete([prompt], sampling)[0].text for prompt in prompts]


@pytest.mark.parametrize("mask_mode", ["causal", "prompt"])
def test_cross_tokenizer_generate_until_is_comm_generate(cross, mask_mode):
    _, compositions = cross
    lm = CommLM(checkpoint=str(compositions[mask_mode]), device="cpu", batch_size=3)
    prompts = ["6+6=", "the quick brown", "hello world, it's", "über", "the lazy dog jumps over"]
    settings = [
        {"until": ["\n", "."], "max_gen_toks": 8, "do_sample": False},
        {"until": "o", "max_gen_toks": 5},
    ]
    requests = [
        Instance("generate_until", {}, (prompt, settings[i % 2]), i) for i, prompt in enumerate(prompts)
    ]
    got = lm.generate_until(requests, disable_tqdm=True)
    for i, (prompt, text) in enumerate(zip(prompts, got)):
        until = settings[i % 2]["until"]
        (expected,) = comm_generate(
            compositions[mask_mode],
            [prompt],
            settings[i % 2]["max_gen_toks"],
            [until] if isinstance(until, str) else until,
        )
        assert text == expected, prompt
    assert any(got) and all("o" not in text for text in got[1::2])


def test_comm_lm_eval_on_a_cross_tokenizer_pair(cross, tmp_path):
    """`comm-lm-eval` (lm-eval's command line with comm registered, argv patched) runs a
    multiple-choice and a generation task on a composition whose augment has its own tokenizer:
    its results JSON names the composition, and the logged samples are comm's own numbers."""
    from comm_cli.evaluation.harness_cli import main as lm_eval_main

    _, compositions = cross
    checkpoint = compositions["causal"]
    args = [
        "--model", "comm",
        "--model_args", f"checkpoint={checkpoint}",
        "--batch_size", "4",
        "--device", "cpu",
        "--tasks", "comm_test_text_mc,comm_test_text_gen",
        "--include_path", str(TASKS),
        "--output_path", str(tmp_path / "out"),
        "--log_samples",
    ]  # fmt: skip
    assert run_in_process(lm_eval_main, "comm-lm-eval", args) == 0
    (results,) = list((tmp_path / "out").rglob("results_*.json"))
    data = json.loads(results.read_text())
    assert data["config"]["comm_model"] == "calm" and data["config"]["comm_checkpoint"] == str(checkpoint)
    assert data["versions"] == {"comm_test_text_mc": 1.0, "comm_test_text_gen": 1.0}
    assert data["n-samples"]["comm_test_text_mc"]["effective"] == 6

    from comm_cli.compose import ComposedModel

    model = ComposedModel.from_pretrained(checkpoint).eval()
    rows = [json.loads(line) for line in (TASKS / "text.jsonl").read_text().splitlines()]

    def samples(task):
        (path,) = list((tmp_path / "out").rglob(f"samples_{task}_*.jsonl"))
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        return sorted(lines, key=lambda s: s["doc_id"])

    correct = []
    for row, sample in zip(rows, samples("comm_test_text_mc")):
        scores = [float(resp[0][0]) for resp in sample["resps"]]
        own = [own_logprob(model, row["question"], " " + choice)[0] for choice in row["choices"]]
        assert scores == pytest.approx(own, abs=1e-4)
        correct.append(max(range(len(own)), key=own.__getitem__) == row["answer"])
    assert data["results"]["comm_test_text_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    generated = [sample["resps"][0][0] for sample in samples("comm_test_text_gen")]
    assert generated == comm_generate(checkpoint, [row["question"] for row in rows], 8, ["\n", "."])
    assert 0.0 <= data["results"]["comm_test_text_gen"]["exact_match,none"] <= 1.0
