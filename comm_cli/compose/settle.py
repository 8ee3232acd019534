"""When is an augment token final? The settle computation, following what ``encode`` really does.

A fast tokenizer's ``encode`` runs four stages, and a token is *final* (every longer text
tokenizes to the same tokens up to it) once each stage is settled for it:

1. **Added tokens** (``<s>``, ``<|im_end|>``, ``<filename>``, ...) are split out of the text
   first; the text between them is normalized and pre-tokenized piece by piece. A text that ends
   in ``"<s"`` may still become ``"<s>"``, which would end the piece before it and change its
   last pre-token, so nothing that depends on characters from where such a match could start is
   final until the text rules the match in or out (``settle_stages.pending_matches``).
2. **The normalizer** may compose (NFC joins ``e`` and a later U+0301), reorder, expand or delete
   characters (BertNormalizer drops control characters and, stripping accents, combining
   marks). A prefix's normalized text is only known up to a point no later character can change
   (``Normalization``), and a deleted character says nothing about where a pre-token ends.
3. **The pre-tokenizer** splits the normalized text; a pre-token ``[a, b)`` is final once the
   characters that decide its end are known: the next character (it exists and did not join);
   for a whitespace run, the next non-space one (how a run splits depends on what ends it:
   ``\\s+(?!\\S)``); for split regexes, the three characters after ``a`` (fixed alternatives
   such as ``'re`` compete at ``a``) and, for regexes that take contractions as a word's suffix
   (GPT-4o's), the characters after an apostrophe that follows the word (``don`` + ``'ll``);
   for regexes that split words by case (GPT-4o's ``[Lu..]*[Ll..]+``), a word of upper-case,
   other letters and marks only that an upper-case letter follows waits for the end of that run
   (the greedy run backtracks: ``ǅᅡ̧`` + ``İ`` is two words, ``ǅᅡ̧İs`` one).
4. **The model** (BPE, WordPiece, Unigram, WordLevel) tokenizes each pre-token alone.

A token is final at the most any stage needs, never before the token before it (its state
depends on that one). Characters are counted in the original text; "know character x" means the
text reaches past x and the normalization of everything up to x is settled.

Without a splitting pre-tokenizer (SentencePiece-style BPE with spaces as ``▁``, or
``Metaspace(split=False)`` as converted Llama-2 tokenizers ship) a BPE or Unigram vocabulary with
no ``▁`` after another character cannot join a word to the space after it, so the space-led words
act as pre-tokens; a BPE without merges makes each character a token.

**Proven and checked.** The rules above are argued for the components real families ship (the
table in docs/alignment.md): char-wise normalizers, the Unicode forms, BertNormalizer; one
splitting pre-tokenizer among ByteLevel (GPT-2's regex), Split with the GPT-2, Llama-3, Qwen2 or
GPT-4o regex, Metaspace, BERT's, Whitespace(Split), Digits, Punctuation; added tokens matched on
the original text. A tokenizer made of these needs no sampling. Any other component (a
precompiled SentencePiece normalizer, an unknown regex, several splitting pre-tokenizers in a
row, added tokens matched after normalization) gets the same rules, made conservative, and is
listed in ``SettleRule.unproven``: comm then checks the rule on every text it reads with that
tokenizer (``comm_cli.compose.alignment.check_final_tokens``).
"""

from __future__ import annotations

import bisect
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

from comm_cli.compose.settle_stages import (
    AddedTokens,
    Normalization,
    describe,
    normalization_of,
    pending_matches,
)

# Split regexes whose pre-tokens the rules above are argued for, as tokenizer.json spells them.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
GPT4O_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# regex -> (takes contractions as a word's suffix, splits words by case)
KNOWN_REGEXES = {
    GPT2_REGEX: (False, False),
    LLAMA3_REGEX: (False, False),
    QWEN2_REGEX: (False, False),
    GPT4O_REGEX: (True, True),
}
# The case-split regex's upper-case class [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]: its greedy run backtracks, so
# a word that is all in it may still join the letters after it until that run ends.
_UPPER_RUN = frozenset(("Lu", "Lt", "Lm", "Lo", "Mn", "Mc", "Me"))
# Characters after a pre-token's start that decide which regex alternative matched it ('re, 'll).
SETTLE_MARGIN = 3
_PROVEN_SPLITTERS = (
    "BertPreTokenizer",
    "Whitespace",
    "WhitespaceSplit",
    "Digits",
    "CharDelimiterSplit",
)


