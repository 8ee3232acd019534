"""Reading one text through two tokenizers: which augment token each anchor token may see.

When the anchor and an augmenting model tokenize text differently, their token sequences no
longer line up by index. comm lines them up through characters. For every token it knows

- ``end``: where the token's text ends in the text (a token that stops inside a character, such
  as the first bytes of a multi-byte character in byte-level BPE, ends where that character
  starts: it holds no whole character beyond);
- ``settled_at`` (augment tokens): the length of text from which the token is *final*, i.e.
  every longer text tokenizes to the same tokens up to and including this one. Only then are
  its identity and its hidden state (which depends on the tokens before it) settled.

Causal mode allows anchor token i to read augment token j exactly when
``settled_at[j] <= end[i]``. Both numbers depend only on text up to those positions, so the
output of anchor token i depends on no character after the end of its own text: nothing leaks
from the future, in training or at generation time.

When is a token final? A fast tokenizer first splits the (normalised) text into pre-tokens and
then tokenizes each pre-token alone (BPE, WordPiece and Unigram all work inside one
pre-token). So a token is final once its pre-token is, and a pre-token ``[a, b)`` is final once
the text reaches ``max(b + 1, a + SETTLE_MARGIN)``:

- ``b + 1``: the character after the pre-token exists and did not join it; the pre-tokenizers
  in use (byte-level and Llama-3-style regexes, Metaspace, BERT's, whitespace, digits) decide a
  split by that character. A pre-token of whitespace is the exception: how a run of whitespace
  splits depends on what ends it (``\\s+(?!\\S)`` gives its last space to the word after it,
  ``\\s*[\\r\\n]+`` takes spaces up to a later newline), so for it ``b`` is where the next
  non-whitespace character stands;
- ``a + SETTLE_MARGIN``: regex alternatives with fixed text (the contractions ``'re``, ``'ve``,
  ``'ll``) can still claim the characters at ``a`` until three characters after ``a`` are known
  (``"'r"`` is two pre-tokens, ``"'re"`` one).

Tokenizers without a pre-tokenizer get one of two rules they justify themselves: a model that
never merges characters (BPE without merges, as the key-value experiment's character tokenizer)
makes every character a token that is final once it exists; a SentencePiece-style BPE (spaces
normalised to ``▁``) whose vocabulary has no token with a ``▁`` after another character cannot
merge across a space, so each space-led word is final once the next space arrives. Anything else
is refused with a message naming the tokenizer. ``check_settle_rule`` verifies a rule against
the prefix tokenizations themselves; training runs it on a sample of its data at start-up.

Texts come in segments (prompt, completion). Each segment is tokenized on its own (as comm's
data pipeline does for the anchor, so the boundary is exact), and every token of a segment is
final once the segment ends: a prompt is complete before anything is generated after it.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from comm_cli.errors import TokenizerMismatchError

logger = logging.getLogger(__name__)

# Characters after a pre-token's start that decide which regex alternative matched it.
SETTLE_MARGIN = 3
_BOUNDARY_MARKERS = ("▁", " ")
# Text that exercises letters, digits, punctuation and spaces when comparing tokenizers.
PROBE_TEXTS = (
    "Hello world, 123 + 456 = 579.",
    "def f(x):\n    return x * 2",
    "abc+xyz-def=4+7-3=8",
    "  two  spaces\tand a tab; don't stop",
)


class TokenizerAlignmentError(TokenizerMismatchError):
    """A tokenizer cannot be aligned to another through characters."""


@dataclass
class TokenizedText:
    """One text as one tokenizer reads it: token ids, each token's end in characters, the text
    length from which each token is final, and which tokens belong to the prompt (every segment
    but the last)."""

    ids: list[int]
    ends: list[int]
    settled_at: list[int]
    prompt_mask: list[int]
    text_length: int = 0

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class _Segment:
    ids: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    settled_at: list[int] = field(default_factory=list)


def _backend(tokenizer, name: str):
    """A copy of the fast tokenizer's backend without its post-processor, whose offsets are the
    raw character spans (GPT-2's ``trim_offsets`` would move them off the text)."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerAlignmentError(
            f"the tokenizer of {name} ({type(tokenizer).__name__}) is not a fast tokenizer, so it gives no "
            "character spans: use a model whose tokenizer.json loads as a fast tokenizer, or a shared tokenizer"
        )
    raw = Tokenizer.from_str(backend.to_str())
    raw.post_processor = None
    return raw


def _model_merges(backend_json: dict) -> list | None:
    model = backend_json.get("model") or {}
    return model.get("merges") if model.get("type") == "BPE" else None


