"""Loading a composition's tokenizers reads the config it is given and writes nothing into it;
the sources it used are what a saved composition records."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from comm_cli.compose.specs import BridgeConfig, MappingSpec, ModelSpec
from comm_cli.compose.tokenizers import load_anchor_tokenizer, load_tokenizers
from comm_cli.errors import ModelLoadError
from comm_cli.training.models import composition_config, plan_calm
from tests import tokenizer_zoo as zoo


@pytest.fixture
def dirs(tmp_path):
    """Tokenizer directories: the anchor's (char), an augment's own (unigram) and an augment
    directory that ships no tokenizer."""
    paths = {name: tmp_path / name for name in ("anchor", "own", "none")}
    zoo.char().save_pretrained(paths["anchor"])
    zoo.unigram().save_pretrained(paths["own"])
    paths["none"].mkdir()
    return paths


def _train_cfg(dirs, **overrides):
    """The parts of a typed train config that planning a CALM run reads."""
    values = dict(
        anchor=ModelSpec(str(dirs["anchor"])),
        augment=ModelSpec(str(dirs["own"])),
        mapping=MappingSpec(every=1),
        extra_augments=[SimpleNamespace(model=ModelSpec(str(dirs["none"])), mapping=MappingSpec(every=1))],
        bridge=BridgeConfig(num_heads=4),
        mask_mode="causal",
        tokenizer=None,
        augment_tokens="auto",
    )
    return SimpleNamespace(**{**values, **overrides})


def test_the_sources_used_are_returned_and_no_spec_is_written(dirs):
    anchor, own, none = (ModelSpec(str(dirs[name])) for name in ("anchor", "own", "none"))
    loaded = load_tokenizers(anchor, [own, none])
    assert loaded.anchor_source == str(dirs["anchor"])
    assert loaded.augment_sources == [str(dirs["own"]), None]
    assert loaded.augments[0] is not None and loaded.augments[1] is None
    assert [anchor.tokenizer, own.tokenizer, none.tokenizer] == [None, None, None]
    with pytest.raises(ModelLoadError, match="augmenting model 1's tokenizer"):
        load_tokenizers(anchor, [own, none], required=[False, True])


def test_a_run_tokenizer_overrides_the_anchor_spec_and_anchor_tokenizer_is_read(dirs):
    spec = ModelSpec(str(dirs["none"]), tokenizer=str(dirs["anchor"]))
    assert len(load_anchor_tokenizer(spec)) == len(zoo.char())
    override = load_anchor_tokenizer(ModelSpec(str(dirs["none"])), override=str(dirs["own"]))
    assert len(override) == len(zoo.unigram())


def test_planning_a_run_leaves_its_config_as_read_and_the_composition_records_the_plan(dirs):
    cfg = _train_cfg(dirs)
    anchor_tokenizer = load_anchor_tokenizer(cfg.anchor, cfg.tokenizer)
    plan = plan_calm(cfg, anchor_tokenizer, ["the quick brown fox", "abc"])
    assert [cfg.anchor.tokenizer, cfg.augment.tokenizer, cfg.extra_augments[0].model.tokenizer] == [None] * 3
    assert plan.token_paths == ["aligned", "shared"]
    assert plan.reading is not None and plan.reading.aligned_indices == [0]
    config = composition_config(cfg, plan).to_dict()
    assert config["anchor"]["tokenizer"] == str(dirs["anchor"])
    assert [a["model"]["tokenizer"] for a in config["augments"]] == [str(dirs["own"]), None]
    assert [a["tokens"] for a in config["augments"]] == ["aligned", "shared"]
    # without a plan: the config as written (what the checks before any loading see)
    unplanned = composition_config(cfg).to_dict()
    assert unplanned["anchor"]["tokenizer"] is None
    assert [a["tokens"] for a in unplanned["augments"]] == ["auto", "auto"]