class Unsupported(Exception):
    """The tokenizer cannot be given any rule (raised by ``settle_rule``; the reader words the error)."""


# ---------------------------------------------------------------------- the rule


@dataclass
class SettleRule:
    """How one tokenizer's tokens become final. ``kind``: "pre_tokens" (a splitting
    pre-tokenizer), "word_boundary" (space-led words of a vocabulary that never joins a word to
    the space after it) or "characters" (a model that never merges). ``regex``: the pre-tokenizer
    is a split regex (its fixed alternatives need ``SETTLE_MARGIN`` characters).
    ``contraction_suffix``: its words take contractions as a suffix; ``case_split``: it splits
    words by case with a backtracking upper-case run. ``unproven``: the components
    the rule is not argued for, to be checked on every text."""

    kind: str
    normalization: Normalization
    added: AddedTokens
    regex: bool = False
    contraction_suffix: bool = False
    case_split: bool = False
    markers: str = " ▁"
    unproven: list[str] = field(default_factory=list)
    components: str = ""

    @property
    def proven(self) -> bool:
        return not self.unproven


def _splitters(pre_json: dict | None) -> list[dict]:
    """The members of a pre-tokenizer that split text (ByteLevel without its regex and
    Metaspace(split=False) only map characters)."""
    if pre_json is None:
        return []
    members = pre_json.get("pretokenizers", []) if pre_json.get("type") == "Sequence" else [pre_json]
    out = []
    for member in members:
        kind = member.get("type")
        if kind == "Sequence":
            out += _splitters(member)
        elif kind == "ByteLevel" and not member.get("use_regex", True):
            continue
        elif kind == "Metaspace" and not member.get("split", True):
            continue
        else:
            out.append(member)
    return out


def _splitter_facts(member: dict, unproven: list[str]) -> tuple[bool, bool, bool]:
    """(is a split regex, takes contractions as a suffix, splits by case) of one splitting
    pre-tokenizer; one the rule is not argued for is noted as unproven and gets every caution."""
    kind = member.get("type")
    if kind == "ByteLevel":
        return True, False, False  # GPT-2's regex
    if kind == "Split":
        pattern = member.get("pattern") or {}
        isolated = member.get("behavior") == "Isolated" and not member.get("invert", False)
        if "Regex" in pattern and pattern["Regex"] in KNOWN_REGEXES and isolated:
            return (True, *KNOWN_REGEXES[pattern["Regex"]])
        if "String" in pattern and len(pattern["String"]) == 1:
            return False, False, False
    elif kind == "Punctuation" and member.get("behavior", "Isolated") in ("Isolated", "Contiguous"):
        return False, False, False
    elif kind in _PROVEN_SPLITTERS or kind == "Metaspace":
        return False, False, False
    unproven.append(f"the pre-tokenizer {describe(member)}")
    return True, True, True


def _no_merge_across_boundary(vocab: Sequence[str], markers: str) -> bool:
    """True when no vocabulary entry has a boundary marker after another character (so the model
    cannot join a word with the space that follows it)."""
    for token in vocab:
        stripped = token.lstrip(markers)
        if any(marker in stripped for marker in markers):
            return False
    return True


