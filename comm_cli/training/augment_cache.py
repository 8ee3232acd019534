"""Augment-state caching (``trainer.cache_augment_states=true``).

The augmenting models are frozen, so their outputs at the connected layers depend only on the
input tokens. A precompute pass runs them once over the training split and stores those states;
every training step then reads them instead of running the augmenting models, which removes the
augment forward from the step cost (docs/performance.md, "The cost model").

Layout of a cache directory (written under a temporary name, renamed when complete):

    manifest.json                 fingerprint, dtype, layers, shards, token counts
    offsets_a{augment}.npy        int64 (examples + 1): token offset of each example
    a{augment}_l{layer}_s{shard}.bin   raw (tokens, width) arrays in the bridge dtype, memory-mapped

Example i's states for augment a are rows offsets_a[i]:offsets_a[i+1] of its files: the tokens
it reads of that example, i.e. the anchor's tokens (all of them in causal mode, the prompt ones
in prompt mode) or, for an augment with its own tokenizer, its own tokens
(``augment{a}_input_ids``). Disk cost per token: sum over cached layers of width x bytes(dtype),
e.g. 4 layers x 64 x 4 bytes = 1 KiB for the key-value experiment in float32.

The fingerprint covers the token ids each augment reads (and prompt masks), the augmenting
models, the cached layers, the mask mode and the dtype: a cache built for other data or models
is never read.
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

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # offsets per augmenting model


def offsets_name(augment: int) -> str:
    return f"offsets_a{augment}.npy"


# numpy has no bfloat16: its states are stored as the raw 16-bit words and viewed back.
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


def numpy_dtype(dtype: torch.dtype) -> type:
    """The numpy type a cache file stores states of ``dtype`` as."""
    return _NUMPY[dtype]


def states_to_numpy(states: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the numpy array its cache file stores (bfloat16 as raw 16-bit words)."""
    words = states.view(torch.int16) if states.dtype == torch.bfloat16 else states
    return words.numpy().view(_NUMPY[states.dtype])


