"""Reading one text through two tokenizers: which augment token each anchor token may see.

When the anchor and an augmenting model tokenize text differently, their token sequences no
longer line up by index. comm lines them up through characters. For every token it knows

- ``end``: where the token's text ends in the text (a token that stops inside a character, such
  as the first bytes of a multi-byte character in byte-level BPE, ends where that character
  starts: it holds no whole character beyond; an unknown token such as ``[UNK]`` ends where it
  starts: the same id stands for any text, so it holds no known character);
- ``settled_at`` (augment tokens): the length of text from which the token is *final*, i.e.
  every longer text tokenizes to the same tokens up to and including this one. Only then are
  its identity and its hidden state (which depends on the tokens before it) settled.

Causal mode allows anchor token i to read augment token j exactly when
``settled_at[j] <= end[i]``. Both numbers depend only on text up to those positions, so the
output of anchor token i depends on no character after the end of its own text: nothing leaks
from the future, in training or at generation time.

When a token is final follows what ``encode`` does (added tokens split out first, the
normalizer, the pre-tokenizer, the model): ``comm_cli.compose.settle``. A tokenizer whose
components the rule is argued for needs no check; one with other components (``reader.proven``
false) is checked on every text it reads: the data pipeline checks each example at its anchor
tokens' ends (``check_final_tokens``), generation checks every step, and a text that breaks the
rule stops with one line naming the tokenizer and the fix. ``check_settle_rule`` verifies a
rule against the prefix tokenizations themselves.

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

from comm_cli.compose.settle import SettleRule, Unsupported, settle_points, settle_rule
from comm_cli.errors import TokenizerMismatchError

logger = logging.getLogger(__name__)

# Text that exercises letters, digits, punctuation and spaces when comparing tokenizers.
PROBE_TEXTS = (
    "Hello world, 123 + 456 = 579.",
    "def f(x):\n    return x * 2",
    "abc+xyz-def=4+7-3=8",
    "  two  spaces\tand a tab; don't stop",
)
# A causal augment must make some token of this final before its end, or it would read nothing.
_READS_SOMETHING = "the quick brown fox jumps over the lazy dog. "


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


class TokenReader:
    """One tokenizer's reading of segmented texts: ids, character ends and settle points."""

    def __init__(self, tokenizer, name: str = "model", settle: bool = True):
        """``settle=False``: only ids and ends are needed (the anchor's reader, or an augment read
        in prompt mode), no settle rule."""
        self.tokenizer = tokenizer
        self.name = name
        self._raw = _backend(tokenizer, name)
        backend_json = json.loads(self._raw.to_str())
        self._unknown_id = _unknown_id(backend_json.get("model") or {})
        self._settle: SettleRule | None = None
        self._added_ids = frozenset(int(i) for i in self._raw.get_added_tokens_decoder())
        if not settle:
            self.rule = "none"
        else:
            try:
                self._settle = settle_rule(self._raw, backend_json)
            except Unsupported as reason:
                raise TokenizerAlignmentError(
                    f"the tokenizer of {name} {reason}, so none of its tokens is final before the text ends and in "
                    "causal mode the augment would read nothing: use mask_mode=prompt, or another tokenizer"
                ) from None
            self.rule = self._settle.kind
        prefix, suffix = self._special_tokens()
        self.prefix_ids, self.suffix_ids = prefix, suffix
        if self._settle is not None:
            self._check_reads_something()

    @property
    def proven(self) -> bool:
        """Whether the settle rule is argued for all of this tokenizer's components (no checks needed)."""
        return self._settle is None or self._settle.proven

    @property
    def unproven(self) -> list[str]:
        """The components the settle rule is not argued for (checked on every text instead)."""
        return [] if self._settle is None else list(self._settle.unproven)

    @property
    def components(self) -> str:
        return "" if self._settle is None else self._settle.components

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer's own template puts before and after a text (e.g. <s>; [CLS] .. [SEP])."""
        with_special = self.tokenizer("x", add_special_tokens=True)["input_ids"]
        plain = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        for start in range(len(with_special) - len(plain) + 1):
            if with_special[start : start + len(plain)] == plain:
                return list(with_special[:start]), list(with_special[start + len(plain) :])
        return [], []

    def _check_reads_something(self) -> None:
        """Refuse a tokenizer that finalises nothing before a text ends: in causal mode the augment
        would read nothing (e.g. a whole text as one pre-token)."""
        text = _READS_SOMETHING * 2
        if not any(s <= len(text) for s in self.segment(text, final=True).settled_at):
            raise TokenizerAlignmentError(
                f"the tokenizer of {self.name} ({self.components}) makes no token of {text[:20]!r}... final before "
                "the text ends, so in causal mode the augment would read nothing: use mask_mode=prompt, or another "
                "tokenizer"
            )

    # ------------------------------------------------------------------ one segment

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
        if self._unknown_id is not None:
            ends = [s if t == self._unknown_id else e for t, s, e in zip(encoding.ids, starts, ends)]
        if self._settle is None:
            settled = list(ends)
        else:
            settled = settle_points(self._settle, text, encoding, final)
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


