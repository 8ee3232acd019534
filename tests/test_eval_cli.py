"""comm-eval on tiny local models: results files, metrics, baselines, trackers, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from comm_cli.eval import main as eval_main
from comm_cli.evaluation import metrics as M
from tests.helpers import base_args, build_workspace, cli_env, run_in_process, run_train, wandb_history


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workspace, a short CALM run and a short LoRA run."""
    root = tmp_path_factory.mktemp("eval")
    ws = build_workspace(root / "ws")
    common = ["trainer.max_steps=4", "trainer.save_every=null", "trainer.eval_every=null"]
    assert run_train(base_args(ws, root, "calm") + common) == 0
    assert run_train(base_args(ws, root, "lora") + common + ["method=lora"]) == 0
    assert run_train(base_args(ws, root, "full") + common + ["method=full"]) == 0
    translation = root / "mt.jsonl"
    translation.write_text(
        "".join(json.dumps({"source": f"{i}+{i}=", "target": f"{2 * i} ok"}) + "\n" for i in range(6))
    )
    return ws, root, translation


def eval_args(ws, root, name, *extra):
    return [
        f"name={name}",
        f"output_root={root}",
        f"anchor.name_or_path={ws['anchor']}",
        f"augment.name_or_path={ws['augment']}",
        "+task@tasks.qa=jsonl_qa",
        f"tasks.qa.data.data_files={ws['data']}",
        "tasks.qa.max_examples=12",
        "tasks.qa.max_new_tokens=3",
        "logger=none",
        *extra,
    ]


def results(root, name):
    data = json.loads((root / name / "results.json").read_text())
    predictions = [json.loads(line) for line in (root / name / "predictions.jsonl").read_text().splitlines()]
    return data, predictions


def test_a_composition_is_scored_and_written(trained):
    ws, root, _ = trained
    args = eval_args(ws, root, "ev", f"checkpoint={root / 'calm' / 'composition'}", "logger=wandb")
    assert run_in_process(eval_main, "comm-eval", args) == 0
    data, predictions = results(root, "ev")
    metrics = {row["metric"] for row in data["results"]}
    assert metrics == {"loss", "perplexity", "exact_match"}
    for row in data["results"]:
        assert set(row) >= {"task", "metric", "value", "n", "model", "checkpoint"}
        assert row["task"] == "qa" and row["n"] == 12 and row["model"] == "calm"
        assert row["checkpoint"] == str(root / "calm" / "composition")
    assert data["config"]["model"] == "calm"
    assert len(predictions) == 12
    assert set(predictions[0]) >= {"prompt", "prediction", "reference", "correct"}
    # correctness is exact match of the first numbers
    for p in predictions:
        expected = M.extractor("first_number")(p["reference"])
        assert p["correct"] == (M.extractor("first_number")(p["prediction"]) == expected)
    rows, _, _ = wandb_history(root / "ev")
    logged = {k for row in rows for k in row}
    assert {"qa/loss", "qa/exact_match", "qa/perplexity"} <= logged
    assert list(
        (root / "ev" / "wandb").glob("offline-run-*/files/media/table/sample_predictions*.table.json")
    )


def test_bridges_off_scores_the_anchor(trained):
    ws, root, _ = trained
    assert (
        run_in_process(
            eval_main,
            "comm-eval",
            eval_args(ws, root, "off", f"checkpoint={root / 'calm' / 'composition'}", "bridges_off=true"),
        )
        == 0
    )
    assert run_in_process(eval_main, "comm-eval", eval_args(ws, root, "anc", "model=anchor")) == 0
    off = {
        r["metric"]: r["value"] for r in results(root, "off")[0]["results"] if r["variant"] == "bridges off"
    }
    anchor = {r["metric"]: r["value"] for r in results(root, "anc")[0]["results"]}
    assert off == anchor


@pytest.mark.parametrize("model", ["augment", "lora", "full"])
def test_baselines(trained, model):
    ws, root, _ = trained
    checkpoint = {"augment": "null", "lora": root / "lora" / "adapter", "full": root / "full" / "model"}[
        model
    ]
    assert (
        run_in_process(
            eval_main,
            "comm-eval",
            eval_args(ws, root, f"b_{model}", f"model={model}", f"checkpoint={checkpoint}"),
        )
        == 0
    )
    data, _ = results(root, f"b_{model}")
    assert {r["model"] for r in data["results"]} == {model}


def test_translation_metrics_and_sampling(trained):
    ws, root, translation = trained
    args = eval_args(ws, root, "mt", f"checkpoint={root / 'calm' / 'composition'}")[:4] + [
        "+task@tasks.mt=translation",
        f"tasks.mt.data.data_files={translation}",
        "tasks.mt.max_new_tokens=4",
        "+task@tasks.sampled=jsonl_qa",
        f"tasks.sampled.data.data_files={ws['data']}",
        "tasks.sampled.metrics=[exact_match]",
        "tasks.sampled.max_examples=4",
        "tasks.sampled.max_new_tokens=2",
        "generation.do_sample=true",
        "generation.num_samples=3",
        f"checkpoint={root / 'calm' / 'composition'}",
        "logger=none",
    ]
    assert run_in_process(eval_main, "comm-eval", args) == 0
    data, predictions = results(root, "mt")
    by_metric = {(r["task"], r["metric"]): r["value"] for r in data["results"]}
    # with sampling on, chrF/BLEU score the first sample of each prompt
    mt_predictions = [p["prediction"][0] for p in predictions if p["task"] == "mt"]
    mt_references = [p["reference"] for p in predictions if p["task"] == "mt"]
    assert by_metric[("mt", "chrf")] == pytest.approx(M.chrf(mt_predictions, mt_references))
    assert by_metric[("mt", "bleu")] == pytest.approx(M.bleu(mt_predictions, mt_references))
    assert ("sampled", "pass@3") in by_metric
    sampled = [p for p in predictions if p["task"] == "sampled"]
    assert all(len(p["prediction"]) == 3 and len(p["correct"]) == 3 for p in sampled)


def test_extractors():
    assert M.extractor("first_number")("x 12 and -3") == "12"
    assert M.extractor("last_number")("x 12 and -3") == "-3"
    assert M.extractor("comm_cli.experiments.kv_arithmetic.tasks:answer")("4+7-3=8") == "8"
    assert M.extractor("comm_cli.experiments.kv_arithmetic.tasks:substitution")("4+7-3=8") == "4+7-3"
    assert M.extractor("regex", r"answer: (\w+)")("the answer: yes.") == "yes"
    assert M.extractor("full")("  hi \n") == "hi"
    assert M.exact_match(
        ["4+1=5", "4+2=7"], ["4+1=5", "4+2=6"], M.extractor("comm_cli.experiments.kv_arithmetic.tasks:answer")
    ) == [True, False]


def test_eval_errors_are_one_line(trained, tmp_path):
    ws, root, _ = trained
    env = cli_env()
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "comm_cli.eval",
            *eval_args(ws, tmp_path, "e1", f"checkpoint={tmp_path / 'nothing'}"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("comm-eval: error:")
    assert f"checkpoint '{tmp_path / 'nothing'}' does not exist" in missing.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "comm_cli.eval", *eval_args(ws, tmp_path, "e2", "tasks.qa.extract=regexx")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "extract 'regexx' is not one of" in bad.stderr
    assert not (tmp_path / "e1" / "results.json").exists()