def states_from_numpy(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The tensor a cache file's array holds (its 16-bit words viewed back as bfloat16)."""
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def right_padded(token_ids: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of a right-padded batch of token id lists, on ``device``."""
    ids = torch.zeros((len(token_ids), max(max(len(t) for t in token_ids), 1)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row_ids in enumerate(token_ids):
        ids[i, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        mask[i, : len(row_ids)] = 1
    return ids.to(device), mask.to(device)


def _aligned(model, augment: int) -> bool:
    return model.augment_readers[augment] is not None


def augment_token_ids(row: dict, model, augment: int) -> list[int]:
    """The token ids augment ``augment`` reads of one tokenised example."""
    if _aligned(model, augment):
        return list(row[f"augment{augment}_input_ids"])
    ids = list(row["input_ids"])
    return ids[: sum(row["prompt_mask"])] if model.mask_mode == "prompt" else ids


def data_fingerprint(dataset, model, mask_mode: str, dtype: torch.dtype) -> str:
    """A hash of everything the cached states depend on."""
    digest = hashlib.sha256()
    for spec in model.config.augments:
        digest.update(
            json.dumps([spec.model.name_or_path, spec.model.revision, spec.model.dtype, spec.tokens]).encode()
        )
    digest.update(json.dumps([model.read_augment_layers, mask_mode, dtype_name(dtype)]).encode())
    for row in dataset:
        for augment in range(len(model.augments)):
            digest.update(np.asarray(augment_token_ids(row, model, augment), dtype=np.int64).tobytes())
            digest.update(b"/")
        digest.update(b"|")
    return digest.hexdigest()[:32]


class AugmentStateCache:
    """Read side: per-example connected-layer states, memory-mapped from disk."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory = Path(directory)
        self.manifest = manifest
        self.dtype = torch_dtype(manifest["dtype"])
        self.layers = [tuple(x) for x in manifest["layers"]]  # (augment, layer, width)
        augments = sorted({a for a, _, _ in self.layers})
        self.offsets = {a: np.load(self.directory / offsets_name(a)) for a in augments}
        self.shard_starts = {a: [s["start"] for s in manifest["shards"][str(a)]] for a in augments}
        self._maps: dict[tuple[int, int, int], np.memmap] = {}

    @classmethod
    def open(cls, directory: str | Path, fingerprint: str) -> AugmentStateCache | None:
        manifest = read_manifest(directory, fingerprint=fingerprint, version=CACHE_VERSION)
        return None if manifest is None else cls(Path(directory), manifest)

    def _map(self, augment: int, layer: int, width: int, shard: int) -> np.memmap:
        key = (augment, layer, shard)
        if key not in self._maps:
            info = self.manifest["shards"][str(augment)][shard]
            self._maps[key] = np.memmap(
                self.directory / f"a{augment}_l{layer}_s{shard}.bin",
                dtype=_NUMPY[self.dtype],
                mode="r",
                shape=(info["tokens"], width),
            )
        return self._maps[key]

    def _rows(self, augment: int, layer: int, width: int, start: int, end: int) -> np.ndarray:
        starts = self.shard_starts[augment]
        shard = int(np.searchsorted(starts, start, side="right") - 1)
        base = starts[shard]
        return self._map(augment, layer, width, shard)[start - base : end - base]

    def batch_states(self, example_ids: list[int], lengths: list[int]) -> list[dict[int, torch.Tensor]]:
        """States for a right-padded batch: one {layer: (batch, lengths[augment], width)} dict per
        augment (its own padded length: the anchor's, or its own tokens')."""
        num_augments = 1 + max(a for a, _, _ in self.layers)
        out: list[dict[int, torch.Tensor]] = [{} for _ in range(num_augments)]
        for augment, layer, width in self.layers:
            length = lengths[augment]
            offsets = self.offsets[augment]
            array = np.zeros((len(example_ids), length, width), dtype=_NUMPY[self.dtype])
            for row, example in enumerate(example_ids):
                start, end = int(offsets[example]), int(offsets[example + 1])
                n = min(end - start, length)
                array[row, :n] = self._rows(augment, layer, width, start, start + n)
            out[augment][layer] = states_from_numpy(array, self.dtype)
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
    progress: bool = True,
) -> AugmentStateCache:
    """Run the augmenting models once over ``dataset`` and write their connected-layer states."""
    directory = Path(directory)

    def complete(path: Path) -> bool:  # another run sharing the cache directory built it first
        return read_manifest(path, fingerprint=fingerprint, version=CACHE_VERSION) is not None

    with building(directory, keep=complete) as tmp:
        layers, shards, totals = [], {}, {}
        for augment, (layer_list, width) in enumerate(zip(model.read_augment_layers, model.augment_widths)):
            layers += [(augment, layer, width) for layer in layer_list]
            shards[str(augment)], totals[str(augment)] = _write_augment(
                model, dataset, tmp, augment, layer_list, width, dtype, batch_size, shard_tokens, progress
            )
        bytes_per_token = sum(width for _, _, width in layers) * np.dtype(_NUMPY[dtype]).itemsize
        write_manifest(
            tmp,
            {
                "version": CACHE_VERSION,
                "fingerprint": fingerprint,
                "dtype": dtype_name(dtype),
                "layers": [list(x) for x in layers],
                "shards": shards,
                "examples": len(dataset),
                "tokens": totals,
                "bytes_per_token": bytes_per_token,
            },
        )
    logger.info(
        "cached augment states of %d examples (%s tokens per augment, %d bytes/token) in %s",
        len(dataset),
        totals,
        bytes_per_token,
        directory,
    )
    return AugmentStateCache.open(directory, fingerprint)


def _write_augment(model, dataset, tmp: Path, augment, layer_list, width, dtype, batch_size, shard_tokens,
                   progress: bool):  # fmt: skip
    """One augmenting model's states over the dataset: its files, offsets and shard table."""
    from tqdm.auto import tqdm

    from comm_cli.compose.masks import positions_from_mask

    device = next(model.augments[augment].parameters()).device
    offsets, shards = [0], [{"start": 0, "tokens": 0}]

    def open_files(shard: int) -> dict:
        return {layer: open(tmp / f"a{augment}_l{layer}_s{shard}.bin", "wb") for layer in layer_list}  # noqa: SIM115

    files = open_files(0)
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc=f"augment {augment} states", leave=False,
                          disable=not progress):  # fmt: skip
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            token_ids = [augment_token_ids(r, model, augment) for r in rows]
            lengths = [len(t) for t in token_ids]
            ids, mask = right_padded(token_ids, device)
            states = model.augment_states(augment, ids, mask, positions_from_mask(mask))
            if shards[-1]["tokens"] + sum(lengths) > shard_tokens and shards[-1]["tokens"] > 0:
                for handle in files.values():
                    handle.close()
                shards.append({"start": offsets[-1], "tokens": 0})
                files = open_files(len(shards) - 1)
            for layer in layer_list:
                array = states_to_numpy(states[layer].to(dtype).cpu())
                for i, n in enumerate(lengths):
                    files[layer].write(np.ascontiguousarray(array[i, :n]).tobytes())
            for n in lengths:
                offsets.append(offsets[-1] + n)
            shards[-1]["tokens"] += sum(lengths)
    finally:
        for handle in files.values():
            handle.close()
    np.save(tmp / offsets_name(augment), np.asarray(offsets, dtype=np.int64))
    return shards, offsets[-1]


class CachedStatesCollator:
    """Wraps a collator: adds ``augment_states`` read from the cache for the batch's examples
    (the dataset carries an ``example_id`` column)."""

    def __init__(self, collator, cache: AugmentStateCache):
        self.collator, self.cache = collator, cache

    def __call__(self, examples):
        batch = self.collator(examples)
        ids = [int(e["example_id"]) for e in examples]
        aligned = batch.get("augment_inputs") or []
        count = 1 + max(a for a, _, _ in self.cache.layers)
        lengths = [
            aligned[k]["input_ids"].shape[1]
            if k < len(aligned) and aligned[k] is not None
            else batch["input_ids"].shape[1]
            for k in range(count)
        ]
        batch["augment_states"] = self.cache.batch_states(ids, lengths)
        return batch
