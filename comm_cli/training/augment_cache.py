"""Augment-state caching (``trainer.cache_augment_states=true``).

The augmenting models are frozen, so their outputs at the connected layers depend only on the
input tokens. A precompute pass runs them once over the training split and stores those states;
every training step then reads them instead of running the augmenting models, which removes the
augment forward from the step cost (DESIGN.md section 3).

Layout of a cache directory (written under a temporary name, renamed when complete):

    manifest.json                 fingerprint, dtype, layers, shards, token count
    offsets.npy                   int64 (examples + 1): token offset of each example
    a{augment}_l{layer}_s{shard}.bin   raw (tokens, width) arrays in the bridge dtype, memory-mapped

Example i's states are rows offsets[i]:offsets[i+1] (all its tokens in causal mode, its prompt
tokens in prompt mode). Disk cost per token: sum over cached layers of width x bytes(dtype),
e.g. 4 layers x 64 x 4 bytes = 1 KiB for the key-value experiment in float32.

The fingerprint covers the token ids (and prompt masks), the augmenting models, the cached
layers, the mask mode and the dtype: a cache built for other data or models is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from comm_cli.compose.loading import dtype_name, torch_dtype

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
OFFSETS = "offsets.npy"
# numpy has no bfloat16: its states are stored as the raw 16-bit words and viewed back.
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


def data_fingerprint(dataset, model, mask_mode: str, dtype: torch.dtype) -> str:
    """A hash of everything the cached states depend on."""
    digest = hashlib.sha256()
    for spec in model.config.augments:
        digest.update(json.dumps([spec.model.name_or_path, spec.model.revision, spec.model.dtype]).encode())
    digest.update(json.dumps([model._capture_layers, mask_mode, dtype_name(dtype)]).encode())
    for row in dataset:
        digest.update(np.asarray(row["input_ids"], dtype=np.int64).tobytes())
        if mask_mode == "prompt":
            digest.update(np.asarray(row["prompt_mask"], dtype=np.int8).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:32]


class AugmentStateCache:
    """Read side: per-example connected-layer states, memory-mapped from disk."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory = Path(directory)
        self.manifest = manifest
        self.dtype = torch_dtype(manifest["dtype"])
        self.offsets = np.load(self.directory / OFFSETS)
        self.layers = [tuple(x) for x in manifest["layers"]]  # (augment, layer, width)
        self.shard_starts = [s["start"] for s in manifest["shards"]]
        self._maps: dict[tuple[int, int, int], np.memmap] = {}

    @classmethod
    def open(cls, directory: str | Path, fingerprint: str) -> AugmentStateCache | None:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            return None
        manifest = json.loads(path.read_text())
        if manifest.get("fingerprint") != fingerprint:
            return None
        return cls(Path(directory), manifest)

    def _map(self, augment: int, layer: int, width: int, shard: int) -> np.memmap:
        key = (augment, layer, shard)
        if key not in self._maps:
            info = self.manifest["shards"][shard]
            self._maps[key] = np.memmap(
                self.directory / f"a{augment}_l{layer}_s{shard}.bin",
                dtype=_NUMPY[self.dtype],
                mode="r",
                shape=(info["tokens"], width),
            )
        return self._maps[key]

    def _rows(self, augment: int, layer: int, width: int, start: int, end: int) -> np.ndarray:
        shard = int(np.searchsorted(self.shard_starts, start, side="right") - 1)
        base = self.shard_starts[shard]
        return self._map(augment, layer, width, shard)[start - base : end - base]

    def batch_states(self, example_ids: list[int], length: int) -> list[dict[int, torch.Tensor]]:
        """States for a right-padded batch: one {layer: (batch, length, width)} dict per augment."""
        num_augments = 1 + max(a for a, _, _ in self.layers)
        out: list[dict[int, torch.Tensor]] = [{} for _ in range(num_augments)]
        for augment, layer, width in self.layers:
            array = np.zeros((len(example_ids), length, width), dtype=_NUMPY[self.dtype])
            for row, example in enumerate(example_ids):
                start, end = int(self.offsets[example]), int(self.offsets[example + 1])
                n = min(end - start, length)
                array[row, :n] = self._rows(augment, layer, width, start, start + n)
            tensor = torch.from_numpy(array)
            out[augment][layer] = tensor.view(torch.bfloat16) if self.dtype == torch.bfloat16 else tensor
        return out


