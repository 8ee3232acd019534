"""Text and a tokenizer for the aligned case, built in-process (nothing downloaded): random text
over the character tokenizer's alphabet and a byte-level BPE with Llama 3's split trained on it."""

from __future__ import annotations

import itertools
import random
import string

# Llama 3 / Qwen2's pre-tokenizer split (contractions, letter runs, 1-3 digit groups, lookaheads).
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


class BenchText:
    """Random text over the character tokenizer's alphabet (a-z, digits, ``+-=;``, space,
    newline): words of a random lexicon drawn with Zipf frequencies, some numbers, operators and
    newlines, so that a byte-level BPE trained on it merges letters into multi-character tokens."""

    def __init__(self, size: int, seed: int = 0):
        self.rng = random.Random(seed)
        letters = string.ascii_lowercase
        self.words = ["".join(self.rng.choices(letters, k=self.rng.randint(1, 8))) for _ in range(size)]
        self.cumulative = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(size)))

    def text(self, chars: int) -> str:
        pieces, length = [], 0
        while length < chars:
            draw = self.rng.random()
            if draw < 0.05:
                piece = str(self.rng.randint(0, 9999))
            elif draw < 0.08:
                piece = self.rng.choice("+-=;")
            else:
                piece = self.rng.choices(self.words, cum_weights=self.cumulative)[0]
            piece += "\n" if self.rng.random() < 0.03 else " "
            pieces.append(piece)
            length += len(piece)
        return "".join(pieces)

    def corpus(self) -> list[str]:
        """Every lexicon word once, then running text: what the bench's tokenizer is trained on."""
        rows = [" ".join(self.words[i : i + 100]) for i in range(0, len(self.words), 100)]
        return rows + [self.text(2000) for _ in range(50)]


def bench_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE with Llama 3's split regex trained on ``corpus`` (built in-process,
    nothing downloaded), ``<s>`` prepended by its template; ``<pad>``, ``<s>``, ``</s>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )


def cut_to_tokens(tokenizer, text: str, count: int) -> str:
    """The start of ``text`` that holds its first ``count`` tokens."""
    if count <= 0:
        return ""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) < count:
        raise ValueError(f"text of {len(offsets)} tokens, {count} needed")
    return text[: offsets[count - 1][1]]