def _unknown_id(model: dict) -> int | None:
    """The id the model emits for text it cannot spell (WordPiece's [UNK], Unigram's <unk>), if any."""
    if model.get("type") == "Unigram":
        return model.get("unk_id")
    unknown = model.get("unk_token")
    if unknown is None:
        return None
    vocab = model.get("vocab") or {}
    return vocab.get(unknown) if isinstance(vocab, dict) else None


def check_final_tokens(
    reader: TokenReader,
    segments: Sequence[str],
    cuts: Sequence[int],
    whole: TokenizedText | None = None,
    full: bool = False,
) -> None:
    """The rule holds for this text at these cuts (text lengths): the tokens final for the text
    cut there (a segment cut at its end is complete, as a prompt is before generation starts) are
    exactly the tokens of the whole text that are final by then, with the same ids, ends and
    settle points. Then what an anchor token ending at a cut reads depends on no character after
    the cut. Raises TokenizerAlignmentError naming the tokenizer, the text and the fix on the
    first counterexample.

    The settle computation reads nothing past a token's settle point, so where the cut text
    tokenizes like the whole text up to the tokens final by the cut (same ids, spans and
    pre-tokens) and its next token's pre-token runs to the cut, the answer is yes without
    computing the cut text's settle points: one ``encode`` per cut (``_Alike``). ``full=True``
    computes them at every cut (the tests' reference)."""
    whole = whole if whole is not None else reader.read(segments)
    bounds, offset = [], 0
    for text in segments:
        bounds.append(offset)
        offset += len(text)
    located: dict[int, list[int]] = {}
    for cut in sorted(set(cuts)):
        if 0 < cut <= offset:
            index = max(i for i, start in enumerate(bounds) if start < cut)
            located.setdefault(index, []).append(cut - bounds[index])
    fast = not full and reader.rule == "pre_tokens"
    for index, insides in located.items():
        text = segments[index]
        alike = _Alike(reader, segments, index, whole, insides) if fast else None
        for inside in insides:
            if alike is not None and alike(inside):
                continue
            complete = inside == len(text) and index + 1 < len(segments)
            declared = reader.settled_prefix([*segments[:index], text[:inside], *([""] if complete else [])])
            cut, k = bounds[index] + inside, len(declared.ids)
            same = (
                declared.ids == whole.ids[:k]
                and declared.ends == whole.ends[:k]
                and declared.settled_at == whole.settled_at[:k]
                and (k == len(whole.ids) or whole.settled_at[k] > cut)
            )
            if not same:
                raise TokenizerAlignmentError(
                    f"the tokenizer of {reader.name} ({reader.components}) reads {text[max(0, inside - 20) : inside]!r} "
                    f"differently once {text[inside : inside + 10]!r} follows, against comm's rule for when its "
                    "tokens are final: use mask_mode=prompt with this tokenizer, or another tokenizer"
                )


