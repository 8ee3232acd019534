"""The whole key-value pipeline (`make demo`) in its fast variant: every step runs and writes
the table in its documented schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, cli_env


@pytest.mark.slow
def test_fast_demo_writes_the_table(tmp_path):
    env = cli_env(cache_dir=tmp_path / "cache")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "kv_demo.py"),
            "--fast",
            "--output-root",
            str(tmp_path / "demo"),
            "--lora-lrs",
            "1e-3,1e-2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    table = json.loads((tmp_path / "demo" / "table.json").read_text())
    systems = [row["system"] for row in table["rows"]]
    assert systems == ["m_A alone", "m_B alone", "LoRA on m_B", "CALM", "CALM, random m_A"]
    for row in table["rows"]:
        assert set(row) == {
            "system",
            "kv_arithmetic_heldout",
            "kv_substitution_heldout",
            "numeric_arithmetic",
            "key_lookup",
            "trainable_params",
        }
        for column in (
            "kv_arithmetic_heldout",
            "kv_substitution_heldout",
            "numeric_arithmetic",
            "key_lookup",
        ):
            assert 0.0 <= row[column] <= 1.0
    params = {row["system"]: row["trainable_params"] for row in table["rows"]}
    assert params["m_A alone"] == params["m_B alone"] == 0
    assert params["CALM"] == params["CALM, random m_A"] > 0 and params["LoRA on m_B"] > 0
    assert set(table["lora_sweep_val_loss"]) == {"1e-3", "1e-2"}
    assert set(table["train_keys_kv_arithmetic"]) == {"LoRA on m_B", "CALM", "CALM, random m_A"}
    # the specialists were built into the cache on first use, and the table was printed
    assert list(Path(tmp_path / "cache").glob("kv_specialists/*/manifest.json"))
    assert "CALM, random m_A" in result.stdout
    # the bridges-off check scores the anchor's numeric arithmetic
    assert "numeric_arithmetic" in table["calm_bridges_off"]


def _table(
    spec_seed: int, calm: list[float], controls: dict[str, float], numeric_on: float, numeric_anchor: float
):
    rows = [
        {"system": name, "kv_arithmetic_heldout": value, "numeric_arithmetic": numeric_anchor}
        for name, value in controls.items()
    ]
    runs = [
        {
            "seed": i,
            "kv_arithmetic_heldout": value,
            "kv_substitution_heldout": value,
            "kv_arithmetic_train_keys": 1.0,
            "numeric_arithmetic": numeric_on,
            "val_loss": 0.1,
        }
        for i, value in enumerate(calm)
    ]
    return {"rows": rows, "calm_runs": runs}


def test_the_seed_summary_reports_mean_minimum_and_spread():
    from comm_cli.experiments.kv_arithmetic.seeds import CONTROLS, format_report, summarise

    controls = {name: 0.05 for name in CONTROLS}
    tables = {
        0: _table(0, [0.90, 0.94], {**controls, "LoRA on m_B": 0.08}, 0.98, 0.985),
        1: _table(1, [0.96, 0.92], controls, 0.99, 0.97),
    }
    accuracy = {
        "augment": {"accuracy": {"lookup_all_keys": 1.0, "lookup_in_heldout_expression": 0.99}},
        "anchor": {"accuracy": {"arithmetic": 0.98, "arithmetic_after_kv_prefix": 0.97}},
    }
    summary = summarise(tables, {0: accuracy, 1: accuracy})
    calm = summary["calm_heldout"]
    assert calm["n"] == 4 and calm["min"] == 0.90 and calm["max"] == 0.96
    assert calm["mean"] == pytest.approx(0.93)
    assert calm["std"] == pytest.approx(0.0258198889747, rel=1e-6)  # sample std of .90 .94 .96 .92
    assert summary["controls"]["LoRA on m_B"]["max"] == 0.08
    assert summary["anchor_skill_max_abs_change"] == pytest.approx(0.02)
    assert [r["specialist_seed"] for r in summary["runs"]] == [0, 0, 1, 1]
    report = format_report(summary)
    assert "mean  93.0%, min  90.0%" in report and "max   8.0%" in report


def test_a_specialist_that_did_not_learn_is_named():
    """The encoder build that stayed at chance (12% lookup) must not pass silently into a table."""
    from comm_cli.experiments.kv_arithmetic.demo import unlearnt_jobs

    learnt = {"augment": {"accuracy": {"lookup_all_keys": 1.0}}, "anchor": {"accuracy": {"arithmetic": 0.98}}}
    assert unlearnt_jobs(learnt) == []
    chance = {
        "augment": {"accuracy": {"lookup_all_keys": 0.12}},
        "anchor": {"accuracy": {"arithmetic": 0.98}},
    }
    (line,) = unlearnt_jobs(chance)
    assert "augment specialist did not learn" in line and "12.0%" in line
