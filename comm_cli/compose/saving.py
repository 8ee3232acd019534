"""Saving and loading a composition, in the manner of a PEFT adapter.

A saved composition is a small directory:

    composition_config.json         sorted JSON: comm version, anchor and augment specs (id or
                                    path, revision, dtype), connections, bridge settings, mask mode
    composition_model.safetensors   the bridge weights only (keys ``bridges.<i>.<name>``)

Files are written under temporary names and renamed, so an interrupted save never leaves a
half-written file under the final name. Loading reads JSON and safetensors only: nothing is
unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import comm_cli
from comm_cli.atomic import atomic_write, atomic_write_text
from comm_cli.compose.checks import check_config
from comm_cli.compose.loading import load_augment_model, load_causal_lm
from comm_cli.compose.specs import CompositionConfig
from comm_cli.errors import ModelLoadError

logger = logging.getLogger(__name__)

CONFIG_NAME = "composition_config.json"
WEIGHTS_NAME = "composition_model.safetensors"


def save_composition(model, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["comm_version"] = comm_cli.__version__
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.bridge_state_dict().items()}
    metadata = {"format": "pt", "comm_version": comm_cli.__version__}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def read_composition_config(directory: str | Path) -> CompositionConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ModelLoadError(
            f"'{directory}' is not a saved composition (no {CONFIG_NAME}): point to a directory written by "
            "save_pretrained / comm-train"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(
            f"{path} is not valid JSON ({err}): the save was damaged; re-save the composition"
        ) from err
    return CompositionConfig.from_dict(data)


def with_bases_at(config: CompositionConfig, anchor: str | None = None, augments=()) -> CompositionConfig:
    """The composition with its bases read from other places (moved or copied models): ``anchor``
    and ``augments[i]`` replace the recorded ``name_or_path`` where given (their tokenizers come
    from there too, unless the spec names a tokenizer elsewhere)."""

    def moved(spec, path):
        if not path or path == spec.name_or_path:
            return spec
        tokenizer = None if spec.tokenizer in (None, spec.name_or_path) else spec.tokenizer
        return dataclasses.replace(spec, name_or_path=path, tokenizer=tokenizer)

    config = dataclasses.replace(config, anchor=moved(config.anchor, anchor))
    config.augments = [
        dataclasses.replace(spec, model=moved(spec.model, augments[i] if i < len(augments) else None))
        for i, spec in enumerate(config.augments)
    ]
    return config


def check_bases_fit(directory: str | Path, config: CompositionConfig) -> None:
    """That the bases ``config`` names fit the bridges saved in ``directory``, from the model
    configs and the weights file's header alone (nothing large loads): each connection's layers
    exist, and the widths are the ones the bridges were trained between."""
    from safetensors import safe_open

    from comm_cli.compose.blocks import hidden_size
    from comm_cli.compose.loading import load_model_config

    check_config(config)
    with safe_open(str(Path(directory) / WEIGHTS_NAME), "pt") as weights:
        shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}  # noqa: SIM118
    first_bridge = 0
    for index, spec in enumerate(config.augments):
        proj = shapes.get(f"bridges.{first_bridge}.proj.weight")
        first_bridge += len(spec.connections or [])
        if proj is None:
            continue
        anchor_width = hidden_size(load_model_config(config.anchor, "anchor model"))
        augment_width = hidden_size(load_model_config(spec.model, f"augmenting model {index}"))
        for what, name, have, need in (
            ("anchor", config.anchor.name_or_path, anchor_width, proj[0]),
            (f"augmenting model {index}", spec.model.name_or_path, augment_width, proj[1]),
        ):
            if have != need:
                raise ModelLoadError(
                    f"the {what} '{name}' is {have} wide, but the bridges in '{directory}' were trained "
                    f"on a {need}-wide one: give the model the composition was trained with"
                )


def load_composition(cls, directory, anchor=None, augments=None, device=None, dtype=None, anchor_at=None,
                     augments_at=()):  # fmt: skip
    """``dtype``: load the bases in it instead of the dtype each spec records (bfloat16 on a GPU).
    ``anchor_at`` / ``augments_at``: where the bases are now, when not where the config says
    (checked to fit the bridges before they load)."""

    def loading(spec):
        return spec if dtype is None else dataclasses.replace(spec, dtype=dtype)

    directory = Path(directory)
    config = read_composition_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise ModelLoadError(f"'{directory}' has no {WEIGHTS_NAME}: the composition was not saved completely")
    if anchor_at or any(augments_at):
        config = with_bases_at(config, anchor_at, augments_at)
        check_bases_fit(directory, config)
    if anchor is None or augments is None:
        check_config(config)
        if anchor is None:
            anchor = load_causal_lm(loading(config.anchor), "anchor model", device)
        if augments is None:
            augments = [
                load_augment_model(loading(spec.model), f"augmenting model {i}", device)
                for i, spec in enumerate(config.augments)
            ]
    model = cls(anchor, list(augments), config)
    state = load_file(str(weights_path), device="cpu")
    expected = model.bridge_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"{weights_path} does not match the composition in {CONFIG_NAME} (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): the directory mixes files of different saves"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ModelLoadError(
                f"bridge weight {key} has shape {tuple(tensor.shape)} but the models need "
                f"{tuple(expected[key].shape)}: the composition was saved for other base models"
            )
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(state[key].to(param.dtype))
    # Text in, text out (model.encode, model.generate(prompts=...)) needs the tokenizers: attach
    # them from the recorded sources. An augment with its own tokenizer cannot run without them;
    # bases that ship none (models built from a config) leave a shared-token composition usable
    # with ids alone.
    if any(spec.tokens == "aligned" for spec in config.augments):
        model.attach_saved_tokenizers()
    else:
        try:
            model.attach_saved_tokenizers()
        except ModelLoadError as err:
            logger.info("no tokenizers attached (%s): the composition takes token ids only", err)
    return model
