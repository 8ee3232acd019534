"""save_pretrained / from_pretrained: only the bridges, JSON + safetensors, exact round trip."""

from __future__ import annotations

import json

import pytest
import torch

from comm_cli.compose import CONFIG_NAME, WEIGHTS_NAME, BridgeConfig, ComposedModel, MappingSpec
from comm_cli.compose.loading import load_causal_lm
from comm_cli.compose.specs import CompositionConfig, ModelSpec
from comm_cli.errors import ConfigError, ModelLoadError


@pytest.fixture
def saved_bases(saved_model):
    return saved_model("llama", "anchor", width=48), saved_model("qwen2", "augment", seed=1, width=32)


def build(anchor_dir, augment_dir, mask_mode="causal"):
    anchor = load_causal_lm(ModelSpec(str(anchor_dir)))
    augment = load_causal_lm(ModelSpec(str(augment_dir)))
    composed = ComposedModel.from_models(
        anchor,
        augment,
        MappingSpec(every=2),
        BridgeConfig(num_heads=4, zero_init_output=False),
        mask_mode=mask_mode,
    )
    return composed


def test_round_trip_gives_identical_logits(saved_bases, tmp_path):
    composed = build(*saved_bases, mask_mode="prompt")
    out_dir = composed.save_pretrained(tmp_path / "composition")
    assert sorted(p.name for p in out_dir.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = ComposedModel.from_pretrained(out_dir)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids).logits, composed(ids).logits)
    assert loaded.mask_mode == "prompt"
    assert loaded.bridge_connections == composed.bridge_connections


def test_only_bridge_weights_are_written(saved_bases, tmp_path):
    from safetensors.torch import load_file

    composed = build(*saved_bases)
    composed.save_pretrained(tmp_path / "c")
    weights = load_file(str(tmp_path / "c" / WEIGHTS_NAME))
    assert all(k.startswith("bridges.") for k in weights)
    assert sum(t.numel() for t in weights.values()) == composed.parameter_counts()["trainable"]


def test_config_names_bases_connections_and_version(saved_bases, tmp_path):
    import comm_cli

    composed = build(*saved_bases)
    composed.save_pretrained(tmp_path / "c")
    text = (tmp_path / "c" / CONFIG_NAME).read_text()
    config = json.loads(text)
    assert list(config) == sorted(config)  # sorted, human-readable
    assert config["anchor"]["name_or_path"] == str(saved_bases[0].resolve())
    assert config["augments"][0]["model"]["name_or_path"] == str(saved_bases[1].resolve())
    assert config["augments"][0]["connections"] == [[1, 1], [3, 3]]
    assert config["bridge"]["num_heads"] == 4 and config["bridge"]["dtype"] == "float32"
    assert config["anchor"]["dtype"] == "float32"
    assert config["mask_mode"] == "causal"
    assert config["comm_version"] == comm_cli.__version__


def test_load_with_bases_given_in_memory(saved_bases, tmp_path, make_model):
    composed = build(*saved_bases)
    composed.save_pretrained(tmp_path / "c")
    anchor = load_causal_lm(ModelSpec(str(saved_bases[0])))
    augment = load_causal_lm(ModelSpec(str(saved_bases[1])))
    loaded = ComposedModel.from_pretrained(tmp_path / "c", anchor=anchor, augments=[augment])
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(loaded(ids).logits, composed(ids).logits)


def test_load_in_another_dtype(saved_bases, tmp_path):
    """from_pretrained(dtype=...) loads the bases in it (bfloat16 on a GPU) and leaves the saved
    config as it was; the bridges keep their own dtype and the logits stay close."""
    composed = build(*saved_bases)
    out_dir = composed.save_pretrained(tmp_path / "c")
    saved = (out_dir / CONFIG_NAME).read_text()
    loaded = ComposedModel.from_pretrained(out_dir, dtype="bfloat16")
    assert next(loaded.anchor.parameters()).dtype == torch.bfloat16
    assert next(loaded.augments[0].parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in loaded.bridges.parameters())
    assert loaded.config.anchor.dtype == "float32" and (out_dir / CONFIG_NAME).read_text() == saved
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(loaded(ids).logits.float(), composed(ids).logits, atol=0.1)


