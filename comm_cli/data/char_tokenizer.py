"""The character-level tokenizer shared by the key-value specialists.

CALM joins an anchor and an augmenting model that read the same tokens, so both specialists
are saved with this one tokenizer. One token per character keeps every digit and key letter
its own position, which the task needs: the augment's state on a key's last character carries
that key's value, and the anchor emits a result digit by digit.

It is a real ``tokenizers`` pipeline (a BPE model with no merges, so each character is a token,
and a ``Fuse`` decoder, so decoding concatenates without inserting spaces), wrapped in
``transformers.PreTrainedTokenizerFast`` so that ``save_pretrained`` / ``AutoTokenizer`` work.
Encoding prepends ``<bos>``; ``<eos>`` is left to whoever builds training sequences.
"""

from __future__ import annotations

import string

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = SPECIAL_TOKENS
# Fixed order, so the ids are the same in every build: specials 0-3, then the characters.
CHARACTERS = string.ascii_lowercase + string.digits + "+-=; \n"


def char_vocab() -> dict[str, int]:
    """Token -> id: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then ``a``-``z``, ``0``-``9``,
    ``+ - = ;``, space, newline."""
    return {token: i for i, token in enumerate([*SPECIAL_TOKENS, *CHARACTERS])}


def build_char_tokenizer():
    """A fresh ``PreTrainedTokenizerFast``; the same ids every call.

    ``decode(encode(s), skip_special_tokens=True) == s`` for any string over ``CHARACTERS``
    (spaces included: ``clean_up_tokenization_spaces`` is off). Other characters become ``<unk>``.
    """
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.BPE(vocab=char_vocab(), merges=[], unk_token=UNK))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return wrap_backend(backend)


def wrap_backend(backend):
    """A ``tokenizers`` backend over this vocabulary's special tokens, made the tokenizer comm's
    synthetic experiments use: pieces joined as they are when decoding, ``<bos>`` before every
    text, right padding, spaces kept."""
    from tokenizers import decoders, processors
    from transformers import PreTrainedTokenizerFast

    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