def settle_rule(backend, backend_json: dict) -> SettleRule:
    """The rule for a fast tokenizer's backend (``tokenizers.Tokenizer`` and its JSON), or
    ``Unsupported`` with what it does when none can be given."""
    unproven: list[str] = []
    normalizer_json = backend_json.get("normalizer")
    normalization = normalization_of(normalizer_json, backend.normalizer, unproven)
    added = AddedTokens.of(backend.get_added_tokens_decoder(), normalizer_json is not None, unproven)
    model = backend_json.get("model") or {}
    model_type = model.get("type")
    if model_type not in ("BPE", "WordPiece", "Unigram", "WordLevel"):
        unproven.append(f"the model {model_type}")
    pre_json = backend_json.get("pre_tokenizer")
    splitters = _splitters(pre_json)
    components = (
        f"normalizer {describe(normalizer_json)}, pre-tokenizer {describe(pre_json)}, model {model_type}"
    )
    rule = dict(normalization=normalization, added=added, unproven=unproven, components=components)
    if splitters:
        facts = [_splitter_facts(member, unproven) for member in splitters]
        if len(splitters) > 1:
            unproven.append(f"several splitting pre-tokenizers in a row ({describe(pre_json)})")
        return SettleRule(
            "pre_tokens",
            regex=any(f[0] for f in facts),
            contraction_suffix=any(f[1] for f in facts),
            case_split=any(f[2] for f in facts),
            **rule,
        )
    if model_type == "BPE" and model.get("merges") == []:
        return SettleRule("characters", **rule)
    members = _members(pre_json)
    if any(m.get("type") == "ByteLevel" for m in members):
        markers, vocab_markers = " ", "Ġ"  # a space is "Ġ" in a byte-level vocabulary
    else:
        replacements = (m.get("replacement", "▁") for m in members if m.get("type") == "Metaspace")
        markers = vocab_markers = "".join(sorted({" ", "▁", *replacements}))
    if model_type in ("BPE", "Unigram") and _no_merge_across_boundary(backend.get_vocab(), vocab_markers):
        return SettleRule("word_boundary", markers=markers, **rule)
    whole = "splits text nowhere" if pre_json is not None else "has no pre-tokenizer"
    model_reads = (
        "vocabulary has tokens that join a word to the space after it"
        if model_type in ("BPE", "Unigram")
        else "model reads each pre-token whole"
    )
    raise Unsupported(f"{whole} ({describe(pre_json)}) and its {model_type} {model_reads}")


def _members(pre_json: dict | None) -> list[dict]:
    if pre_json is None:
        return []
    if pre_json.get("type") == "Sequence":
        return [m for member in pre_json.get("pretokenizers", []) for m in _members(member)]
    return [pre_json]


# ---------------------------------------------------------------------- settle points