def test_unknown_config_keys_warn_and_missing_ones_fail(saved_bases, tmp_path):
    composed = build(*saved_bases)
    composed.save_pretrained(tmp_path / "c")
    path = tmp_path / "c" / CONFIG_NAME
    data = json.loads(path.read_text())
    data["from_the_future"] = 1
    data["bridge"]["new_knob"] = True
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="ignoring unknown keys"):
        ComposedModel.from_pretrained(tmp_path / "c")
    del data["anchor"]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="missing the required key 'anchor'"):
        ComposedModel.from_pretrained(tmp_path / "c")


def test_loading_errors_are_clear(saved_bases, tmp_path):
    with pytest.raises(ModelLoadError, match="is not a saved composition"):
        ComposedModel.from_pretrained(tmp_path / "nothing-here")
    composed = build(*saved_bases)
    composed.save_pretrained(tmp_path / "c")
    (tmp_path / "c" / WEIGHTS_NAME).unlink()
    with pytest.raises(ModelLoadError, match="has no composition_model.safetensors"):
        ComposedModel.from_pretrained(tmp_path / "c")


def test_weights_for_other_bases_are_rejected(saved_bases, saved_model, tmp_path):
    composed = build(*saved_bases)
    composed.save_pretrained(tmp_path / "c")
    wider = saved_model("qwen2", "wider", width=64)
    path = tmp_path / "c" / CONFIG_NAME
    data = json.loads(path.read_text())
    data["augments"][0]["model"]["name_or_path"] = str(wider)
    path.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="saved for other base models"):
        ComposedModel.from_pretrained(tmp_path / "c")


def test_from_config_loads_the_named_bases(saved_bases):
    anchor_dir, augment_dir = saved_bases
    config = CompositionConfig.from_dict(
        {
            "anchor": {"name_or_path": str(anchor_dir)},
            "augments": [{"model": {"name_or_path": str(augment_dir)}, "mapping": {"every": 2}}],
            "bridge": {"num_heads": 6},
        }
    )
    composed = ComposedModel.from_config(config)
    assert [c[1:] for c in composed.bridge_connections] == [(1, 1), (3, 3)]
    assert composed.bridges[0].num_heads == 6


def test_a_base_of_another_width_is_refused_before_it_loads(tmp_path):
    """Bases named at a new place must fit the saved bridges: checked from configs and the
    weights header (comm-eval/comm-generate anchor.name_or_path=... on a composition)."""
    from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
    from comm_cli.compose.saving import check_bases_fit, read_composition_config, with_bases_at
    from comm_cli.errors import ModelLoadError
    from tests.conftest import tiny_model

    for name, width in (("anchor", 48), ("wider", 64)):
        tiny_model("llama", width=width, layers=4).save_pretrained(tmp_path / name)
    tiny_model("gpt2", seed=1, width=32, layers=4).save_pretrained(tmp_path / "augment")
    from transformers import AutoModelForCausalLM

    bases = [AutoModelForCausalLM.from_pretrained(tmp_path / n) for n in ("anchor", "augment")]
    model = ComposedModel.from_models(*bases, MappingSpec(every=2), BridgeConfig(num_heads=4))
    model.config.anchor.name_or_path = str(tmp_path / "anchor")
    model.config.augments[0].model.name_or_path = str(tmp_path / "augment")
    saved = model.save_pretrained(tmp_path / "c")
    config = read_composition_config(saved)
    check_bases_fit(saved, with_bases_at(config, str(tmp_path / "anchor")))  # the same width: fine
    with pytest.raises(ModelLoadError, match="is 64 wide, but the bridges in .* on a 48-wide one"):
        check_bases_fit(saved, with_bases_at(config, str(tmp_path / "wider")))
