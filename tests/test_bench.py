"""The benchmark script runs and reports what docs/performance.md promises (keys, table, picture).

Timings are never asserted: the runs use tiny shapes only to check that every reported value is
there and that the sweep writes its record and its picture.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

TINY = [
    *("--anchor-width 64 --anchor-layers 4 --augment-width 32 --augment-layers 4 --every 2".split()),
    *("--vocab 300 --batch 2 --seq 16 --prompt 4 --new-tokens 2 --threads 1 --no-memory".split()),
]


def run_bench(tmp_path, *extra):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), *TINY, *extra],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_bench_json_keeps_its_keys_and_adds_the_prompt_completion_and_aligned_cases(tmp_path):
    out = run_bench(tmp_path, "--case-vocab", "500", "--repeats", "1", "--warmup", "0", "--out", "b.json")
    result = json.loads((tmp_path / "b.json").read_text())
    for key in (
        "calm_step_over_lower_bound",
        "calm_step_over_lora_step",
        "cached_step_over_anchor_fwd_bwd",
        "generation_over_anchor_plus_augment",
        "peak_memory_over_lora",
        "calm_step_over_full_logits_bound",
        "peak_memory_over_full_logits",
    ):
        assert key in result, key
    case = result["prompt_completion"]
    assert case["vocab"] == 500 and case["prompt_fraction"] == 0.7
    assert case["loss_tokens_per_step"] == 2 * (16 - 11)  # labels of the last 5 of 16 tokens, shifted
    assert result["calm_step_over_full_logits_bound"] == case["calm_step_over_lower_bound"] > 0
    assert "prompt case: calm / full-logit bound" in out
    aligned = result["aligned"]
    assert result["aligned_step_over_shared_step"] == aligned["aligned_step_over_shared_step"]
    for key in (
        "aligned_step_over_shared_step",
        "aligned_generation_over_shared_generation",
        "cross_step_over_shared_step",
        "cross_generation_over_shared_generation",
    ):
        assert isinstance(aligned[key], float) and aligned[key] > 0, key
    for path in ("shared", "aligned", "cross"):
        assert aligned["seconds"][f"{path}_step"] > 0
        assert aligned["generation_seconds_per_token"][f"{path}_generate"] > 0
        tokens = aligned["tokens_per_row"][path]
        assert 0 < tokens["anchor"] <= 16 and tokens["augment"] > 0
    # the same tokenizer on both sides: the aligned augment reads at most the anchor's tokens,
    # the character augment more of them
    assert aligned["tokens_per_row"]["aligned"]["augment"] <= aligned["tokens_per_row"]["shared"]["augment"]
    assert aligned["tokens_per_row"]["cross"]["augment"] > aligned["tokens_per_row"]["shared"]["augment"]
    assert "aligned tokens: step / shared step" in out


def test_bench_can_skip_the_aligned_case(tmp_path):
    run_bench(
        tmp_path,
        *("--no-prompt-case --no-aligned-case --repeats 1 --warmup 0 --out b.json".split()),
    )
    result = json.loads((tmp_path / "b.json").read_text())
    assert "aligned" not in result and "aligned_step_over_shared_step" not in result


@pytest.mark.slow
def test_sweep_writes_its_table_record_and_picture(tmp_path):
    """The picture needs matplotlib (the bench extra); without it the sweep says how to get it."""
    out = run_bench(
        tmp_path,
        *("--sweep --sweep-seqs 16,32 --sweep-connections 1,4 --sweep-seq 16 --sweep-vocab 300".split()),
        *("--sweep-repeats 1 --sweep-out s.json --plot s.png".split()),
    )
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [(r["axis"], r["value"]) for r in rows] == [
        ("seq", 16),
        ("seq", 32),
        ("connections", 1),
        ("connections", 4),
    ]
    assert [r["connections"] for r in rows] == [2, 2, 1, 4]
    assert "| sequence length | 32 |" in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install 'comm-cli[bench]'" in out
    else:
        assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
