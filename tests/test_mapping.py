"""Layer mapping: the three forms, negative indices, and the errors a user can cause."""

from __future__ import annotations

import pytest

from comm_cli.compose import ComposedModel, CompositionConfig, MappingSpec, ModelSpec, check_config
from comm_cli.compose.mapping import resolve_connections
from comm_cli.compose.specs import AugmentSpec
from comm_cli.errors import ConfigError, MappingError
from tests.conftest import tiny_config


def test_every_k_is_the_papers_every_fourth_layer():
    assert resolve_connections(MappingSpec(every=4), 32, 32) == [
        (3, 3),
        (7, 7),
        (11, 11),
        (15, 15),
        (19, 19),
        (23, 23),
        (27, 27),
        (31, 31),
    ]


def test_every_k_with_different_depths_thins_the_longer_model_evenly():
    pairs = resolve_connections(MappingSpec(every=4), 24, 32)
    assert len(pairs) == 6
    assert [a for a, _ in pairs] == [3, 7, 11, 15, 19, 23]
    assert pairs[-1][1] == 31  # the last selected anchor layer is kept
    assert len({b for _, b in pairs}) == 6


def test_count_spreads_over_both_depths():
    assert resolve_connections(MappingSpec(count=4), 4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert resolve_connections(MappingSpec(count=2), 8, 4) == [(3, 1), (7, 3)]


def test_explicit_pairs_with_negative_indices():
    assert resolve_connections(MappingSpec(pairs=[[-1, -1], [0, 1]]), 6, 8) == [(0, 1), (5, 7)]


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            MappingSpec(pairs=[[0, 8]]),
            "anchor layer 8 in pair [0, 8] is out of range: the model has 8 layers",
        ),
        (
            MappingSpec(pairs=[[-7, 0]]),
            "augment layer -7 in pair [-7, 0] is out of range: the model has 6 layers",
        ),
        (MappingSpec(pairs=[]), "mapping.pairs is empty"),
        (MappingSpec(pairs=[[0, 1], [2, 1]]), "anchor layer 1 is fed twice"),
        (MappingSpec(pairs=[[0, 1, 2]]), "must be [augment_layer, anchor_layer]"),
        (MappingSpec(count=7), "mapping.count=7 is out of range"),
        (MappingSpec(count=0), "mapping.count=0 is out of range"),
        (MappingSpec(every=0), "mapping.every must be >= 1"),
        (MappingSpec(every=9), "selects no layer"),
    ],
)
def test_bad_mappings_fail_with_a_clear_message(spec, message):
    with pytest.raises(MappingError) as err:
        resolve_connections(spec, 6, 8)
    assert message in str(err.value)


def test_a_mapping_needs_exactly_one_form():
    with pytest.raises(ConfigError, match="exactly one of pairs / every / count"):
        MappingSpec(every=2, count=2)
    with pytest.raises(ConfigError, match="exactly one of pairs / every / count"):
        MappingSpec()


def _config_only_dir(tmp_path, name, family, **kwargs):
    """A model directory with config.json but no weights: loading weights from it would fail."""
    path = tmp_path / name
    tiny_config(family, **kwargs).save_pretrained(path)
    return path


def test_bad_mapping_is_reported_from_the_configs_before_weights_load(tmp_path):
    anchor = _config_only_dir(tmp_path, "anchor", "llama", layers=4)
    augment = _config_only_dir(tmp_path, "augment", "qwen2", layers=2)
    config = CompositionConfig(
        anchor=ModelSpec(str(anchor)),
        augments=[AugmentSpec(model=ModelSpec(str(augment)), mapping=MappingSpec(pairs=[[3, 0]]))],
    )
    with pytest.raises(
        MappingError, match="augment layer 3 in pair \\[3, 0\\] is out of range: the model has 2 layers"
    ):
        check_config(config)
    # from_config checks before it loads: the missing weights are never reached.
    with pytest.raises(MappingError):
        ComposedModel.from_config(config)


def test_head_count_must_divide_the_anchor_width(tmp_path):
    anchor = _config_only_dir(tmp_path, "anchor", "llama", width=32)
    augment = _config_only_dir(tmp_path, "augment", "qwen2")
    config = CompositionConfig(
        anchor=ModelSpec(str(anchor)),
        augments=[AugmentSpec(model=ModelSpec(str(augment)), mapping=MappingSpec(every=1))],
    )
    config.bridge.num_heads = 5
    with pytest.raises(ConfigError, match="num_heads=5 does not divide the anchor width 32"):
        check_config(config)
