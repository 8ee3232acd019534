"""The GPU suite (scripts/gpu_suite.py, docs/gpu.md) runs end to end on the CPU in its dry mode,
so it cannot break unseen while no GPU is at hand: every case is in its JSON with a status, what
needs CUDA says so, the time budgets stop and skip what does not fit, and the real-facts anchor,
which travels to the GPU machine in parts, is put back together bit for bit.

Timings are never asserted: the dry mode runs tiny shapes only to walk every code path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.gguf_writer import byte_level_vocabulary, tiny_llama, write_llama_gguf
from tests.helpers import REPO, cli_env

SUITE = REPO / "scripts" / "gpu_suite.py"
CASES = ["correctness", "decoding", "decoding_compiled", "throughput", "bench", "real_facts"]


def run_suite(tmp_path, *args):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(SUITE), "--dry", "--out", str(out), *args],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "gpu_suite.json").read_text()), (out / "gpu_suite.log").read_text()


def suite_module():
    """scripts/gpu_suite.py as a module (it imports only the standard library)."""
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_suite", module)  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_dry_suite_runs_every_case_and_records_each_status(tmp_path):
    write_llama_gguf(tiny_llama(len(byte_level_vocabulary()), layers=5), tmp_path / "tiny.gguf")
    record, log = run_suite(tmp_path, "--gguf-dir", str(tmp_path), "--gguf-file", "tiny.gguf")
    cases = record["cases"]
    assert list(cases) == CASES
    for name in CASES:
        assert f"===== {name}:" in log or cases[name]["status"] != "ok", name
    assert record["install"]["status"] == "skipped" and "dry" in record["install"]["reason"]
    assert record["suite"]["dry"] is True and record["environment"]["cuda"] is False

    for name in ("correctness", "decoding", "throughput", "bench", "real_facts"):
        assert cases[name]["status"] == "ok", (name, cases[name])
    # the composition's guarantees hold on the CPU too; only the torch.compile check needs CUDA
    correctness = cases["correctness"]["result"]
    assert correctness["passed"] and correctness["failures"] == []
    assert correctness["float32"]["compiled"] == {
        "status": "skipped",
        "reason": "needs CUDA (a CPU compiles for minutes)",
    }
    assert correctness["accelerate_bf16_mixed_precision"]["bridge_dtypes"] == ["float32"]
    assert correctness["anchor_prefix_replay_bf16"]["replayed_layers_ran"] == 0
    assert correctness["comm_train_anchor_prefix_cache_bf16"]["cache_used"]

    decoding = cases["decoding"]["result"]["batches"]
    assert sorted(decoding) == ["1", "2"]
    assert all(row["composed_over_anchor_plus_augment"] > 0 for row in decoding.values())
    # comm has no compiled decoding step yet; once it has, a CPU says it needs CUDA
    compiled = cases["decoding_compiled"]
    assert compiled["status"] in ("not available", "skipped") and compiled["reason"]
    assert record["not_run"]["decoding_compiled"].startswith(compiled["status"])

    for length in cases["throughput"]["result"]["lengths"]:
        torch_row = length["backends"]["torch"]
        assert torch_row["status"] == "ok" and torch_row["step_over_lower_bound"] > 0
        assert torch_row["loss_rel_diff"] == 0.0 and torch_row["mfu"] is None  # no bf16 peak for a CPU
        for backend in ("liger", "cce"):
            assert length["backends"][backend] == {"status": "skipped", "reason": "needs CUDA"}
        assert length["measured_order"] == ["torch"] and length["auto_selects"] == "torch"

    bench = cases["bench"]["result"]
    assert bench["calm_step_over_lower_bound"] > 0 and "aligned" in bench and "prompt_completion" in bench

    finals = cases["real_facts"]["result"]["finals"]
    assert [f["name"] for f in finals] == ["W1_top_150_spec1", "W1_top_150_spec2"]
    assert all(0.0 <= f["one_hop_heldout"] <= 1.0 for f in finals)

    headline = record["headline"]
    assert headline["correctness_passed"]["value"] is True
    assert headline["decoding_batch1"]["target"] == "<= 1.10"
    assert headline["throughput_seq16_liger"] == "skipped: needs CUDA"
    assert "real_facts_W1_top_150_spec1" in headline


def test_a_case_past_its_budget_is_stopped_and_one_without_time_left_is_skipped(tmp_path):
    record, _ = run_suite(tmp_path, "--cases", "decoding", "--budget", "decoding=1")
    assert record["cases"]["decoding"]["status"] == "timeout"
    assert record["not_run"] == {"decoding": record["not_run"]["decoding"]}
    record, _ = run_suite(tmp_path, "--cases", "bench,throughput", "--total-budget", "0")
    for name in ("bench", "throughput"):
        entry = record["cases"][name]
        assert entry["status"] == "skipped" and "of the suite's 0 s left" in entry["reason"], entry


def test_without_a_gguf_the_dry_suite_skips_the_real_facts_run_and_says_why(tmp_path):
    record, _ = run_suite(tmp_path, "--cases", "real_facts")
    assert record["cases"]["real_facts"] == {
        "status": "skipped",
        "reason": "dry mode runs it only on a small GGUF given with --gguf-dir",
    }


def test_the_anchor_travels_in_two_parts_and_is_put_back_together(tmp_path):
    """scripts/fetch_gpu_wheels.sh splits the GGUF; the first call stages part 1 on the machine,
    the second finds part 2 in its own carry and joins them, checked against the manifest."""
    gguf = tmp_path / "anchor.gguf"
    gguf.write_bytes(os.urandom(1500))
    parts = tmp_path / "parts"
    env = {**os.environ, "WHEELS": "0", "GGUF": str(gguf), "PART_BYTES": "1000", "ANCHOR_DIR": str(parts)}
    fetched = subprocess.run(
        ["bash", str(REPO / "scripts" / "fetch_gpu_wheels.sh")],
        env={**env, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fetched.returncode == 0, fetched.stderr
    assert "call 1 carries" in fetched.stdout and "call 2 carries" in fetched.stdout
    assert sorted(p.name for p in parts.iterdir()) == ["1", "2"]

    suite = suite_module()
    stage = tmp_path / "stage"
    first_call = tmp_path / "first"
    (first_call / "1").mkdir(parents=True)
    for path in (parts / "1").iterdir():
        (first_call / "1" / path.name).write_bytes(path.read_bytes())

    def args(carried):
        return suite.parse_args(
            ["--out", str(tmp_path / "out"), "--anchor-parts", str(carried), "--stage-dir", str(stage)]
        )

    second_call = tmp_path / "second"
    (second_call / "2").mkdir(parents=True)
    for path in (parts / "2").iterdir():
        (second_call / "2" / path.name).write_bytes(path.read_bytes())
    missing = suite.find_anchor(args(second_call))
    assert missing["status"] == "missing" and "--stage-anchor" in missing["reason"]

    suite.stage_anchor(args(first_call))
    found = suite.find_anchor(args(second_call))
    assert found["status"] == "ok" and found["gguf_file"] == "anchor.gguf"
    assert (stage / "anchor.gguf").read_bytes() == gguf.read_bytes()

    (stage / "anchor.gguf").unlink()
    part = second_call / "2" / "anchor.gguf.part2"
    part.write_bytes(bytes([part.read_bytes()[0] ^ 1]) + part.read_bytes()[1:])
    corrupted = suite.find_anchor(args(second_call))
    assert corrupted["status"] == "missing" and "sha256" in corrupted["reason"]
