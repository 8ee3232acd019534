"""`make demo-real-seeds`: the real-facts table over specialist and CALM seeds. The aggregates are
computed from the per-run numbers, the targets say met or missed, and the smoke variant (a tiny
GGUF anchor written in the test) runs 2 specialist seeds x 2 CALM seeds end to end."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from comm_cli.experiments.real_facts.demo import SYSTEMS, steps_to_half
from comm_cli.experiments.real_facts.seeds import CONTROLS, format_report, summarise, targets
from tests.gguf_writer import byte_level_vocabulary, tiny_llama, write_llama_gguf
from tests.helpers import REPO, cli_env


def table(one_hops: list[float], control: float, skill: float = 0.9, anchor_skill: float = 0.9) -> dict:
    """What ``FactsTable.collect()`` returns, with CALM runs of these one-hop scores."""
    runs = [
        {
            "seed": seed,
            "one_hop_heldout": one,
            "two_hop_heldout": one - 0.05,
            "anchor_skill": skill,
            "anchor_skill_bridges_off": anchor_skill,
            "steps_to_half": None,
        }
        for seed, one in enumerate(one_hops)
    ]
    row = lambda system, value: {  # noqa: E731
        "system": system,
        "one_hop_heldout": value,
        "two_hop_heldout": value,
        "anchor_skill": anchor_skill,
        "trainable_params": 0,
    }
    return {"rows": [row(s, control) for s in SYSTEMS], "calm_runs": runs}


def test_the_aggregates_are_those_of_the_per_run_numbers():
    summary = summarise({0: table([0.8, 0.9], 0.05), 1: table([0.7, 0.85], 0.08)})
    assert [(r["specialist_seed"], r["calm_seed"]) for r in summary["runs"]] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    one = summary["calm"]["one_hop_heldout"]
    assert one["n"] == 4 and one["min"] == 0.7 and one["max"] == 0.9
    assert one["mean"] == pytest.approx(statistics.fmean([0.8, 0.9, 0.7, 0.85]))
    assert one["std"] == pytest.approx(statistics.stdev([0.8, 0.9, 0.7, 0.85]))
    assert summary["calm"]["two_hop_heldout"]["mean"] == pytest.approx(0.8125 - 0.05)
    assert set(summary["controls"]) == set(CONTROLS)
    assert summary["controls"]["CALM, random augment"]["one_hop_heldout"]["max"] == 0.08
    assert summary["steps_to_half"] is None


def test_each_target_says_met_or_missed():
    met = summarise({0: table([0.8, 0.9], 0.05), 1: table([0.76, 0.85], 0.08)})
    met["targets"] = targets(met)
    assert all(met["targets"].values())
    report = format_report(met)
    assert report.count("target: met") == 5 and "target: missed" not in report

    # one run below 75%, a control at 12%, the skill 5 points above the anchor's
    missed = summarise({0: table([0.74, 0.99], 0.12, skill=0.95), 1: table([0.9, 0.9], 0.0)})
    missed["targets"] = targets(missed)
    assert [name for name, ok in missed["targets"].items() if not ok] == [
        "one hop minimum >= 75%",
        "every control one hop <= 10%",
        "the anchor's skill within 2 points with the bridges on",
    ]
    assert format_report(missed).count("target: missed") == 3


def test_steps_to_half_read_from_the_training_step_log(tmp_path):
    assert steps_to_half(tmp_path) is None  # no step log
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(
            json.dumps(e)
            for e in (
                {"step": 10, "train/loss": 1.0},
                {"step": 20, "val/loss": 0.5, "val/exact_match": 0.3},
                {"step": 30, "val/exact_match": 0.55},
                {"step": 40, "val/exact_match": 0.9},
            )
        )
    )
    assert steps_to_half(tmp_path) == 30
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 10, "val/loss": 0.1}) + "\n")
    assert steps_to_half(tmp_path) is None  # validation loss only: no accuracy to read


@pytest.mark.slow
def test_smoke_seeds_run_writes_seeds_json(tmp_path):
    pytest.importorskip("matplotlib")
    gguf = write_llama_gguf(tiny_llama(len(byte_level_vocabulary())), tmp_path / "tiny.gguf")
    out = tmp_path / "seeds"
    args = [
        "--experiment", "real_facts_smoke", "--output-root", str(out), "--specialist-seeds", "0,1",
        "--calm-seeds", "0,1", "--lora-lrs", "1e-3", f"facts.source={gguf}",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "real_facts_seeds.py"), *args],
        cwd=tmp_path, env=cli_env(cache_dir=tmp_path / "cache"), capture_output=True, text=True, timeout=2400,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seeds = json.loads((out / "seeds.json").read_text())
    assert [(r["specialist_seed"], r["calm_seed"]) for r in seeds["runs"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for column in ("one_hop_heldout", "two_hop_heldout"):
        values = [r[column] for r in seeds["runs"]]
        assert all(0.0 <= v <= 1.0 for v in values)
        s = seeds["calm"][column]
        assert (s["n"], s["min"], s["max"]) == (4, min(values), max(values))
        assert s["mean"] == pytest.approx(statistics.fmean(values))
        assert s["std"] == pytest.approx(statistics.stdev(values))
        for name in CONTROLS:
            rows = seeds["controls"][name]["runs"]
            assert [r["specialist_seed"] for r in rows] == [0, 1]
            assert seeds["controls"][name][column]["max"] == max(r[column] for r in rows)
    assert len(seeds["targets"]) == 5 and all(isinstance(v, bool) for v in seeds["targets"].values())
    assert {"machine", "threads_per_worker", "workers", "date", "seconds"} <= set(seeds)
    # two builds of the bases (one world and specialist per seed), each with its own runs
    assert seeds["bases"]["0"]["dir"] != seeds["bases"]["1"]["dir"]
    assert (out / "specialists_seed1" / "calm_seed1" / "train_summary.json").is_file()
    assert result.stdout.count("target: ") == 5
    assert "CALM held-out one hop over 4 runs: mean" in result.stdout
