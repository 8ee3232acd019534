"""`make demo-real` in its smoke variant, over a tiny GGUF anchor written in the test: every step
runs (bases, six systems, evaluations, pictures) and the table has the documented format."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.gguf_writer import byte_level_vocabulary, tiny_llama, write_llama_gguf
from tests.helpers import REPO, cli_env

pytest.importorskip("matplotlib")


@pytest.mark.slow
def test_smoke_demo_writes_the_table_and_the_pictures(tmp_path):
    gguf = write_llama_gguf(tiny_llama(len(byte_level_vocabulary())), tmp_path / "tiny.gguf")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "real_facts_demo.py"),
            "--experiment",
            "real_facts_smoke",
            "--output-root",
            str(tmp_path / "demo"),
            "--lora-lrs",
            "1e-3,1e-2",
            "--attention-examples",
            "2",
            f"facts.source={gguf}",
        ],
        cwd=tmp_path,
        env=cli_env(cache_dir=tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = json.loads((tmp_path / "demo" / "table.json").read_text())
    assert [row["system"] for row in table["rows"]] == [
        "Anchor alone",
        "Specialist alone",
        "LoRA on the anchor",
        "CALM",
        "CALM, generic augment",
        "CALM, random augment",
    ]
    for row in table["rows"]:
        assert set(row) == {
            "system",
            "one_hop_heldout",
            "two_hop_heldout",
            "anchor_skill",
            "trainable_params",
        }
        assert all(0.0 <= row[c] <= 1.0 for c in ("one_hop_heldout", "two_hop_heldout", "anchor_skill"))
    params = {row["system"]: row["trainable_params"] for row in table["rows"]}
    assert params["Anchor alone"] == params["Specialist alone"] == 0
    assert params["CALM"] == params["CALM, generic augment"] == params["CALM, random augment"] > 0
    assert abs(params["LoRA on the anchor"] - params["CALM"]) / params["CALM"] < 0.5
    assert table["lora_best"] in ("lora_lr1e-3", "lora_lr1e-2")
    assert len(table["attention_pictures"]) == 1
    assert all((tmp_path / "demo" / p).exists() for p in table["attention_pictures"])
    assert "the anchor names the country of" in result.stdout
    # one anchor prefix, built once, read by every training run (CALM, its controls, LoRA)
    for run in ("calm_seed0", "calm_generic", "calm_random", "lora_lr1e-3", "lora_lr1e-2"):
        log = (tmp_path / "demo" / "logs" / f"{run}.log").read_text()
        assert "reusing the anchor's cached prefix states (1 layers)" in log, run


def test_the_settings_sweep_runs_and_writes_every_measurement(tmp_path):
    """scripts/real_facts_sweep.py (how the demo's setting was chosen) on a tiny GGUF anchor."""
    write_llama_gguf(tiny_llama(len(byte_level_vocabulary()), layers=5), tmp_path / "tiny.gguf")
    out = tmp_path / "sweep"
    args = [
        "--gguf-dir", str(tmp_path), "--gguf-file", "tiny.gguf", "--work", str(tmp_path / "work"),
        "--out", str(out), "--device", "cpu", "--only", "W1_top_150,W1_pair_1500", "--scale", "0.01",
        "--max-eval", "4", "--pairs", "[[3,4]]", "--no-filter-cities", "--specialist-seeds", "1,2",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "real_facts_sweep.py"), *args],
        cwd=tmp_path, env=cli_env(cache_dir=tmp_path / "cache"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert not [e for e in lines if e["event"] == "error"]
    finals = {e["name"]: e for e in lines if e["event"] == "final"}
    names = {f"{s}_spec{seed}" for s in ("W1_top_150", "W1_pair_1500") for seed in (1, 2)}
    assert set(finals) == names
    for final in finals.values():
        assert 0.0 <= final["one_hop_heldout"] <= 1.0 and 0.0 <= final["two_hop_heldout"] <= 1.0
        assert final["setting"]["pairs"] == [[3, 4]]
    builds = [e for e in lines if e["event"] == "specialist"]
    assert [(e["world"], e["seed"]) for e in builds] == [("W1", 1), ("W1", 2)]  # built once per seed
    assert all(0.0 <= e["probe_heldout"] <= 1.0 and e["state_rms"] > 0 for e in builds)
