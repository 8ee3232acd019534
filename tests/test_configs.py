"""Every shipped config composes and validates against the schema without loading a model."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from comm_cli.cli import config_dir
from comm_cli.schema import register_schemas

CONF = Path(config_dir())
register_schemas()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, OmegaConf.to_object(cfg)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment):
    cfg, typed = compose_train([f"experiment={experiment}"])
    assert typed.name == cfg.name
    assert typed.anchor.name_or_path and typed.augment.name_or_path


@pytest.mark.parametrize(
    "group", ["anchor", "augment", "mapping", "data", "method", "optimizer", "scheduler", "trainer", "logger"]
)
def test_every_group_option_composes(group):
    for option in options(group):
        overrides = [f"{group}={option}"]
        if group == "data" and option in ("jsonl", "text"):
            overrides.append("data.data_files=train.jsonl")
        _, typed = compose_train(overrides)
        assert typed is not None


def test_the_default_job_is_the_key_value_experiment():
    _, typed = compose_train([])
    assert typed.data.synthetic == "kv_arithmetic"
    assert typed.mapping.every == 1 and typed.bridge.rotary
    assert typed.anchor.name_or_path.endswith("/anchor") and typed.augment.name_or_path.endswith("/augment")


def test_every_shipped_yaml_opens_with_a_command_comment():
    for path in CONF.rglob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("#"), path
        text = path.read_text()
        assert "comm-train" in text or "comm-eval" in text or "accelerate launch" in text, path


def test_the_paper_default_mapping_is_every_fourth_layer():
    _, typed = compose_train(["experiment=code_qwen"])
    assert typed.mapping.every == 4
    assert typed.anchor.name_or_path == "Qwen/Qwen2.5-1.5B"
    assert typed.augment.name_or_path == "Qwen/Qwen2.5-Coder-0.5B"