def _no_merge_across_boundary(vocab: Sequence[str]) -> bool:
    """True when no vocabulary entry has a boundary marker after another character (so BPE
    cannot merge a word with the space that follows it)."""
    for token in vocab:
        stripped = token.lstrip("".join(_BOUNDARY_MARKERS))
        if any(marker in stripped for marker in _BOUNDARY_MARKERS):
            return False
    return True


class TokenReader:
    """One tokenizer's reading of segmented texts: ids, character ends and settle points."""

    def __init__(self, tokenizer, name: str = "model", settle: bool = True):
        """``settle=False``: only ids and ends are needed (the anchor's reader), no settle rule."""
        self.tokenizer = tokenizer
        self.name = name
        self._raw = _backend(tokenizer, name)
        backend_json = json.loads(self._raw.to_str())
        self._normalizer = self._raw.normalizer
        self._pre_tokenizer = self._raw.pre_tokenizer
        if not settle:
            self.rule = "none"
        elif self._pre_tokenizer is not None:
            self.rule = "pre_tokens"
        elif _model_merges(backend_json) == []:
            self.rule = "characters"
        elif _model_merges(backend_json) is not None and _no_merge_across_boundary(tokenizer.get_vocab()):
            self.rule = "word_boundary"
        else:
            raise TokenizerAlignmentError(
                f"the tokenizer of {name} has no pre-tokenizer and may merge across spaces, so comm cannot tell "
                "when a prefix's tokens are final: use mask_mode=prompt, or a tokenizer shared with the anchor"
            )
        prefix, suffix = self._special_tokens()
        self.prefix_ids, self.suffix_ids = prefix, suffix

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer's own template puts before and after a text (e.g. <s>; [CLS] .. [SEP])."""
        with_special = self.tokenizer("x", add_special_tokens=True)["input_ids"]
        plain = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        for start in range(len(with_special) - len(plain) + 1):
            if with_special[start : start + len(plain)] == plain:
                return list(with_special[:start]), list(with_special[start + len(plain) :])
        return [], []

    # ------------------------------------------------------------------ one segment

    def _pre_token_spans(self, text: str) -> list[tuple[int, int]]:
        from tokenizers import PreTokenizedString

        pre = PreTokenizedString(text)
        if self._normalizer is not None:
            normalizer = self._normalizer
            pre.normalize(lambda normalized: normalizer.normalize(normalized))
        self._pre_tokenizer.pre_tokenize(pre)
        return [
            offsets for _, offsets, _ in pre.get_splits(offset_referential="original", offset_type="char")
        ]

    def segment(self, text: str, final: bool) -> _Segment:
        """Tokenize one segment; ``final``: nothing follows it yet (its last pre-token may grow)."""
        if not text:
            return _Segment()
        encoding = self._raw.encode(text, add_special_tokens=False)
        starts = [s for s, _ in encoding.offsets]
        ends = [e for _, e in encoding.offsets]
        # A token that stops inside a character (a later token starts before its end) ends where
        # that character starts.
        for i in range(len(ends) - 2, -1, -1):
            ends[i] = min(ends[i], starts[i + 1]) if starts[i + 1] < ends[i] else ends[i]
        length = len(text)
        if self.rule in ("characters", "none"):
            settled = [max(e, 0) for e in ends]
        else:
            if self.rule == "pre_tokens":
                spans = self._pre_token_spans(text)
            else:
                spans = _word_boundary_spans(text)
            span_starts = [a for a, _ in spans]
            settled = []
            for start, end in encoding.offsets:
                index = max(0, bisect.bisect_right(span_starts, start) - 1)
                a, b = spans[index] if spans else (0, length)
                b = max(b, end)
                if text[a:b].isspace():
                    b = _next_non_space(text, b)
                settled.append(max(b + 1, a + SETTLE_MARGIN))
        if not final:
            settled = [min(s, length) for s in settled]
        return _Segment(ids=list(encoding.ids), ends=ends, settled_at=settled)

    # ------------------------------------------------------------------ whole texts

    def read(
        self,
        segments: Sequence[str],
        add_prefix: bool = True,
        add_suffix: bool = False,
        complete: bool = False,
    ) -> TokenizedText:
        """Tokenize ``segments`` one by one (offsets shifted to the joined text). The last
        segment's final pre-token is not settled unless ``complete``. The tokenizer's own
        leading special tokens (e.g. <s>) come first, settled at 0."""
        ids, ends, settled, prompt = [], [], [], []
        if add_prefix:
            ids += self.prefix_ids
            ends += [0] * len(self.prefix_ids)
            settled += [0] * len(self.prefix_ids)
            prompt += [1] * len(self.prefix_ids)
        offset = 0
        for index, text in enumerate(segments):
            last = index == len(segments) - 1
            part = self.segment(text, final=last and not complete)
            ids += part.ids
            ends += [offset + e for e in part.ends]
            settled += [offset + s for s in part.settled_at]
            prompt += [0 if last and len(segments) > 1 else 1] * len(part.ids)
            offset += len(text)
        if add_suffix:
            ids += self.suffix_ids
            ends += [offset] * len(self.suffix_ids)
            settled += [offset] * len(self.suffix_ids)
            prompt += [1] * len(self.suffix_ids)
        return TokenizedText(ids=ids, ends=ends, settled_at=settled, prompt_mask=prompt, text_length=offset)

    def settled_prefix(self, segments: Sequence[str]) -> TokenizedText:
        """The tokens of ``segments`` (prefix included) that are final with the text as it stands."""
        full = self.read(segments)
        keep = sum(1 for s in full.settled_at if s <= full.text_length)
        # settle points rise with the token index, so the final tokens are a prefix
        return TokenizedText(
            ids=full.ids[:keep],
            ends=full.ends[:keep],
            settled_at=full.settled_at[:keep],
            prompt_mask=full.prompt_mask[:keep],
            text_length=full.text_length,
        )


