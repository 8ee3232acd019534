"""A BPE tokenizer for the key-value anchor: the cross-tokenizer variant of the experiment.

The anchor of ``experiment=kv_arithmetic_cross_tokenizer`` reads text through a BPE tokenizer
trained on its own pretraining text (random prefixes and arithmetic), while the augment keeps
the character tokenizer. Letter runs are merged into multi-character pieces (so a key such as
``abc`` is one or two anchor tokens, never three characters as the augment sees it); digits and
the characters ``+-=; `` stay single tokens, so the anchor still writes a result digit by digit.
Same special tokens and template as the character tokenizer (<bos> prepended, Fuse decoder).
"""

from __future__ import annotations

import random

from comm_cli.data.char_tokenizer import CHARACTERS, SPECIAL_TOKENS, UNK, char_vocab, wrap_backend
from comm_cli.experiments.kv_arithmetic import tasks as kv

# Letter runs are pre-tokens (BPE merges letters within them); every other character is its own.
LETTER_RUNS = r"[a-z]+|[^a-z]"


def anchor_texts(seed: int, n: int, settings) -> list[str]:
    """Text from the anchor's pretraining distribution: a random prefix, then arithmetic."""
    rng = random.Random(seed)
    s = settings.anchor
    texts = []
    for _ in range(n):
        example = kv.arithmetic_example(rng, settings.min_operands, settings.max_operands)
        prefix = kv.random_prefix(rng, 1, s.max_prefix_length, s.shaped_prefix_fraction)
        texts.append(prefix + example["prompt"] + example["completion"])
    return texts


def build_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A ``PreTrainedTokenizerFast`` BPE over ``texts``: the characters' ids first (as in the
    character tokenizer), then merges of letters up to ``vocab_size`` tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(LETTER_RUNS), behavior="isolated")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(CHARACTERS),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    assert all(backend.token_to_id(t) == i for t, i in char_vocab().items() if t in SPECIAL_TOKENS)
    return wrap_backend(backend)
