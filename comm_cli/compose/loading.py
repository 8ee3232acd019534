"""Loading frozen base models and their configs from a hub id or a local directory.

Errors that a user causes (a path that does not exist, an id the hub does not know, a
``trust_remote_code`` model without the flag) become one-line ModelLoadErrors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from comm_cli.compose.specs import ModelSpec
from comm_cli.errors import ModelLoadError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype | str:
    """Map a config dtype name to a torch dtype ("auto" passes through to transformers)."""
    return "auto" if name == "auto" else _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


def canonical_name(name_or_path: str) -> str:
    """An existing local directory becomes absolute (so a saved composition loads from anywhere);
    anything else is kept as a hub id."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def _explain(spec: ModelSpec, what: str, err: Exception) -> ModelLoadError:
    name = spec.name_or_path
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and not _looks_like_hub_id(name)
    if "trust_remote_code" in str(err):
        return ModelLoadError(
            f"{what} '{name}' needs custom code from its repository: set trust_remote_code=true for it "
            "if you trust that code"
        )
    if looks_local and not Path(name).expanduser().exists():
        return ModelLoadError(f"{what} '{name}' does not exist: give an existing model directory or a hub id")
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelLoadError(
        f"cannot load {what} '{name}' ({first_line}): give a local directory holding config.json and "
        "weights, or a Hugging Face Hub id reachable from this machine (check spelling, revision and network)"
    )


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def load_model_config(spec: ModelSpec, what: str = "model"):
    """The transformers config of a base model, without loading its weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            spec.name_or_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError, KeyError) as err:
        raise _explain(spec, what, err) from err


def load_causal_lm(spec: ModelSpec, what: str = "model", device: str | torch.device | None = None):
    """Load a *ForCausalLM model in eval mode with the spec's dtype."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec.name_or_path,
            revision=spec.revision,
            dtype=torch_dtype(spec.dtype),
            trust_remote_code=spec.trust_remote_code,
        )
    except (OSError, ValueError, KeyError) as err:
        raise _explain(spec, what, err) from err
    if device is not None:
        model.to(device)
    return model.eval()
