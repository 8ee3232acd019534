"""Augment-state caching: the cached states give the uncached logits, the augment is not run,
and a training run with the cache follows the same loss curve."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
from comm_cli.compose.encoding import CompletionCollator
from comm_cli.training.augment_cache import (
    AugmentStateCache,
    CachedStatesCollator,
    build_cache,
    data_fingerprint,
)
from tests.conftest import tiny_model
from tests.helpers import (
    base_args,
    build_workspace,
    max_abs_diff,
    run_train,
    trainable_weights,
)


def dataset(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 4 + i % 5
        ids = torch.randint(3, 64, (length,), generator=g).tolist()
        prompt = 2 + i % 3
        rows.append(
            {
                "input_ids": ids,
                "labels": [-100] * prompt + ids[prompt:],
                "prompt_mask": [1] * prompt + [0] * (length - prompt),
                "example_id": i,
            }
        )
    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("mask_mode", ["causal", "prompt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_states_give_the_uncached_logits_without_running_the_augment(tmp_path, mask_mode, dtype):
    anchor, augment = tiny_model("llama", width=48), tiny_model("qwen2", seed=1, width=32, layers=3)
    calls = []
    for layer in augment.model.layers:
        layer.register_forward_pre_hook(lambda m, a: calls.append(1))
    model = ComposedModel.from_models(
        anchor,
        augment,
        MappingSpec(pairs=[[0, 1], [2, 3]]),
        BridgeConfig(zero_init_output=False),
        mask_mode=mask_mode,
    )
    data = dataset()
    fingerprint = data_fingerprint(data, model, mask_mode, dtype)
    cache = build_cache(model, data, tmp_path / "cache", fingerprint, dtype, batch_size=3, shard_tokens=16)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert len(manifest["shards"]["0"]) > 1  # sharded
    assert manifest["bytes_per_token"] == 2 * 32 * (4 if dtype == torch.float32 else 2)
    collate = CachedStatesCollator(CompletionCollator(0), cache)
    batch = collate([data[i] for i in (7, 2, 4)])
    kwargs = dict(
        attention_mask=batch["attention_mask"], augment_attention_mask=batch["augment_attention_mask"]
    )
    calls.clear()
    cached = model(batch["input_ids"], augment_states=batch["augment_states"], **kwargs).logits
    assert calls == []  # the augmenting model did not run
    live = model(batch["input_ids"], **kwargs).logits
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(cached[real], live[real], atol=tolerance, rtol=0)


@pytest.mark.parametrize("mask_mode", ["causal", "prompt"])
def test_cached_states_of_an_augment_with_its_own_tokenizer(tmp_path, mask_mode):
    """Aligned augments cache their own tokens' states (their own offsets), and the cached
    composition gives the live logits."""
    from comm_cli.compose.encoding import augment_pad_ids
    from comm_cli.data.loading import DataConfig
    from comm_cli.data.tokenize import tokenize_split
    from tests import tokenizer_zoo as zoo

    anchor_tok, augment_tok = zoo.byte_bpe(), zoo.unigram()
    anchor = tiny_model("llama", width=48, vocab=len(anchor_tok))
    augment = tiny_model("qwen2", seed=1, width=32, layers=3, vocab=len(augment_tok))
    model = ComposedModel.from_models(
        anchor,
        augment,
        MappingSpec(pairs=[[0, 1], [2, 3]]),
        BridgeConfig(zero_init_output=False),
        mask_mode=mask_mode,
    )
    model.use_tokenizers(anchor_tok, [augment_tok])
    rows = [
        {"prompt": p, "completion": c}
        for p, c in [("the quick", " brown fox"), ("hello", " world it's"), ("a b c", " d")]
    ]
    plan = model.read_plan()
    data, _ = tokenize_split(
        datasets.Dataset.from_list(rows), anchor_tok, DataConfig(data_files="x"), plan=plan
    )
    data = data.add_column("example_id", list(range(len(data))))
    fingerprint = data_fingerprint(data, model, mask_mode, torch.float32)
    cache = build_cache(model, data, tmp_path / "cache", fingerprint, torch.float32, batch_size=2)
    collate = CachedStatesCollator(CompletionCollator(0, augment_pad_ids=augment_pad_ids(plan)), cache)
    batch = collate([data[i] for i in (2, 0, 1)])
    keys = ("attention_mask", "augment_attention_mask", "anchor_ends", "augment_inputs")
    kwargs = {k: batch[k] for k in keys}
    cached = model(batch["input_ids"], augment_states=batch["augment_states"], **kwargs).logits
    live = model(batch["input_ids"], **kwargs).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(cached[real], live[real], atol=1e-5, rtol=0)


def test_cache_is_keyed_by_the_data(tmp_path):
    model = ComposedModel.from_models(
        tiny_model("llama", width=48), tiny_model("qwen2", seed=1), MappingSpec(every=2)
    )
    data = dataset()
    fingerprint = data_fingerprint(data, model, "causal", torch.float32)
    build_cache(model, data, tmp_path / "cache", fingerprint, torch.float32)
    assert AugmentStateCache.open(tmp_path / "cache", fingerprint) is not None
    other = data_fingerprint(dataset(seed=1), model, "causal", torch.float32)
    assert other != fingerprint
    assert AugmentStateCache.open(tmp_path / "cache", other) is None
    assert data_fingerprint(data, model, "causal", torch.bfloat16) != fingerprint


def test_training_with_cached_states_follows_the_same_curve(tmp_path_factory, tmp_path):
    ws = build_workspace(tmp_path_factory.mktemp("ws"))
    common = [
        "trainer.epochs=2",
        "trainer.max_steps=null",
        "trainer.save_every=null",
        "trainer.eval_every=null",
        "trainer.log_every=1",
    ]
    assert run_train(base_args(ws, tmp_path, "live") + common) == 0
    assert run_train(base_args(ws, tmp_path, "cached") + common + ["trainer.cache_augment_states=true"]) == 0
    assert (tmp_path / "cached" / "augment_cache" / "manifest.json").is_file()

    def losses(run):
        return [
            float(line.rsplit(" ", 1)[-1])
            for line in (tmp_path / run / "train.log").read_text().splitlines()
            if " loss " in line and "step " in line and "validation" not in line
        ]

    live, cached = losses("live"), losses("cached")
    assert len(live) == len(cached) > 100
    assert max(abs(a - b) for a, b in zip(live, cached)) < 1e-4
    live_w = trainable_weights(tmp_path / "live" / "composition" / "composition_model.safetensors")
    cached_w = trainable_weights(tmp_path / "cached" / "composition" / "composition_model.safetensors")
    assert max_abs_diff(live_w, cached_w) < 1e-4
