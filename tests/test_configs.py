"""Every shipped config composes and validates against the schema without loading a model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from comm_cli.cli import config_dir, register_configs

CONF = Path(config_dir())
register_configs()


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
        overrides += ["anchor.name_or_path=a", "augment.name_or_path=b", "data.data_files=train.jsonl"]
        if group in ("anchor", "augment", "data") and option in ("kv_anchor", "kv_augment", "kv_arithmetic"):
            overrides.append("experiment=kv_arithmetic")  # presets that live in the experiment's cache
        if group in ("anchor", "augment", "data") and option in (
            "smollm2_135m_instruct",
            "facts_specialist",
            "real_facts",
        ):
            overrides.append("experiment=real_facts")
        _, typed = compose_train(overrides)
        assert typed is not None


def test_a_pair_of_your_own_gets_the_general_settings_and_says_so():
    cfg, typed = compose_train(["anchor.name_or_path=a", "augment.name_or_path=b", "data.data_files=t.jsonl"])
    assert typed.experiment == "custom" and cfg.experiment == "custom"
    assert typed.mapping.every == 4 and typed.data.synthetic is None
    assert not any(hasattr(typed, s) and getattr(typed, s) is not None for s in ("kv", "facts"))
    # the general settings (docs/training.md), not the key-value toy's
    assert typed.bridge.num_heads is None and typed.bridge.norm and typed.bridge.rotary
    assert typed.optimizer.lr == 3e-3 and typed.scheduler.warmup_ratio == 0.05
    assert typed.trainer.max_steps is None and typed.trainer.epochs == 3
    assert typed.trainer.eval_every is None and typed.data.validation_fraction > 0


def test_the_key_value_experiment_is_one_override_away():
    _, typed = compose_train(["experiment=kv_arithmetic"])
    assert typed.experiment == "kv_arithmetic" and typed.data.synthetic == "kv_arithmetic"
    assert typed.mapping.every == 1 and typed.bridge.rotary
    assert typed.anchor.name_or_path.endswith("/anchor") and typed.augment.name_or_path.endswith("/augment")
    assert typed.kv is not None and typed.facts is None
    assert typed.bridge.num_heads == 16 and typed.optimizer.lr == 2e-3 and typed.trainer.max_steps == 2500


def test_every_experiment_names_itself():
    for experiment in options("experiment"):
        _, typed = compose_train([f"experiment={experiment}"])
        assert typed.experiment == experiment


def test_every_shipped_yaml_opens_with_a_command_comment():
    for path in CONF.rglob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("#"), path
        text = path.read_text()
        assert re.search(r"\bcomm-[a-z-]+ |accelerate launch", text), path
        if path.parent == CONF:  # a command's root config names the command that reads it
            assert f"comm-{path.stem}" in text, path


def test_the_paper_default_mapping_is_every_fourth_layer():
    _, typed = compose_train(["experiment=code_qwen"])
    assert typed.mapping.every == 4
    assert typed.anchor.name_or_path == "Qwen/Qwen2.5-1.5B"
    assert typed.augment.name_or_path == "Qwen/Qwen2.5-Coder-0.5B"


def _listed(program: str) -> dict[str, list[str]]:
    """GROUP -> options, as the command's --help page lists them."""
    from comm_cli.help import page

    listed = {}
    for line in page(program, CONF).splitlines():
        if line.startswith("  ") and ": " in line and not line.strip().startswith(("#", program)):
            group, _, rest = line.strip().partition(": ")
            listed[group] = [o.strip() for o in rest.split("(")[0].split(",") if o.strip()]
    return listed


def test_every_preset_comm_train_lists_is_accepted():
    listed = _listed("comm-train")
    assert set(listed) >= {"experiment", "anchor", "augment", "mapping", "data", "method", "size"}
    needs = ["anchor.name_or_path=a", "augment.name_or_path=b", "data.data_files=t.jsonl"]
    for group, names in listed.items():
        for name in names:
            choice = f"+{group}={name}" if group == "size" else f"{group}={name}"
            extra = ["experiment=kv_arithmetic"] if group == "size" or "kv" in name else []
            extra += (
                ["experiment=real_facts"]
                if name in ("smollm2_135m_instruct", "facts_specialist", "real_facts")
                else []
            )
            _, typed = compose_train([*needs, *extra, choice])
            assert typed is not None, (group, name)


def test_every_preset_comm_eval_lists_is_accepted():
    listed = _listed("comm-eval")
    assert set(listed) == {"suite", "anchor", "augment", "logger", "task"}
    for group, names in listed.items():
        for name in names:
            if group == "task":
                overrides = [
                    f"+task@tasks.t={name}",
                    "tasks.t.data.data_files=t.jsonl",
                    "suite=kv_arithmetic",
                ]
            else:
                overrides = [f"{group}={name}", "suite=kv_arithmetic" if "kv" in name else "logger=none"]
                overrides += (
                    ["suite=real_facts"] if name in ("smollm2_135m_instruct", "facts_specialist") else []
                )
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose(config_name="eval", overrides=[*overrides, "output_dir=x"])
            assert OmegaConf.to_object(cfg) is not None, (group, name)


@pytest.mark.parametrize("program", ["comm-generate", "comm-chat", "comm-serve"])
def test_the_use_commands_compose_and_accept_what_their_help_lists(program):
    """comm-generate's and comm-chat's root configs compose into their schemas (no model loads);
    every group their --help page lists, and every option of it, is accepted."""
    from comm_cli.schema import ChatConfig, GenerateConfig, ServeConfig

    name = program.removeprefix("comm-")
    schema = {"generate": GenerateConfig, "chat": ChatConfig, "serve": ServeConfig}[name]
    listed = _listed(program)
    assert set(listed) == {"anchor", "augment"}
    cases = [["checkpoint=c"]] + [[f"{g}={o}", "model=anchor"] for g, names in listed.items() for o in names]
    for overrides in cases:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name=name, overrides=overrides)
        typed = OmegaConf.to_object(cfg)
        assert isinstance(typed, schema) and typed.generation.max_new_tokens >= 1, overrides
    # An experiment's preset (its model lives in the experiment's section) is not listed, and
    # naming it anyway is one line that says what to give instead.
    from comm_cli.cli import to_typed
    from comm_cli.errors import ConfigError

    assert "kv_anchor" not in listed["anchor"] and "kv_augment" not in listed["augment"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=["model=anchor", "anchor=kv_anchor"])
    with pytest.raises(
        ConfigError,
        match=r"kv_arithmetic experiment, which this command does not read: give anchor\.name_or_path=",
    ):
        to_typed(cfg)
