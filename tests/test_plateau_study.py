"""scripts/plateau_study.py on the smoke variants of both experiments: every run writes its
trajectory (held-out accuracy, per-bridge diagnostics) and its final numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.gguf_writer import byte_level_vocabulary, tiny_llama, write_llama_gguf
from tests.helpers import REPO, cli_env


def study(tmp_path, experiment: str, *extra: str) -> list[dict]:
    out = tmp_path / "study.jsonl"
    args = [
        "--experiment", experiment, "--steps", "4", "--eval-every", "2", "--eval-examples", "6",
        "--greedy", "4", "--cache", str(tmp_path / "states"), "--out", str(out), *extra,
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plateau_study.py"), *args],
        cwd=tmp_path, env=cli_env(cache_dir=tmp_path / "cache"), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def check_trajectories(lines: list[dict], runs: set[str], bridges: int) -> None:
    finals = {e["run"]: e for e in lines if e["event"] == "final"}
    assert set(finals) == runs
    for run in runs:
        evals = [e for e in lines if e["event"] == "eval" and e["run"] == run]
        assert [e["step"] for e in evals] == [0, 2, 4]
        first = evals[0]["bridges_heldout"]
        assert len(first) == bridges
        assert all(r["output_ratio"] == 0.0 for r in first)  # step 0: the anchor
        for reading in first:
            assert 0.0 <= reading["entropy"] <= 1.0 + 1e-6
            assert 0.0 <= reading["answer_mass"] <= reading["answer_mass_best_head"] <= 1.0
        for e in evals[1:]:
            assert len(e["grads"]) == bridges
            assert all(g["o"] > 0 for g in e["grads"])
            assert 0.0 <= e["heldout_first"] <= 1.0 and 0.0 <= e["heldout_exact"] <= 1.0
        assert finals[run]["first_step_50"] in (None, 2, 4)


def test_key_value_study_logs_every_run(tmp_path):
    lines = study(
        tmp_path, "kv_smoke", "--calm-seeds", "0,1", "--setting", "fast:optimizer.lr=3e-3;lr_scales=q_proj:2"
    )
    runs = {f"kv_smoke/{s}/spec0/calm{c}" for s in ("base", "fast") for c in (0, 1)}
    check_trajectories(lines, runs, bridges=4)
    starts = {e["run"]: e for e in lines if e["event"] == "start"}
    assert starts["kv_smoke/fast/spec0/calm0"]["lr"] == 3e-3
    assert starts["kv_smoke/fast/spec0/calm0"]["lr_scales"] == {"q_proj": 2.0}
    finals = [e for e in lines if e["event"] == "final"]
    assert all(0.0 <= e["kv_arithmetic_heldout"] <= 1.0 for e in finals)


@pytest.mark.slow
def test_real_facts_study_logs_the_name_mass(tmp_path):
    gguf = write_llama_gguf(tiny_llama(len(byte_level_vocabulary())), tmp_path / "tiny.gguf")
    # the tiny anchor's byte-level tokenizer makes long rows
    lines = study(
        tmp_path,
        "real_facts_smoke",
        "--override",
        f"facts.source={gguf}",
        "--override",
        "data.max_length=256",
    )
    check_trajectories(lines, {"real_facts_smoke/base/spec0/calm0"}, bridges=1)
    evals = [e for e in lines if e["event"] == "eval"]
    assert all(0.0 <= e["bridges_heldout"][0]["name_mass"] <= 1.0 for e in evals)
    final = next(e for e in lines if e["event"] == "final")
    assert {"one_hop", "two_hop", "skill_bridges_on"} <= set(final)