def _next_non_space(text: str, start: int) -> int:
    """Index of the first non-whitespace character at or after ``start`` (``len(text)`` if none)."""
    while start < len(text) and text[start].isspace():
        start += 1
    return start


def _word_boundary_spans(text: str) -> list[tuple[int, int]]:
    """Space-led words ``" *[^ ]+"`` (trailing spaces form the last span)."""
    spans, start, i, n = [], 0, 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] == " ":
            j += 1
        while j < n and text[j] != " ":
            j += 1
        spans.append((i, j))
        i = j
    return spans or [(start, n)]


def check_settle_rule(reader: TokenReader, texts: Sequence[str], max_cuts: int = 64) -> None:
    """At every cut point of every text (up to ``max_cuts`` per text), the tokens the rule
    declares final must equal the prefix's own tokenization at the same positions, and must
    be a prefix of the whole text's tokens. Raises TokenizerAlignmentError on the first
    counterexample, naming the tokenizer, the text and the cut."""
    for text in texts:
        whole = reader.read([text])
        n = len(text)
        step = max(1, n // max_cuts)
        for cut in range(0, n + 1, step):
            prefix = text[:cut]
            declared = reader.settled_prefix([prefix])
            own = reader.read([prefix], complete=True)
            k = len(declared.ids)
            if declared.ids != own.ids[:k] or declared.ids != whole.ids[:k]:
                raise TokenizerAlignmentError(
                    f"the tokenizer of {reader.name} re-tokenizes {prefix[-20:]!r} when text follows it "
                    f"({text[cut : cut + 10]!r}), against comm's rule for when tokens are final ({reader.rule}): "
                    "use mask_mode=prompt with this tokenizer and report it"
                )


def same_tokenizer(anchor_tokenizer, augment_tokenizer, texts: Sequence[str] = ()) -> bool:
    """Whether two tokenizers read text identically: the same vocabulary and the same ids for
    the probe texts and ``texts``. Such a pair shares one ``input_ids`` tensor (no alignment)."""
    if anchor_tokenizer is augment_tokenizer:
        return True
    if anchor_tokenizer.get_vocab() != augment_tokenizer.get_vocab():
        return False
    for text in list(PROBE_TEXTS) + [t for t in texts if isinstance(t, str)]:
        a = anchor_tokenizer(text, add_special_tokens=False)["input_ids"]
        b = augment_tokenizer(text, add_special_tokens=False)["input_ids"]
        if a != b:
            return False
    return True


class GeneratedText:
    """The text a row of anchor tokens spells as they are generated, and each token's end.

    After k tokens the text is ``decode(ids[:k])`` without an unfinished character at its end (a
    byte-level token may hold only part of one), offset by ``start`` (the prompt's length). The
    cached generation loop and the uncached reference both read ends from here, so they agree.
    """

    def __init__(self, tokenizer, start: int = 0):
        self.tokenizer, self.start = tokenizer, start
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> int:
        """Append a generated token; returns the character end of its text."""
        self.ids.append(int(token_id))
        decoded = self.tokenizer.decode(
            self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        stable = decoded.rstrip("\ufffd")
        if not stable.startswith(self.text):
            raise TokenizerAlignmentError(
                f"the anchor's tokenizer decodes {self.text[-20:]!r} and then {stable[-20:]!r}: its decoding rewrites "
                "text it already produced, so an augment with another tokenizer cannot follow it; use a shared "
                "tokenizer or mask_mode=prompt"
            )
        self.text = stable
        return self.start + len(self.text)


def anchor_ends_from_ids(tokenizer, ids: Sequence[int], offset: int = 0) -> tuple[list[int], str]:
    """Character ends of generated anchor tokens (``GeneratedText``) and the text they spell."""
    generated = GeneratedText(tokenizer, offset)
    ends = [generated.push(token) for token in ids]
    return ends, generated.text


def plan_alignment(
    anchor_tokenizer,
    augment_tokenizers: Sequence,
    names: Sequence[str],
    texts: Sequence[str] = (),
    requested=None,
) -> list[TokenReader | None]:
    """Decide how each augmenting model reads text: the anchor's token ids (None) when the two
    tokenizers read identically, else its own tokens lined up through characters (a
    TokenReader). ``requested`` ("auto" | "shared" | "aligned" per augment) can force a path.
    The decision is logged."""
    requested = list(requested or ["auto"] * len(augment_tokenizers))
    readers: list[TokenReader | None] = []
    for tokenizer, name, wanted in zip(augment_tokenizers, names, requested):
        shared = tokenizer is None or same_tokenizer(anchor_tokenizer, tokenizer, texts)
        if wanted == "shared" and not shared:
            raise TokenizerMismatchError(
                f"{name} is set to read the anchor's token ids (tokens=shared) but its tokenizer reads text "
                "differently: set its tokens=auto (or aligned) to line the two up through characters"
            )
        if wanted == "aligned" or (wanted == "auto" and not shared):
            reader = TokenReader(tokenizer, name)
            logger.info(
                "%s has its own tokenizer: it reads its own tokens, lined up with the anchor's through characters "
                "(tokens are final by the %s rule)",
                name,
                reader.rule,
            )
            readers.append(reader)
        else:
            logger.info("%s shares the anchor's tokenizer: it reads the anchor's token ids", name)
            readers.append(None)
    return readers


def pad_reads(reads: Sequence[TokenizedText], pad_id: int, left: bool = False) -> dict:
    """Pad one augmenting model's reads of a batch of texts into ``augment_inputs[k]`` tensors
    (``input_ids``, ``attention_mask``, ``settled_at``, ``ends``). Padding is never attended;
    its ``settled_at`` is past any text so it could not be read even if it were."""
    import torch

    length = max((len(r) for r in reads), default=0)
    out = {
        "input_ids": torch.full((len(reads), length), int(pad_id), dtype=torch.long),
        "attention_mask": torch.zeros((len(reads), length), dtype=torch.long),
        "settled_at": torch.full((len(reads), length), 2**30, dtype=torch.long),
        "ends": torch.zeros((len(reads), length), dtype=torch.long),
    }
    for row, read in enumerate(reads):
        n = len(read)
        if n == 0:
            continue
        span = slice(length - n, length) if left else slice(0, n)
        out["input_ids"][row, span] = torch.tensor(read.ids, dtype=torch.long)
        out["attention_mask"][row, span] = 1
        out["settled_at"][row, span] = torch.tensor(read.settled_at, dtype=torch.long)
        out["ends"][row, span] = torch.tensor(read.ends, dtype=torch.long)
    return out


def prompt_ends(reader: TokenReader, prompt: str, ids: Sequence[int]) -> list[int]:
    """Character ends of an anchor prompt's ``ids`` (leading special tokens, then the prompt's own
    tokens, as comm's data pipeline builds them)."""
    own = reader.segment(prompt, final=False)
    extra = len(ids) - len(own.ids)
    if extra < 0 or list(ids[extra:]) != own.ids:
        raise ValueError(
            f"the prompt ids do not end with the anchor's tokenization of the prompt {prompt[:30]!r}: pass the "
            "prompt texts the ids were made from"
        )
    return [0] * extra + own.ends


@dataclass
class ReadPlan:
    """How a composition's models read text: the anchor's reader (ends only) and, per augmenting
    model, its reader (own tokenizer) or None (the anchor's ids). The data pipeline writes, for
    every example, the anchor tokens' ends and each aligned augment's tokens from this plan."""

    anchor_reader: TokenReader
    augment_readers: list[TokenReader | None]
    mask_mode: str = "causal"

    @property
    def aligned_indices(self) -> list[int]:
        return [k for k, reader in enumerate(self.augment_readers) if reader is not None]

    def augment_read(self, k: int, segments: Sequence[str]) -> TokenizedText:
        """What augment ``k`` reads of an example: the whole text (causal; the last segment's last
        pre-token not final), or the prompt with the tokenizer's own template (prompt mode)."""
        reader = self.augment_readers[k]
        if self.mask_mode == "prompt":
            prompt = segments[0] if len(segments) > 1 else "".join(segments)
            return reader.read([prompt], add_suffix=True, complete=True)
        return reader.read(segments)
