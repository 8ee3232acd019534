"""The anchor's frozen prefix, computed once (``trainer.cache_anchor_prefix=true``).

Below the lowest layer training changes, the anchor's states depend only on the input tokens
(``comm_cli.compose.prefix``). A precompute pass runs those layers once over the training split
and stores the output of the last of them; every training step reads it instead of running them.
Unlike the augment-state cache, this one is worth sharing between runs: several compositions
(or learning rates) over one anchor and one training split compute the same prefix, so point
``trainer.anchor_prefix_cache_dir`` at one directory and the first run builds what the others
read (the fingerprint keeps a cache from ever serving other data, another anchor or another
prefix length).

Layout (written under a temporary name, renamed when complete):

    manifest.json   fingerprint, dtype, width, prefix length, token count
    offsets.npy     int64 (examples + 1): token offset of each example
    states.bin      raw (tokens, width) array in the anchor's dtype, memory-mapped

Disk cost: width x bytes per token, e.g. 576 x 2 = 1.1 KiB for SmolLM2-135M in bfloat16.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from comm_cli.atomic import building, read_manifest, write_manifest
from comm_cli.compose.loading import dtype_name, torch_dtype
from comm_cli.compose.prefix import prefix_states
from comm_cli.training.augment_cache import numpy_dtype, right_padded, states_from_numpy, states_to_numpy

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


def fingerprint(dataset, anchor_spec: dict, length: int, dtype: torch.dtype) -> str:
    """A hash of everything the prefix states depend on: the anchor (as configured), the prefix
    length, the dtype and every example's tokens."""
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, anchor_spec, length, dtype_name(dtype)]).encode())
    for row in dataset:
        digest.update(np.asarray(row["input_ids"], dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:32]


class AnchorPrefixCache:
    """Read side: each example's prefix states, memory-mapped."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory = Path(directory)
        self.manifest = manifest
        self.dtype = torch_dtype(manifest["dtype"])
        self.width = manifest["width"]
        self.offsets = np.load(self.directory / "offsets.npy")
        self.states = np.memmap(
            self.directory / "states.bin",
            dtype=numpy_dtype(self.dtype),
            mode="r",
            shape=(manifest["tokens"], self.width),
        )

    @classmethod
    def open(cls, directory: str | Path, fingerprint: str) -> AnchorPrefixCache | None:
        manifest = read_manifest(directory, fingerprint=fingerprint, version=CACHE_VERSION)
        return None if manifest is None else cls(Path(directory), manifest)

    def batch_states(self, example_ids: list[int], length: int) -> torch.Tensor:
        """(batch, length, width) states of a right-padded batch; zeros on padding."""
        array = np.zeros((len(example_ids), length, self.width), dtype=numpy_dtype(self.dtype))
        for row, example in enumerate(example_ids):
            start, end = int(self.offsets[example]), int(self.offsets[example + 1])
            n = min(end - start, length)
            array[row, :n] = self.states[start : start + n]
        return states_from_numpy(array, self.dtype)


@torch.no_grad()
def build_cache(anchor, layers, length: int, dataset, directory: str | Path, fingerprint: str,
                batch_size: int = 64, progress: bool = True) -> AnchorPrefixCache:  # fmt: skip
    """Run the anchor's first ``length`` layers once over ``dataset`` (its plain forward: no
    bridge is active outside a composition's forward) and write the last one's output."""
    from tqdm.auto import tqdm

    from comm_cli.compose.masks import positions_from_mask

    directory = Path(directory)
    device = next(anchor.parameters()).device
    offsets, dtype, width = [0], None, None

    def complete(path: Path) -> bool:  # another run sharing the cache directory built it first
        return read_manifest(path, fingerprint=fingerprint, version=CACHE_VERSION) is not None

    with building(directory, keep=complete) as tmp:
        with open(tmp / "states.bin", "wb") as handle:
            for start in tqdm(range(0, len(dataset), batch_size), desc="anchor prefix states", leave=False,
                              disable=not progress):  # fmt: skip
                rows = [dataset[i]["input_ids"] for i in range(start, min(start + batch_size, len(dataset)))]
                ids, mask = right_padded(rows, device)
                states = prefix_states(
                    anchor,
                    layers,
                    length,
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions_from_mask(mask),
                ).cpu()
                dtype, width = states.dtype, states.shape[-1]
                array = states_to_numpy(states)
                for i, row in enumerate(rows):
                    handle.write(np.ascontiguousarray(array[i, : len(row)]).tobytes())
                    offsets.append(offsets[-1] + len(row))
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        write_manifest(
            tmp,
            {
                "version": CACHE_VERSION,
                "fingerprint": fingerprint,
                "dtype": dtype_name(dtype),
                "width": width,
                "prefix_layers": length,
                "examples": len(dataset),
                "tokens": offsets[-1],
            },
        )
    megabytes = offsets[-1] * width * np.dtype(numpy_dtype(dtype)).itemsize / 1e6
    logger.info(
        "cached the anchor's first %d layers' states of %d examples (%d tokens, %.0f MB) in %s",
        length, len(dataset), offsets[-1], megabytes, directory,
    )  # fmt: skip
    return AnchorPrefixCache.open(directory, fingerprint)


class PrefixStatesCollator:
    """Wraps a collator: adds ``anchor_prefix_states`` for the batch's examples (the dataset
    carries an ``example_id`` column)."""

    def __init__(self, collator, cache: AnchorPrefixCache):
        self.collator, self.cache = collator, cache

    def __call__(self, examples):
        batch = self.collator(examples)
        ids = [int(e["example_id"]) for e in examples]
        batch["anchor_prefix_states"] = self.cache.batch_states(ids, batch["input_ids"].shape[1])
        return batch
