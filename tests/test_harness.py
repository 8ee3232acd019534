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