@torch.no_grad()
def build_cache(
    model,
    dataset,
    directory: str | Path,
    fingerprint: str,
    dtype: torch.dtype,
    batch_size: int = 64,
    shard_tokens: int = 1 << 24,
) -> AugmentStateCache:
    """Run the augmenting models once over ``dataset`` and write their connected-layer states."""
    from tqdm.auto import tqdm

    from comm_cli.compose.masks import positions_from_mask

    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    prompt_mode = model.mask_mode == "prompt"
    device = next(model.augments[0].parameters()).device
    layers = []
    for index, layer_list in enumerate(model._capture_layers):
        width = model._augment_configs[index].get_text_config().hidden_size
        layers += [(index, layer, width) for layer in layer_list]
    offsets = [0]
    shards = [{"start": 0, "tokens": 0}]
    files = {key[:2]: open(tmp / f"a{key[0]}_l{key[1]}_s0.bin", "wb") for key in layers}  # noqa: SIM115
    numpy_dtype = _NUMPY[dtype]
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc="augment states", leave=False):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            lengths = [sum(r["prompt_mask"]) if prompt_mode else len(r["input_ids"]) for r in rows]
            width_max = max(max(lengths), 1)
            ids = torch.zeros((len(rows), width_max), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (row, n) in enumerate(zip(rows, lengths)):
                ids[i, :n] = torch.tensor(row["input_ids"][:n])
                mask[i, :n] = 1
            ids, mask = ids.to(device), mask.to(device)
            positions = positions_from_mask(mask)
            per_augment = [model.augment_states(a, ids, mask, positions) for a in range(len(model.augments))]
            if shards[-1]["tokens"] + sum(lengths) > shard_tokens and shards[-1]["tokens"] > 0:
                for handle in files.values():
                    handle.close()
                shards.append({"start": offsets[-1], "tokens": 0})
                files = {
                    key[:2]: open(tmp / f"a{key[0]}_l{key[1]}_s{len(shards) - 1}.bin", "wb") for key in layers
                }  # noqa: SIM115
            for augment, layer, _ in layers:
                states = per_augment[augment][layer].to(dtype).cpu()
                if dtype == torch.bfloat16:
                    states = states.view(torch.int16)
                array = states.numpy().view(numpy_dtype)
                for i, n in enumerate(lengths):
                    files[(augment, layer)].write(np.ascontiguousarray(array[i, :n]).tobytes())
            for n in lengths:
                offsets.append(offsets[-1] + n)
            shards[-1]["tokens"] += sum(lengths)
    finally:
        for handle in files.values():
            handle.close()
    np.save(tmp / OFFSETS, np.asarray(offsets, dtype=np.int64))
    manifest = {
        "fingerprint": fingerprint,
        "dtype": dtype_name(dtype),
        "layers": [list(x) for x in layers],
        "shards": shards,
        "examples": len(dataset),
        "tokens": offsets[-1],
        "bytes_per_token": sum(width for _, _, width in layers) * np.dtype(numpy_dtype).itemsize,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    logger.info(
        "cached augment states of %d examples (%d tokens, %d bytes/token) in %s",
        len(dataset),
        offsets[-1],
        manifest["bytes_per_token"],
        directory,
    )
    return AugmentStateCache(directory, manifest)


class CachedStatesCollator:
    """Wraps a collator: adds ``augment_states`` read from the cache for the batch's examples
    (the dataset carries an ``example_id`` column)."""

    def __init__(self, collator, cache: AugmentStateCache):
        self.collator, self.cache = collator, cache

    def __call__(self, examples):
        batch = self.collator(examples)
        ids = [int(e["example_id"]) for e in examples]
        batch["augment_states"] = self.cache.batch_states(ids, batch["input_ids"].shape[1])
        return batch