def settle_points(rule: SettleRule, text: str, encoding, final: bool) -> list[int]:
    """For each token of ``encoding`` (``text`` encoded without special tokens), the text length
    from which it is final; ``len(text) + 1`` for a token the text does not settle. ``final``:
    more text may follow ``text`` (otherwise the text is complete and every token is final at
    its end). Each question below looks only a few characters ahead of a pre-token's end."""
    n = len(text)
    never = n + 1
    end_of_text = never if final else n
    ids, offsets = encoding.ids, encoding.offsets
    norm = rule.normalization
    is_added = (
        [rule.added.is_match(t, text[s:e]) for t, (s, e) in zip(ids, offsets)] if rule.added.ids else None
    )
    added_spans = {s: e for (s, e), a in zip(offsets, is_added) if a} if is_added else {}
    added_starts = sorted(added_spans)
    image = norm.image if norm.changes_text else None

    def piece_end(i: int) -> int:
        """Where the piece holding position i ends: the next added token's start, or n."""
        index = bisect.bisect_left(added_starts, i)
        return added_starts[index] if index < len(added_starts) else n

    def survives(i: int) -> bool:
        return image is None or bool(image(text[i]))

    def space(i: int) -> bool:
        return text[i].isspace() or (image is not None and image(text[i]).isspace())

    def ready(p: int) -> int:
        """The text length from which the normalization of text[:p] is settled."""
        if norm.form is None:
            return p
        pe = piece_end(p - 1) if p else 0
        while p:
            if norm.closed_after(text[p - 1]):
                return p
            if p == pe:
                return pe + 1 if pe < n else end_of_text
            if norm.boundary_before(text[p]):
                return p + 1
            p += 1
        return p

    def need(x: int) -> int:
        """The text length from which the character at ``x`` (and all before it) is known and settled."""
        if x >= n:
            return end_of_text
        if x in added_spans:
            return x + 1  # an added token starts here; pending_matches covers the rest
        return ready(x + 1)

    def next_char(i: int, skip_spaces: bool = False) -> int:
        """The first surviving (non-space) character at or after i in its piece, else the piece's end."""
        pe = piece_end(i)
        while i < pe and (not survives(i) or (skip_spaces and space(i))):
            i += 1
        return min(i, pe)

    def after(x: int) -> int:
        """The surviving character after the one at ``x`` (or the piece's end)."""
        return x if x >= piece_end(x) else next_char(x + 1)

    def upper(i: int) -> bool:
        return bool({unicodedata.category(c) for c in (image(text[i]) if image else text[i])} & _UPPER_RUN)

    def unit_need(a: int, b: int) -> int:
        x1 = next_char(b)
        required = need(x1)
        if all(space(i) or not survives(i) for i in range(a, b)):
            required = max(required, need(next_char(b, skip_spaces=True)))
        if not rule.regex:
            return required
        required = max(required, need(after(after(next_char(a)))))
        open_next = x1 < piece_end(x1)
        if rule.contraction_suffix and open_next and (image(text[x1]) if image else text[x1]).startswith("'"):
            x2 = after(x1)
            letter = (image(text[x2]) if image else text[x2]).lower()[:1] if x2 < piece_end(x2) else ""
            required = max(required, need(after(x2) if letter in ("r", "v", "l") else x2))
        if rule.case_split and open_next and upper(x1):
            letters = {
                unicodedata.category(c) for i in range(a, b) for c in (image(text[i]) if image else text[i])
            }
            if any(c[0] in "LM" for c in letters) and "Ll" not in letters:
                run_end, pe = x1, piece_end(x1)
                while run_end < pe and upper(run_end):
                    run_end += 1
                required = max(required, need(run_end))
        return required

    word_of = _word_spans(rule, text, encoding, is_added, piece_end, added_spans)
    base, cache = [], {}
    for j, (start, end) in enumerate(offsets):
        if is_added and is_added[j]:
            base.append(end)
        elif rule.kind == "characters":
            base.append(need(max(end, 1) - 1) if end > start else need(start))
        else:
            span = word_of[j]
            if span not in cache:
                cache[span] = unit_need(*span)
            base.append(cache[span])

    pending_starts, pending_lasts = pending_matches(rule.added, text, never) if rule.added.ids else ([], [])
    running = []
    top = -1
    for last in pending_lasts:
        top = max(top, last)
        running.append(top)
    settled, previous = [], 0
    for value in base:
        index = bisect.bisect_left(pending_starts, value)
        if index and running[index - 1] >= value:
            value = never if running[index - 1] >= never else running[index - 1] + 1
        value = min(max(value, previous), never)
        previous = value
        settled.append(value if final else min(value, n))
    return settled


def _word_spans(
    rule: SettleRule, text: str, encoding, is_added, piece_end, added_spans
) -> list[tuple[int, int]]:
    """Each token's pre-token span: encode's own words for a pre-tokenizer, else space-led words
    (``" *[^ ]+"`` with spaces and ``▁`` as spaces) inside its piece."""
    offsets = encoding.offsets
    if rule.kind == "pre_tokens":
        spans = []
        for j, word in enumerate(encoding.word_ids):
            spans.append(offsets[j] if word is None else tuple(encoding.word_to_chars(word)))
        return spans
    if rule.kind == "characters":
        return list(offsets)
    markers = rule.markers
    words: list[tuple[int, int]] = []
    i, n = 0, len(text)
    while i < n:
        if i in added_spans:  # an added token: skip it
            i = max(added_spans[i], i + 1)
            continue
        pe, j = piece_end(i), i
        while j < pe and text[j] in markers:
            j += 1
        while j < pe and text[j] not in markers:
            j += 1
        words.append((i, j))
        i = j
    word_starts = [a for a, _ in words]
    spans = []
    for j, (start, end) in enumerate(offsets):
        if (is_added and is_added[j]) or not words:
            spans.append((start, end))
            continue
        index = max(0, bisect.bisect_right(word_starts, start) - 1)
        a, b = words[index]
        spans.append((a, max(b, end)))
    return spans
