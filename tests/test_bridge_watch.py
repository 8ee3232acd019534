"""Whether the bridges read, seen by the user of comm-train: per-bridge numbers in the tracker,
the step log and the console, and one plateau line on a run that stalls (and none on a run that
learns)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
from comm_cli.training.bridge_watch import BridgeWatch, PlateauDetector, console_text
from tests.conftest import tiny_model
from tests.helpers import base_args, build_workspace, run_train, wandb_history

DOCS = "docs/training_dynamics.md#what-to-try"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("workspace"))


def _trainer(**overrides):
    values = {"log_every": 2, "bridge_readings": True, "compile_bridges": False}
    return SimpleNamespace(**{**values, **overrides})


# ------------------------------------------------------------------------------- the parts


def test_only_reporting_steps_install_hooks():
    """Off-cost: a step that does not report runs with no hook on any bridge."""
    anchor, augment = tiny_model("llama", width=48, layers=4), tiny_model("gpt2", seed=1, width=32, layers=4)
    config = BridgeConfig(num_heads=4, zero_init_output=False, gate=True, gate_init=0.5)
    model = ComposedModel.from_models(anchor, augment, MappingSpec(pairs=[[0, 0], [1, 2]]), config)
    watch = BridgeWatch(model, _trainer(), total_steps=7, engine="single")
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for step in (1, 3):
        with watch.probe(step):
            assert all(not bridge._forward_hooks for bridge in model.bridges)
            model(ids, mask)
        assert watch.readings(mask) is None
    for step in (2, 7):  # every log_every-th step, and the last
        with torch.no_grad(), watch.probe(step):
            assert all(len(bridge._forward_hooks) == 1 for bridge in model.bridges)
            model(ids, mask)
        readings = watch.readings(mask)
        assert len(readings) == 2
        assert all(r["output_ratio"] > 0 and 0 <= r["entropy"] <= 1 for r in readings)
        assert readings[0]["gate"] == pytest.approx(torch.tanh(torch.tensor(0.5)).item())
    assert all(not bridge._forward_hooks for bridge in model.bridges)
    assert not BridgeWatch(model, _trainer(), 7, engine="fsdp2").enabled  # sharded weights: not measured


def test_console_text_names_each_bridge_value():
    readings = [{"output_ratio": 0.0123, "entropy": 0.91, "gate": None}, None]
    assert console_text(readings) == "bridges out/state 0.0123 - · entropy 0.91 -"
    assert console_text(None) == ""


def test_the_plateau_detector_speaks_once_past_its_share_and_only_on_a_plateau():
    detector = PlateauDetector(total_steps=100, after=0.5, output_ratio=1e-3, min_gain=0.01)
    detector.anchor_loss = 2.0
    detector.observe([{"output_ratio": 1e-5}, {"output_ratio": 2e-4}], val_loss=1.999)
    assert detector.check(40) is None  # before half the steps
    line = detector.check(50)
    assert line.startswith("plateau at step 50/100") and DOCS in line and "\n" not in line
    for hint in ("optimizer.lr", "bridge.norm", "bridge.num_heads"):
        assert hint in line
    assert "0.0002" in line and "1.9990" in line and "2.0000" in line
    assert detector.check(60) is None  # once

    reading = PlateauDetector(total_steps=100, anchor_loss=2.0)
    reading.observe([{"output_ratio": 0.3}], val_loss=1.5)
    assert reading.check(100) is None  # contributes and beats the anchor

    dead = PlateauDetector(total_steps=10)  # no validation data: the output ratio alone
    dead.observe([{"output_ratio": 0.0}])
    assert "below 0.01 " in dead.check(5)

    unmoved = PlateauDetector(total_steps=10, anchor_loss=2.0)  # contributes, but nothing held out gained
    unmoved.observe([{"output_ratio": 0.5}], val_loss=2.01)
    assert "within 1% of the anchor's own 2.0000" in unmoved.check(10)
    assert (
        PlateauDetector(total_steps=10, enabled=False, anchor_loss=2.0, latest_val_loss=2.0).check(10) is None
    )


# ------------------------------------------------------------------------------- comm-train


def _run(ws, tmp_path, name, lr, extra=()):
    args = base_args(ws, tmp_path, name) + [
        "bridge.zero_init_output=true",
        f"optimizer.lr={lr}",
        "trainer.max_steps=40",
        "trainer.save_every=null",
        "trainer.eval_every=10",
        *extra,
    ]
    assert run_train(args) == 0
    run = tmp_path / name
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "train_summary.json").read_text())
    return run, steps, summary


def test_a_stalled_run_says_plateau_in_one_line_and_logs_what_the_bridges_do(ws, tmp_path, capsys):
    run, steps, summary = _run(ws, tmp_path, "stall", "1e-6", ["logger=wandb"])
    console = capsys.readouterr().out.splitlines()
    warnings = [line for line in console if "plateau" in line]
    assert len(warnings) == 1, warnings
    assert "plateau at step 20/40" in warnings[0] and DOCS in warnings[0]
    assert "every bridge's output is below 0.01" in warnings[0] and "validation loss" in warnings[0]
    assert summary["plateau"] and summary["plateau"] in warnings[0]

    # the step log: the anchor's own validation loss first, then every 2 steps each bridge's numbers
    assert steps[0]["step"] == 0 and "val/anchor_loss" in steps[0]
    reported = [s for s in steps if "train/loss" in s]
    assert [s["step"] for s in reported] == list(range(2, 41, 2))
    assert all(s["bridge0/output_ratio"] < 0.01 and 0 <= s["bridge0/entropy"] <= 1.0 for s in reported)
    validations = [s for s in steps if "val/loss" in s]
    assert [s["step"] for s in validations] == [10, 20, 30, 40]
    anchor = steps[0]["val/anchor_loss"]
    assert all(abs(s["val/loss"] - anchor) < 0.005 * anchor for s in validations)  # it has not moved

    # the console: a bridges line at each reported step
    assert sum("step 20/40 bridges out/state" in line for line in console) == 1

    # the tracker (W&B offline files) holds the same numbers
    rows, _, _ = wandb_history(run)
    logged = {key for row in rows for key in row}
    assert {"bridge0/output_ratio", "bridge0/entropy", "val/anchor_loss", "val/loss"} <= logged


def test_a_run_that_learns_gives_no_plateau_line_and_logs_its_gate(ws, tmp_path, capsys):
    _, steps, summary = _run(ws, tmp_path, "learn", "1e-2", ["bridge.gate=true", "bridge.gate_init=0.5"])
    assert not [line for line in capsys.readouterr().out.splitlines() if "plateau" in line]
    assert summary["plateau"] is None
    final = steps[-1] if "val/loss" in steps[-1] else steps[-2]
    assert final["val/loss"] < 0.99 * steps[0]["val/anchor_loss"]
    gates = [s["bridge0/gate"] for s in steps if "bridge0/gate" in s]
    assert len(gates) == 20 and gates[0] != gates[-1]


def test_plateau_settings_are_checked(ws, tmp_path, capsys):
    assert run_train(base_args(ws, tmp_path) + ["trainer.plateau_after=0"]) != 0
    assert (
        "trainer.plateau_after=0.0 is not valid: it must be a share of the steps" in capsys.readouterr().err
    )
