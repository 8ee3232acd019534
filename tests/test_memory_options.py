"""Memory options for big models, wired through the config and checked on the CPU: activation
checkpointing, bf16 bases under fp32 bridges, torch.compile of the bridges."""

from __future__ import annotations

import pytest
import torch

from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
from tests.conftest import tiny_model
from tests.helpers import (
    base_args,
    build_workspace,
    max_abs_diff,
    run_train,
    trainable_weights,
)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("ws"))


def final(run_dir):
    return trainable_weights(run_dir / "composition" / "composition_model.safetensors")


def test_gradient_checkpointing_through_the_config_trains_the_same_bridges(ws, tmp_path):
    common = ["trainer.max_steps=4", "trainer.save_every=null", "trainer.eval_every=null"]
    assert run_train(base_args(ws, tmp_path, "plain") + common) == 0
    assert run_train(base_args(ws, tmp_path, "ckpt") + common + ["trainer.gradient_checkpointing=true"]) == 0
    assert max_abs_diff(final(tmp_path / "plain"), final(tmp_path / "ckpt")) < 1e-6


def test_bf16_bases_with_fp32_bridges_through_the_config(ws, tmp_path):
    args = base_args(ws, tmp_path, "bf16") + [
        "anchor.dtype=bfloat16",
        "augment.dtype=bfloat16",
        "trainer.max_steps=3",
        "trainer.save_every=null",
    ]
    assert run_train(args) == 0
    weights = final(tmp_path / "bf16")
    assert all(t.dtype == torch.float32 for t in weights.values())
    import json

    config = json.loads((tmp_path / "bf16" / "composition" / "composition_config.json").read_text())
    assert config["anchor"]["dtype"] == "bfloat16" and config["bridge"]["dtype"] == "float32"


@pytest.mark.slow
def test_compiled_bridges_give_the_eager_gradients():
    anchor, augment = tiny_model("llama", width=48), tiny_model("qwen2", seed=1, width=32)
    model = ComposedModel.from_models(
        anchor, augment, MappingSpec(every=2), BridgeConfig(zero_init_output=False)
    )
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    eager = [p.grad.clone() for p in model.bridges.parameters()]
    model.zero_grad()
    for bridge in model.bridges:
        bridge.compile()
    model(ids, labels=ids).loss.backward()
    for got, want in zip((p.grad for p in model.bridges.parameters()), eager):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compile_bridges_through_the_config(ws, tmp_path):
    common = ["trainer.max_steps=2", "trainer.save_every=null", "trainer.eval_every=null"]
    assert run_train(base_args(ws, tmp_path, "eager") + common) == 0
    assert run_train(base_args(ws, tmp_path, "compiled") + common + ["trainer.compile_bridges=true"]) == 0
    assert max_abs_diff(final(tmp_path / "eager"), final(tmp_path / "compiled")) < 1e-5
