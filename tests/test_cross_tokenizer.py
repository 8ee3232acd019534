"""Compositions whose anchor and augmenting models tokenize differently (and encoder augments).

The promise: anchor token i's output depends on no character after the end of its own text;
cached generation equals an uncached forward over the final text; padding changes nothing;
bridges off is the anchor; a save round-trips; a same-tokenizer pair keeps its old logits.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
from comm_cli.compose.alignment import TokenReader
from comm_cli.compose.bridge_inputs import BridgeInputs
from comm_cli.compose.encoding import pad_reads
from comm_cli.errors import ConfigError
from tests import tokenizer_zoo as zoo
from tests.conftest import tiny_model

AUGMENT_KINDS = ("unigram", "wordpiece", "gpt2_bpe", "sentencepiece_bpe", "char")
DATA = Path(__file__).parent / "data"


def build(anchor_kind="byte_bpe", augment_kinds=("unigram",), mask_mode="causal", seed=0, positions="chars"):
    anchor_tok = zoo.build(anchor_kind)
    anchor = tiny_model("llama", seed=seed, width=48, layers=4, vocab=len(anchor_tok))
    augment_toks = [zoo.build(kind) for kind in augment_kinds]
    augments = [
        tiny_model("qwen2", seed=seed + 1 + i, width=32, layers=3, vocab=len(tok))
        for i, tok in enumerate(augment_toks)
    ]
    model = ComposedModel.from_models(
        anchor,
        augments,
        MappingSpec(every=1),
        BridgeConfig(num_heads=4, zero_init_output=False, aligned_positions=positions),
        mask_mode=mask_mode,
    )
    model.use_tokenizers(anchor_tok, augment_toks)
    return model


def batch(model, prompts, completions=None, side="right"):
    """Anchor ids/mask/ends and augment inputs for texts, the way the data pipeline builds them:
    [bos] + prompt (+ completion) for the anchor, each augment reading the same text itself."""
    anchor_tok = model.anchor_tokenizer
    rows, ends = [], []
    for i, prompt in enumerate(prompts):
        segments = [prompt] + ([completions[i]] if completions else [])
        read = model.anchor_reader.read(segments, add_prefix=False, complete=True)
        rows.append([anchor_tok.bos_token_id] + read.ids)
        ends.append([0] + read.ends)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), anchor_tok.pad_token_id)
    mask = torch.zeros_like(ids)
    end = torch.zeros_like(ids)
    for i, (row, e) in enumerate(zip(rows, ends)):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span], end[i, span] = torch.tensor(row), 1, torch.tensor(e)
    inputs = []
    for reader in model.augment_readers:
        if reader is None:
            inputs.append(None)
            continue
        if model.mask_mode == "prompt":
            reads = [reader.read([p], add_suffix=True, complete=True) for p in prompts]
        else:
            reads = [
                reader.read([p] + ([completions[i]] if completions else [])) for i, p in enumerate(prompts)
            ]
        inputs.append(pad_reads(reads, reader.tokenizer.pad_token_id or 0, left=side == "left"))
    return {"input_ids": ids, "attention_mask": mask, "anchor_ends": end, "augment_inputs": inputs}


def logits_of(model, b):
    with torch.no_grad():
        return model(**b).logits


@pytest.mark.parametrize("augment_kind", AUGMENT_KINDS)
def test_no_character_after_an_anchor_token_reaches_its_logits(augment_kind):
    model = build(augment_kinds=(augment_kind,))
    rng = random.Random(5)
    checked = 0
    for _ in range(25):
        text = zoo.random_text(rng, rng.randint(12, 40))
        base = batch(model, [text])
        n = int(base["attention_mask"].sum())
        ends = base["anchor_ends"][0, :n].tolist()
        reference = logits_of(model, base)
        for _ in range(4):
            i = rng.randrange(1, n)
            cut = ends[i]
            changed = text[:cut] + zoo.random_text(rng, rng.randint(1, 12))
            other = batch(model, [changed])
            m = int(other["attention_mask"].sum())
            same_prefix = m > i and torch.equal(other["input_ids"][0, : i + 1], base["input_ids"][0, : i + 1])
            same_prefix = same_prefix and other["anchor_ends"][0, : i + 1].tolist() == ends[: i + 1]
            if not same_prefix:
                continue  # the anchor's own tokenization of text[:cut] changed: not the composition's doing
            torch.testing.assert_close(
                logits_of(model, other)[0, : i + 1], reference[0, : i + 1], atol=1e-5, rtol=0
            )
            checked += 1
    assert checked >= 30


def test_the_augment_does_reach_the_anchor():
    """The mask is not trivially empty: text before an anchor token changes its logits through
    the bridges (the anchor alone cannot see the difference when its own tokens are the same)."""
    model = build(augment_kinds=("char",))
    text = "abc abd the quick brown fox jumps"
    a, b = batch(model, [text]), batch(model, [text])
    b["augment_inputs"][0]["input_ids"][0, 2] += 1  # another character at augment position 2
    assert not torch.allclose(logits_of(model, a)[0, -1], logits_of(model, b)[0, -1])
    with model.bridges_disabled():
        torch.testing.assert_close(logits_of(model, a), logits_of(model, b))


@pytest.mark.parametrize("mask_mode", ["causal", "prompt"])
@pytest.mark.parametrize("positions", ["chars", "anchor_tokens"])
def test_left_and_right_padding_give_the_unpadded_logits(mask_mode, positions):
    model = build(augment_kinds=("unigram", "char"), mask_mode=mask_mode, positions=positions)
    prompts, completions = ["the quick brown", "a b"], [" fox jumps", " c d e f g"]
    alone = [logits_of(model, batch(model, [p], [c])) for p, c in zip(prompts, completions)]
    for side in ("left", "right"):
        b = batch(model, prompts, completions, side=side)
        logits = logits_of(model, b)
        for row, single in enumerate(alone):
            real = b["attention_mask"][row].bool()
            torch.testing.assert_close(logits[row][real], single[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mask_mode", ["causal", "prompt"])
@pytest.mark.parametrize("augment_kinds", [("unigram",), ("gpt2_bpe", "char")])
def test_cached_generation_equals_an_uncached_forward_over_the_final_text(mask_mode, augment_kinds):
    model = build(augment_kinds=augment_kinds, mask_mode=mask_mode)
    prompts = ["hello world, it's", "x"]
    b = batch(model, prompts, side="left")
    kwargs = dict(max_new_tokens=10, eos_token_id=None, return_dict=True, output_scores=True, prompts=prompts)
    cached = model.generate(b["input_ids"], b["attention_mask"], **kwargs)
    uncached = model.generate(b["input_ids"], b["attention_mask"], use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, c in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=0)


@pytest.mark.parametrize("anchor_kind", ["sentencepiece_bpe", "char"])
def test_other_anchor_tokenizers_generate_as_they_score(anchor_kind):
    """A Llama-2-style anchor tokenizer (Prepend/Replace normaliser, byte fallback) and the
    character tokenizer: cached generation equals the uncached forward."""
    model = build(anchor_kind=anchor_kind, augment_kinds=("byte_bpe",))
    prompts = ["hello world", "abc"]
    b = batch(model, prompts, side="left")
    kwargs = dict(max_new_tokens=8, eos_token_id=None, return_dict=True, output_scores=True, prompts=prompts)
    cached = model.generate(b["input_ids"], b["attention_mask"], **kwargs)
    uncached = model.generate(b["input_ids"], b["attention_mask"], use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, c in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=0)


def test_generation_feeds_an_augment_token_only_once_it_is_final(monkeypatch):
    model = build(augment_kinds=("unigram",))
    reader = model.augment_readers[0]
    prompts = ["the quick"]
    b = batch(model, prompts, side="left")
    seen = []
    original = BridgeInputs.aligned

    def spy(self, k, inputs, *args):
        seen.append(inputs["input_ids"].shape[1])
        return original(self, k, inputs, *args)

    monkeypatch.setattr(BridgeInputs, "aligned", spy)
    out = model.generate(
        b["input_ids"], b["attention_mask"], max_new_tokens=8, eos_token_id=None, prompts=prompts
    )
    text = model.anchor_tokenizer.decode(out[0, b["input_ids"].shape[1] :].tolist())
    # every token fed was final at the time: the total equals the settled tokens of the final text
    final = reader.settled_prefix([prompts[0], text.rstrip("\ufffd")])
    assert sum(seen) == len(final.ids)


def test_bridges_off_is_the_anchor_bit_for_bit():
    model = build(augment_kinds=("unigram", "wordpiece"))
    b = batch(model, ["the quick brown fox"], [" jumps"])
    with model.bridges_disabled():
        composed = logits_of(model, b)
    with torch.no_grad():
        alone = model.anchor(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(composed, alone)


def test_save_and_load_round_trip_keeps_tokenizers_and_logits(tmp_path):
    anchor_tok, augment_tok = zoo.byte_bpe(), zoo.unigram()
    anchor_dir, augment_dir = tmp_path / "anchor", tmp_path / "augment"
    tiny_model("llama", width=48, layers=4, vocab=len(anchor_tok)).save_pretrained(anchor_dir)
    anchor_tok.save_pretrained(anchor_dir)
    tiny_model("qwen2", seed=1, width=32, layers=3, vocab=len(augment_tok)).save_pretrained(augment_dir)
    augment_tok.save_pretrained(augment_dir)
    from comm_cli.compose import CompositionConfig
    from comm_cli.compose.specs import AugmentSpec, ModelSpec

    config = CompositionConfig(
        anchor=ModelSpec(str(anchor_dir)),
        augments=[AugmentSpec(model=ModelSpec(str(augment_dir)), mapping=MappingSpec(every=1))],
        bridge=BridgeConfig(num_heads=4, zero_init_output=False),
    )
    model = ComposedModel.from_config(config)
    model.attach_saved_tokenizers()
    assert model.config.augments[0].tokens == "aligned"
    b = batch(model, ["the quick brown fox"], [" jumps"])
    before = logits_of(model, b)
    model.save_pretrained(tmp_path / "saved")
    loaded = ComposedModel.from_pretrained(tmp_path / "saved")
    assert loaded.config.augments[0].tokens == "aligned" and loaded.augment_readers[0] is not None
    assert loaded.config.augments[0].model.tokenizer == str(augment_dir)
    torch.testing.assert_close(logits_of(loaded, b), before, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["causal", "prompt"])
def test_a_same_tokenizer_pair_keeps_the_logits_it_had_before_alignment_existed(mode):
    """Reference logits computed with comm before cross-tokenizer support (tests/data)."""
    reference = load_file(DATA / "shared_path_reference.safetensors")
    anchor = tiny_model("llama", width=48, layers=4)
    augment = tiny_model("gpt_neox", seed=1, width=32, layers=3)
    model = ComposedModel.from_models(
        anchor,
        augment,
        MappingSpec(every=1),
        BridgeConfig(num_heads=4, zero_init_output=False),
        mask_mode=mode,
    )
    prompt = reference["prompt_mask"] if mode == "prompt" else None
    with torch.no_grad():
        logits = model(
            reference["input_ids"], reference["attention_mask"], augment_attention_mask=prompt
        ).logits
    torch.testing.assert_close(logits, reference[f"{mode}_logits"], atol=1e-5, rtol=0)


def test_the_same_tokenizer_takes_the_shared_path():
    tok = zoo.char()
    anchor = tiny_model("llama", width=48, layers=2, vocab=len(tok))
    augment = tiny_model("qwen2", seed=1, width=32, layers=2, vocab=len(tok))
    model = ComposedModel.from_models(anchor, augment, MappingSpec(every=1), BridgeConfig(num_heads=4))
    model.use_tokenizers(tok, [zoo.char()])
    assert model.augment_readers == [None] and model.anchor_reader is None
    assert model.config.augments[0].tokens == "shared"


def _encoder(kind: str, vocab: int, seed: int = 3):
    """A tiny masked-LM encoder: "bert" (post-LN, absolute positions) or "modernbert" (pre-LN with
    rotary positions, the key-value experiment's encoder augment)."""
    import transformers as tf

    torch.manual_seed(seed)
    shape = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    if kind == "bert":
        return tf.BertForMaskedLM(tf.BertConfig(**shape)).eval()
    specials = dict(
        pad_token_id=0, bos_token_id=None, eos_token_id=None, cls_token_id=None, sep_token_id=None
    )
    return tf.ModernBertForMaskedLM(tf.ModernBertConfig(**shape, **specials)).eval()


def _bert(vocab: int, seed: int = 3):
    return _encoder("bert", vocab, seed)


@pytest.mark.parametrize("kind", ["bert", "modernbert"])
def test_an_encoder_augment_trains_and_generates_in_prompt_mode(kind):
    anchor_tok, bert_tok = zoo.byte_bpe(), zoo.wordpiece()
    anchor = tiny_model("llama", width=48, layers=4, vocab=len(anchor_tok))
    model = ComposedModel.from_models(
        anchor,
        _encoder(kind, len(bert_tok)),
        MappingSpec(every=1),
        BridgeConfig(num_heads=4),
        mask_mode="prompt",
    )
    model.use_tokenizers(anchor_tok, [bert_tok])
    assert model.augment_readers[0].prefix_ids == [bert_tok.cls_token_id]
    b = batch(model, ["the quick brown", "hello"], [" fox", " world"])
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    model.train()
    loss = model(**b, labels=labels).loss
    loss.backward()
    assert all(p.grad is not None for p in model.bridge_parameters())
    assert all(p.grad is None for p in model.anchor.parameters()) and all(
        p.grad is None for p in model.augments.parameters()
    )
    model.eval()
    prompts = ["the quick brown", "hello"]
    with torch.no_grad():  # bridges that write something, so the encoder's states show in the logits
        for p in model.bridge_parameters():
            p.normal_(0.0, 0.2)
        # The short prompt's logits on its real tokens: the same alone, left- and right-padded.
        alone = model(**batch(model, prompts[1:])).logits[0]
        right = model(**batch(model, prompts)).logits[1, : alone.shape[0]]
        left = model(**batch(model, prompts, side="left")).logits[1, -alone.shape[0] :]
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    p = batch(model, prompts, side="left")
    kwargs = dict(max_new_tokens=5, eos_token_id=None, return_dict=True, output_scores=True, prompts=prompts)
    cached = model.generate(p["input_ids"], p["attention_mask"], **kwargs)
    uncached = model.generate(p["input_ids"], p["attention_mask"], use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)


def test_an_encoder_in_causal_mode_is_refused_before_weights_load(tmp_path):
    from comm_cli.compose import CompositionConfig, check_config
    from comm_cli.compose.specs import AugmentSpec, ModelSpec

    bert_dir = tmp_path / "bert"
    _bert(100).config.save_pretrained(bert_dir)  # a config alone: no weights to load
    anchor_dir = tmp_path / "anchor"
    tiny_model("llama", width=48, layers=4).config.save_pretrained(anchor_dir)
    config = CompositionConfig(
        anchor=ModelSpec(str(anchor_dir)),
        augments=[AugmentSpec(model=ModelSpec(str(bert_dir)), mapping=MappingSpec(every=1))],
        bridge=BridgeConfig(num_heads=4),
        mask_mode="causal",
    )
    with pytest.raises(ConfigError, match="bidirectional encoder.*mask_mode=prompt"):
        check_config(config)
    with pytest.raises(ConfigError, match="bidirectional encoder"):
        ComposedModel.from_models(tiny_model("llama", width=48, layers=4), _bert(100), MappingSpec(every=1))


def test_a_tokenizer_reader_for_each_augment_is_reused():
    model = build(augment_kinds=("unigram", "char"))
    assert [type(r) for r in model.augment_readers] == [TokenReader, TokenReader]
    assert [s.tokens for s in model.config.augments] == ["aligned", "aligned"]