class _Alike:
    """The fast path of ``check_final_tokens`` for one segment: whether the segment cut at
    ``inside`` keeps the whole text's final tokens by the cut (same ids, offsets and pre-tokens)
    and makes no further token final (its next token's pre-token runs to the cut)."""

    def __init__(
        self,
        reader: TokenReader,
        segments: Sequence[str],
        index: int,
        whole: TokenizedText,
        insides: list[int],
    ):
        raw = reader._raw
        self.reader, self.text = reader, segments[index]
        self.complete_at = len(self.text) if index + 1 < len(segments) else None
        self.encoding = raw.encode(self.text, add_special_tokens=False)
        self.ids, self.offsets = self.encoding.ids, self.encoding.offsets
        self.words = self.encoding.word_ids
        first = len(reader.prefix_ids) + sum(
            len(raw.encode(s, add_special_tokens=False).ids) for s in segments[:index]
        )
        self.settled = whole.settled_at[first : first + len(self.ids)]  # non-decreasing
        self.start = sum(len(s) for s in segments[:index])
        cut_texts = [self.text[:inside] for inside in insides if inside != self.complete_at]
        # one call encodes every cut text (in parallel where tokenizers may use threads)
        self.parts = dict(zip(cut_texts, raw.encode_batch(cut_texts, add_special_tokens=False)))

    def __call__(self, inside: int) -> bool:
        if inside == self.complete_at:
            return True  # a complete segment: the same encode, clamped alike
        k = bisect.bisect_right(self.settled, self.start + inside)
        part = self.parts[self.text[:inside]]
        ids, offsets, words = part.ids, part.offsets, part.word_ids
        if (
            len(ids) < k
            or ids[:k] != self.ids[:k]
            or offsets[:k] != self.offsets[:k]
            or words[:k] != self.words[:k]
        ):
            return False
        if k:
            # the last final pre-token spans the same characters, and the last final token's end is
            # cut back alike (where a character it shares with the next token starts)
            last = words[k - 1]
            if last is None or part.word_to_chars(last) != self.encoding.word_to_chars(last):
                return False
            if _cut_end(offsets, k - 1) != _cut_end(self.offsets, k - 1):
                return False
        if k == len(ids):
            return True
        word = words[k]
        if ids[k] in self.reader._added_ids or word is None:
            return False
        return part.word_to_chars(word)[1] == inside  # its pre-token runs to the cut: not final


def _cut_end(offsets, i: int) -> int:
    """Token i's end as ``TokenReader.segment`` gives it: where a character it shares with the next
    token starts, if it does."""
    end = offsets[i][1]
    return min(end, offsets[i + 1][0]) if i + 1 < len(offsets) else end


def check_settle_rule(reader: TokenReader, texts: Sequence[str], max_cuts: int = 64) -> None:
    """``check_final_tokens`` at every cut point of every text (up to ``max_cuts`` per text)."""
    for text in texts:
        step = max(1, len(text) // max_cuts)
        check_final_tokens(reader, [text], range(0, len(text) + 1, step))


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
    mask_mode: str = "causal",
) -> list[TokenReader | None]:
    """Decide how each augmenting model reads text: the anchor's token ids (None) when the two
    tokenizers read identically, else its own tokens lined up through characters (a
    TokenReader). ``requested`` ("auto" | "shared" | "aligned" per augment) can force a path.
    In causal mode each aligned tokenizer gets its settle rule here (or is refused in one line),
    and one the rule is not argued for is checked on ``texts`` at once (and later on every text
    it reads). The decision is logged."""
    requested = list(requested or ["auto"] * len(augment_tokenizers))
    readers: list[TokenReader | None] = []
    for tokenizer, name, wanted in zip(augment_tokenizers, names, requested):
        if tokenizer is None and wanted == "aligned":
            raise TokenizerMismatchError(
                f"{name} is set to read its own tokens (tokens=aligned) but ships no tokenizer: set its "
                "tokenizer to the one it was trained with, or tokens=auto"
            )
        shared = tokenizer is None or same_tokenizer(anchor_tokenizer, tokenizer, texts)
        if wanted == "shared" and not shared:
            raise TokenizerMismatchError(
                f"{name} is set to read the anchor's token ids (tokens=shared) but its tokenizer reads text "
                "differently: set its tokens=auto (or aligned) to line the two up through characters"
            )
        if wanted == "aligned" or (wanted == "auto" and not shared):
            reader = TokenReader(tokenizer, name, settle=mask_mode == "causal")
            logger.info(
                "%s has its own tokenizer: it reads its own tokens, lined up with the anchor's through characters "
                "(tokens are final by the %s rule)",
                name,
                reader.rule,
            )
            if not reader.proven:
                logger.info(
                    "%s: comm's rule for when its tokens are final is not argued for %s, so it is checked on every "
                    "text this augment reads",
                    name,
                    " and ".join(reader.unproven),
                )
                check_settle_rule(reader, [t for t in texts if isinstance(t, str)])
            readers.append(reader)
        else:
            logger.info("%s shares the anchor's tokenizer: it reads the anchor's token ids", name)
            readers.append(None)
    return readers


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
