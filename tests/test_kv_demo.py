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
