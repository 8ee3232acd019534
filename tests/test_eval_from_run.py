"""comm-eval after comm-train on your own data: one line scores your file, no line scores the
run's held-out part, the run's settings carry over, and evaluations never overwrite each other."""

from __future__ import annotations

import json

import pytest

from comm_cli.eval import main as eval_main
from comm_cli.evaluation import metrics as M
from tests.helpers import base_args, build_workspace, run_in_process, run_train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short CALM run on a jsonl of your own (10% held out, validated whole at the end)."""
    root = tmp_path_factory.mktemp("from_run")
    ws = build_workspace(root / "ws")
    extra = ["trainer.max_steps=4", "trainer.save_every=null", "trainer.eval_batches=1000"]
    assert run_train(base_args(ws, root, "mine") + extra) == 0
    return ws, root / "mine"


def _own_data_args(ws, run_dir, root) -> list[str]:
    return [
        f"checkpoint={run_dir / 'composition'}",
        f"data.data_files={ws['data']}",
        f"output_root={root}",
        "logger=none",
    ]


def _results(directory):
    data = json.loads((directory / "results.json").read_text())
    return {(r["model"], r["task"], r["metric"]): r for r in data["results"]}


def test_your_file_is_scored_in_one_line_with_the_bridges_off_beside_it(run, tmp_path):
    ws, run_dir = run
    args = _own_data_args(ws, run_dir, tmp_path)
    assert run_in_process(eval_main, "comm-eval", args) == 0
    got = _results(tmp_path / "eval_mine")  # named for the run it evaluates
    task = ws["data"].name.split(".")[0]
    for model in ("calm", "calm (bridges off)"):
        assert {(model, task, m) for m in ("loss", "perplexity", "exact_match")} <= set(got)


def test_no_data_scores_the_runs_held_out_part_as_training_validated_it(run, tmp_path):
    _, run_dir = run
    args = [f"checkpoint={run_dir / 'composition'}", f"output_root={tmp_path}", "logger=none"]
    assert run_in_process(eval_main, "comm-eval", args) == 0
    got = _results(tmp_path / "eval_mine")
    (loss,) = [r for key, r in got.items() if key[0] == "calm" and key[2] == "loss"]
    assert loss["task"].endswith("_held_out")
    trained = json.loads((run_dir / "train_summary.json").read_text())["metrics"]["val/loss"]
    assert loss["value"] == pytest.approx(trained, abs=1e-4)


def test_a_second_evaluation_takes_a_new_directory(run, tmp_path):
    ws, run_dir = run
    args = _own_data_args(ws, run_dir, tmp_path)
    assert run_in_process(eval_main, "comm-eval", args) == 0
    first = (tmp_path / "eval_mine" / "results.json").read_text()
    assert run_in_process(eval_main, "comm-eval", args) == 0
    assert (tmp_path / "eval_mine" / "results.json").read_text() == first
    assert (tmp_path / "eval_mine-2" / "results.json").is_file()


def test_text_answers_are_compared_normalised_and_numbers_with_separators():
    normalized = M.extractor("normalized")
    assert normalized("The Eiffel Tower.") == normalized("eiffel  tower")
    assert M.extractor("first_number")("about 1,234 people") == "1234"
    assert M.exact_match(["It is 12,000."], ["12000"], M.extractor("last_number")) == [True]


def test_a_run_ends_with_a_summary_and_the_command_that_evaluates_it(run):
    _, run_dir = run
    tail = (run_dir / "train.log").read_text().splitlines()[-4:]
    assert "done: 4 steps" in tail[0] and "validation loss" in tail[0]
    assert tail[-1].split("] ", 1)[1].startswith(f"next: comm-eval checkpoint={run_dir / 'composition'}")
