"""Text in, text out: ``model.encode`` and ``model.generate(prompts=...)`` for every pair (same or
different tokenizers, causal or prompt mode) give what comm's own data pipeline and generation
give; a forward that hands anchor ids to an augment that reads its own tokens stops in one line."""

from __future__ import annotations

import datasets
import pytest
import torch

from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
from comm_cli.compose.encoding import CompletionCollator, augment_pad_ids
from comm_cli.data.loading import DataConfig
from comm_cli.data.tokenize import tokenize_split
from comm_cli.errors import ConfigError, TokenizerMismatchError
from tests import tokenizer_zoo as zoo
from tests.conftest import tiny_model

PROMPTS = ["the quick brown fox", "hello world, 123 + 456 =", "it's we're"]
COMPLETIONS = [" jumps over", " 579.", " they'll go"]


def composition(anchor_kind="byte_bpe", augment_kind="gpt2_bpe", mask_mode="causal", seed=0):
    """A Llama anchor and a Qwen2 augment with the given tokenizers and random non-zero bridges."""
    anchor_tok, augment_tok = zoo.build(anchor_kind), zoo.build(augment_kind)
    anchor = tiny_model("llama", seed=seed, width=48, layers=4, vocab=len(anchor_tok))
    augment = tiny_model("qwen2", seed=seed + 1, width=32, layers=3, vocab=len(augment_tok))
    model = ComposedModel.from_models(
        anchor,
        augment,
        MappingSpec(every=1),
        BridgeConfig(num_heads=4, zero_init_output=False),
        mask_mode=mask_mode,
    )
    model.use_tokenizers(anchor_tok, [augment_tok])
    return model.eval()


def pipeline_batch(model, prompts, completions):
    """The batch comm-train builds for these rows (tokenize_split with the read plan, then the
    collator)."""
    rows = datasets.Dataset.from_list([{"prompt": p, "completion": c} for p, c in zip(prompts, completions)])
    plan = model.read_plan()
    tokenized, _ = tokenize_split(rows, model.anchor_tokenizer, DataConfig(max_length=256), plan=plan)
    collate = CompletionCollator(model.anchor_tokenizer.pad_token_id, augment_pad_ids=augment_pad_ids(plan))
    return collate(list(tokenized))


@pytest.mark.parametrize("mask_mode", ["causal", "prompt"])
@pytest.mark.parametrize("augment_kind", ["byte_bpe", "gpt2_bpe", "unigram"])
def test_encode_builds_what_training_builds(augment_kind, mask_mode):
    model = composition(augment_kind=augment_kind, mask_mode=mask_mode)
    ours = model.encode(PROMPTS, COMPLETIONS)
    theirs = pipeline_batch(model, PROMPTS, COMPLETIONS)
    assert set(ours) == set(theirs)
    for key in ("input_ids", "attention_mask", "labels", "augment_attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():
        assert torch.equal(model(**ours).loss, model(**theirs).loss)
        assert model(**ours).loss.isfinite()


def test_encode_scores_plain_texts_and_pads_either_side():
    model = composition()
    right, left = model.encode(PROMPTS), model.encode(PROMPTS, padding_side="left")
    assert torch.equal(
        right["labels"][right["attention_mask"].bool()], right["input_ids"][right["attention_mask"].bool()]
    )
    with torch.no_grad():
        a, b = model(**right).logits, model(**left).logits
    for row in range(len(PROMPTS)):
        torch.testing.assert_close(
            a[row][right["attention_mask"][row].bool()],
            b[row][left["attention_mask"][row].bool()],
            atol=1e-5,
            rtol=0,
        )


@pytest.mark.parametrize("augment_kind", ["byte_bpe", "gpt2_bpe"])
def test_generate_from_text_equals_generate_from_ids(augment_kind):
    model = composition(augment_kind=augment_kind)
    texts = model.generate(prompts=PROMPTS, max_new_tokens=6)
    assert isinstance(texts, list) and len(texts) == len(PROMPTS) and all(isinstance(t, str) for t in texts)
    tokenizer = model.anchor_tokenizer
    for prompt, text in zip(PROMPTS, texts):
        ids = torch.tensor(
            [[tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]]
        )
        out = model.generate(ids, max_new_tokens=6, prompts=[prompt], eos_token_id=tokenizer.eos_token_id)
        new = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        assert tokenizer.decode(new, skip_special_tokens=True) == text
    full = model.generate(prompts=PROMPTS[0], max_new_tokens=6, return_dict=True)
    assert full.texts == texts[:1]


def test_anchor_ids_never_reach_an_augment_that_reads_its_own_tokens():
    """The old README snippet `model(input_ids, attention_mask, labels=...)` on a pair with different
    tokenizers, in both roles: it must stop with one line naming model.encode, never train on
    the wrong tokens."""
    for anchor_kind, augment_kind in (("byte_bpe", "gpt2_bpe"), ("gpt2_bpe", "byte_bpe")):
        model = composition(anchor_kind, augment_kind)
        ids = model.anchor_tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
        with pytest.raises(TokenizerMismatchError, match=r"model\.encode"):
            model(ids, labels=ids)
        with pytest.raises(TokenizerMismatchError, match=r"generate\(prompts="):
            model.generate(ids, max_new_tokens=2)
        assert model(**model.encode(PROMPTS[0])).loss.isfinite()


def test_ids_past_the_augments_vocabulary_name_the_fix():
    """Without tokenizers attached comm cannot know the augment reads another tokenizer, but an id
    the augment has no embedding for gives one line, not an IndexError deep inside its model."""
    anchor = tiny_model("llama", width=48, layers=2, vocab=200)
    augment = tiny_model("gpt2", seed=1, width=32, layers=2, vocab=64)
    model = ComposedModel.from_models(anchor, augment, MappingSpec(every=1), BridgeConfig(num_heads=4))
    with pytest.raises(TokenizerMismatchError, match="past its vocabulary of 64"):
        model(torch.tensor([[1, 150, 3]]))
    with pytest.raises(ConfigError, match="no tokenizers attached"):
        model.encode("hello")


def test_a_loaded_composition_brings_its_tokenizers(tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizers = {"anchor": zoo.build("byte_bpe"), "augment": zoo.build("gpt2_bpe")}
    shapes = {"anchor": ("llama", 0, 48, 4), "augment": ("qwen2", 1, 32, 3)}
    for name, (family, seed, width, layers) in shapes.items():
        tiny_model(
            family, seed=seed, width=width, layers=layers, vocab=len(tokenizers[name])
        ).save_pretrained(tmp_path / name)
        tokenizers[name].save_pretrained(tmp_path / name)
    bases = [AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in shapes]
    model = ComposedModel.from_models(
        *bases, MappingSpec(every=1), BridgeConfig(num_heads=4, zero_init_output=False)
    )
    model.use_tokenizers(tokenizers["anchor"], [tokenizers["augment"]])
    model.save_pretrained(tmp_path / "composition")
    loaded = ComposedModel.from_pretrained(tmp_path / "composition")
    assert loaded.aligned and loaded.anchor_tokenizer is not None
    assert loaded.generate(prompts=PROMPTS, max_new_tokens=4) == model.generate(
        prompts=PROMPTS, max_new_tokens=4
    )
