"""When is a token final? The settle rule of comm_cli.compose.alignment, checked against the prefix
tokenizations themselves for the four kinds of tokenizer."""

from __future__ import annotations

import random

import pytest

from comm_cli.compose.alignment import (
    TokenizerAlignmentError,
    TokenReader,
    anchor_ends_from_ids,
    check_settle_rule,
    same_tokenizer,
)
from tests import tokenizer_zoo as zoo

KINDS = (*zoo.KINDS, "gpt2_bpe", "sentencepiece_bpe")


def _texts(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    texts = [zoo.random_text(rng, rng.randint(5, 60)) for _ in range(n)]
    # cuts inside words, inside whitespace runs, inside contractions and digit groups
    return texts + [
        "hello world",
        "a   b  c",
        "a      b\n\n  c \n d",
        "it's they're we'll IT'S",
        "12345 678",
        "wor world worlds",
        "x'r",
        "x.5 y.z\t\tw",
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_tokens_declared_final_equal_every_prefix_tokenization(kind):
    reader = TokenReader(zoo.build(kind), kind)
    check_settle_rule(reader, _texts(60), max_cuts=1000)


@pytest.mark.parametrize("kind", KINDS)
def test_what_is_final_at_a_cut_does_not_depend_on_the_text_after_it(kind):
    """The tokens final at cut p of a text are the tokens final in the prefix alone, so the set
    (and hence the mask built on it) is a function of the prefix: generation sees the same."""
    reader = TokenReader(zoo.build(kind), kind)
    for text in _texts(40, seed=2):
        whole = reader.read([text])
        for cut in range(len(text) + 1):
            from_whole = [t for t, s in zip(whole.ids, whole.settled_at) if s <= cut]
            assert reader.settled_prefix([text[:cut]]).ids == from_whole, (kind, text, cut)


@pytest.mark.parametrize("kind", KINDS)
def test_most_tokens_are_final_once_the_text_goes_on(kind):
    reader = TokenReader(zoo.build(kind), kind)
    text = "the quick brown fox jumps over the lazy dog and the world"
    read = reader.read([text + " x"])
    inner = [s for s, e in zip(read.settled_at, read.ends) if e <= len(text) - 4]
    assert inner and all(s <= len(text) + 1 for s in inner)


def test_a_word_that_may_still_grow_is_not_final():
    reader = TokenReader(zoo.byte_bpe(), "byte_bpe")
    assert (
        reader.settled_prefix(["hello wor"]).ids == reader.read(["hello"]).ids
    )  # " wor" may become " world"
    grown = reader.settled_prefix(["hello world "])
    assert reader.read(["hello world"]).ids == grown.ids


def test_segments_are_final_at_their_end():
    """A prompt is complete before the completion starts: its last word is final at its end."""
    reader = TokenReader(zoo.byte_bpe(), "byte_bpe")
    read = reader.read(["hello wor", "ld"])
    prompt = [s for s, p in zip(read.settled_at, read.prompt_mask) if p]
    assert max(prompt) <= len("hello wor") and len(prompt) == len(reader.read(["hello wor"]).ids)
    assert read.ids[: len(prompt)] == reader.read(["hello wor"]).ids


def test_the_tokenizer_template_supplies_leading_special_tokens():
    assert TokenReader(zoo.char(), "char").prefix_ids == [zoo.char().bos_token_id]
    reader = TokenReader(zoo.wordpiece(), "wordpiece")
    assert reader.prefix_ids == [zoo.wordpiece().cls_token_id]
    assert reader.suffix_ids == [zoo.wordpiece().sep_token_id]
    assert TokenReader(zoo.byte_bpe(), "byte_bpe").prefix_ids == []


def test_partial_characters_end_where_the_character_starts():
    tokenizer = zoo.byte_bpe()
    reader = TokenReader(tokenizer, "byte_bpe")
    text = "a𝄞b"  # a 4-byte character the tokenizer never saw: several byte tokens
    read = reader.read([text], add_prefix=False)
    # the emoji is several byte tokens: all but the last end before it
    assert read.ends[-1] == 3 and read.ends[0] == 1
    assert sorted(read.ends) == read.ends and read.ends.count(1) >= 2
    ends, decoded = anchor_ends_from_ids(tokenizer, read.ids)
    assert decoded == text and ends == read.ends


def test_a_tokenizer_without_character_spans_or_rule_is_refused():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"a": 0, "b": 1, " ": 2, "b ": 3, "<unk>": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("b", " ")], unk_token="<unk>"))
    merging = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(TokenizerAlignmentError, match="no pre-tokenizer.*mask_mode=prompt"):
        TokenReader(merging, "augment 0 (/models/odd)")

    class Slow:
        pass

    with pytest.raises(TokenizerAlignmentError, match="not a fast tokenizer"):
        TokenReader(Slow(), "augment 0 (/models/slow)")


def test_each_kind_gets_its_rule():
    rules = {kind: TokenReader(zoo.build(kind), kind).rule for kind in KINDS}
    assert rules["char"] == "characters" and rules["sentencepiece_bpe"] == "word_boundary"
    assert {rules[k] for k in ("byte_bpe", "gpt2_bpe", "wordpiece", "unigram")} == {"pre_tokens"}


def test_the_path_is_decided_by_comparing_the_tokenizers():
    assert same_tokenizer(zoo.char(), zoo.char())
    assert not same_tokenizer(zoo.char(), zoo.byte_bpe())
    assert not same_tokenizer(zoo.byte_bpe(), zoo.gpt2_bpe())


@pytest.mark.parametrize("kind", KINDS)
def test_adversarial_whitespace_contractions_and_digits(kind):
    """Short texts built from the pieces pre-tokenizers argue about: whitespace runs ending in a
    newline or a word, contractions, digit groups, multi-byte characters."""
    rng = random.Random(7)
    pieces = list("ab'' \n\t1.,-x") + ["'re", "'ll", "'s", "  ", "\n\n", "é", "9", "\r\n", "123"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 16))) for _ in range(300)]
    reader = TokenReader(zoo.build(kind), kind)
    check_settle_rule(reader, texts, max_cuts=100)
    for text in texts:
        whole = reader.read([text])
        for cut in range(len(text) + 1):
            from_whole = [t for t, s in zip(whole.ids, whole.settled_at) if s <= cut]
            assert reader.settled_prefix([text[:cut]]).ids == from_whole, (text, cut)
