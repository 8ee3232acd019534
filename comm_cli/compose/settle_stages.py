"""The first two stages of a fast tokenizer's ``encode``, as the settle rule needs them: added
tokens (split out of the text before anything else) and the normalizer. ``comm_cli.compose.settle``
combines them with the pre-tokenizer and the model into the rule for when a token is final; the
argument for each stage is in that module's docstring and in docs/alignment.md.
"""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass, field

_FORMS = ("NFC", "NFD", "NFKC", "NFKD")
_CHARWISE_NORMALIZERS = ("Lowercase", "StripAccents", "ByteLevel", "Nmt", "Prepend")


def describe(component: dict | None) -> str:
    """A tokenizer component (its JSON) in a few words, for the rule's messages."""
    if component is None:
        return "none"
    kind = component.get("type", "?")
    if kind == "Sequence":
        members = component.get("pretokenizers") or component.get("normalizers") or []
        return "Sequence[" + ", ".join(describe(m) for m in members) + "]"
    if kind == "Split":
        pattern = component.get("pattern") or {}
        text = pattern.get("Regex", pattern.get("String", ""))
        shown = text if len(text) <= 40 else text[:37] + "..."
        return f"Split({shown!r})"
    if kind == "Metaspace":
        return f"Metaspace(split={component.get('split', True)})"
    if kind == "ByteLevel":
        return f"ByteLevel(use_regex={component.get('use_regex', True)})"
    return kind


# ---------------------------------------------------------------------- normalization


@functools.cache
def _composition_pairs() -> tuple[frozenset[str], frozenset[str]]:
    """Characters that can start (first) or continue (second) a canonical composition, from the
    decompositions of Python's Unicode tables plus Hangul's algorithmic ones."""
    firsts, seconds = set(), set()
    for code in range(0x30000):  # no canonical pair decomposes above U+2FFFF
        parts = unicodedata.decomposition(chr(code)).split()
        if len(parts) == 2 and not parts[0].startswith("<"):
            firsts.add(chr(int(parts[0], 16)))
            seconds.add(chr(int(parts[1], 16)))
    firsts.update(chr(c) for c in range(0x1100, 0x1113))  # leading jamo
    firsts.update(chr(c) for c in range(0xAC00, 0xD7A4, 28))  # LV syllables take a trailing jamo
    seconds.update(chr(c) for c in range(0x1161, 0x1176))  # vowel jamo
    seconds.update(chr(c) for c in range(0x11A8, 0x11C3))  # trailing jamo
    return frozenset(firsts), frozenset(seconds)


class Normalization:
    """What a normalizer does to the stability of a prefix's normalized text, one character at a
    time. ``closed_after(c)``: nothing after ``c`` can change what the text up to and including
    ``c`` normalizes to. ``boundary_before(c)``: nothing from ``c`` on can change what the text
    before ``c`` normalizes to. Char-wise normalizers make both always true; the Unicode forms
    (applied after the char-wise members ``before``) decide by composition and reordering."""

    def __init__(self, image=None, form: str | None = None, before=None):
        self._image, self.form, self._before = image, form, before
        self._cache: dict[str, tuple[str, bool, bool]] = {}
        self.changes_text = image is not None  # False: every character is its own image

    def _facts(self, c: str) -> tuple[str, bool, bool]:
        facts = self._cache.get(c)
        if facts is None:
            image = self._image.normalize_str(c) if self._image is not None else c
            facts = (image, *self._stability(c))
            self._cache[c] = facts
        return facts

    def _stability(self, c: str) -> tuple[bool, bool]:
        if self.form is None:
            return True, True
        seen = self._before.normalize_str(c) if self._before is not None else c
        if not seen or any(unicodedata.category(x) == "Cn" for x in seen):
            return False, False  # deleted first, or unknown to Python's tables: assume the worst
        firsts, seconds = _composition_pairs()
        decompose = "NFKD" if self.form.startswith("NFK") else "NFD"
        head = unicodedata.normalize(decompose, seen)[0]
        tail = unicodedata.normalize(self.form, seen)[-1]
        composes = self.form in ("NFC", "NFKC")
        boundary = unicodedata.combining(head) == 0 and not (composes and head in seconds)
        closed = unicodedata.combining(tail) == 0 and not (composes and (tail in firsts or tail in seconds))
        return closed, boundary

    def image(self, c: str) -> str:
        """What ``c`` normalizes to on its own."""
        return self._facts(c)[0]

    def closed_after(self, c: str) -> bool:
        return self._facts(c)[1]

    def boundary_before(self, c: str) -> bool:
        return self._facts(c)[2]


def _normalizer_member(member: dict, unproven: list[str]) -> tuple[str, object | None]:
    """("charwise" | a Unicode form, the member's char-wise part for a BertNormalizer)."""
    kind = member.get("type")
    if kind in _FORMS:
        return kind, None
    if kind == "BertNormalizer":
        strip = member.get("strip_accents")
        if strip is None:
            strip = member.get("lowercase", True)
        if not strip:
            return "charwise", None
        from tokenizers import normalizers

        charwise = normalizers.BertNormalizer(
            clean_text=member.get("clean_text", True),
            handle_chinese_chars=member.get("handle_chinese_chars", True),
            strip_accents=False,
            lowercase=False,
        )
        return "NFD", charwise
    if kind in _CHARWISE_NORMALIZERS:
        return "charwise", None
    if kind == "Replace" and len((member.get("pattern") or {}).get("String") or "") == 1:
        return "charwise", None
    unproven.append(f"the normalizer {describe(member)}")
    return "NFKC", None  # the strictest predicates; the rule is checked on the text


def normalization_of(normalizer_json: dict | None, normalizer, unproven: list[str]) -> Normalization:
    if normalizer_json is None:
        return Normalization()
    members = normalizer_json.get("normalizers") if normalizer_json.get("type") == "Sequence" else None
    objects = [normalizer[i] for i in range(len(members))] if members is not None else [normalizer]
    members = members if members is not None else [normalizer_json]
    kinds = [_normalizer_member(m, unproven) for m in members]
    # image(): without Prepend, which would prefix every lone character
    from tokenizers import normalizers

    kept = [o for m, o in zip(members, objects) if m.get("type") != "Prepend"]
    image = normalizers.Sequence(kept) if kept else None
    forms = [i for i, (kind, _) in enumerate(kinds) if kind != "charwise"]
    if not forms:
        return Normalization(image)
    if len(forms) > 1:
        unproven.append(f"the normalizer {describe(normalizer_json)} (several Unicode normalizations)")
        return Normalization(image, "NFKC")
    index = forms[0]
    form, charwise_part = kinds[index]
    before = [o for m, o in zip(members[:index], objects[:index]) if m.get("type") != "Prepend"]
    if charwise_part is not None:
        before.append(charwise_part)
    return Normalization(image, form, normalizers.Sequence(before) if before else None)


# ---------------------------------------------------------------------- added tokens


@dataclass
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    rstrip: bool = False  # a token ending here swallows the whitespace after it
    single_word: bool = False  # a token ending here needs the next character to match
    terminal: bool = False


@dataclass
class AddedTokens:
    """The added tokens ``encode`` splits out first, as a trie over their text."""

    root: _Node
    ids: frozenset[int]
    contents: dict[int, str]
    lstrip: bool  # some token swallows the whitespace before it

    @classmethod
    def of(cls, decoder: dict, normalized_matters: bool, unproven: list[str]) -> AddedTokens:
        root, ids, contents, lstrip, normalized = _Node(), set(), {}, False, []
        for token_id, token in decoder.items():
            content = token.content
            if not content:
                continue
            ids.add(int(token_id))
            contents[int(token_id)] = content
            node = root
            for char in content:
                node = node.children.setdefault(char, _Node())
            node.terminal = True
            node.rstrip |= bool(token.rstrip)
            node.single_word |= bool(token.single_word)
            lstrip |= bool(token.lstrip)
            if token.normalized and normalized_matters:
                normalized.append(content)
        if normalized:
            unproven.append(f"added tokens matched after normalization ({', '.join(normalized[:3])})")
        return cls(root, frozenset(ids), contents, lstrip)

    def is_match(self, token_id: int, text: str) -> bool:
        content = self.contents.get(token_id)
        return content is not None and text.strip() == content.strip()


def pending_matches(added: AddedTokens, text: str, never: int) -> tuple[list[int], list[int]]:
    """Where an added token could still start, and until when: (starts, last pending lengths),
    sorted by start. At text length L, a match starting at q is pending while ``text[q:L]`` is a
    proper prefix of an added token (or a complete one that could still swallow whitespace or
    needs the next character); ``never`` when the text ends before it is decided."""
    starts, lasts = [], []
    n = len(text)
    for q in range(n):
        node = added.root.children.get(text[q])
        if node is None:
            continue
        last, depth = None, 1
        while True:
            end = q + depth
            if node.children:
                last = end
            if node.terminal and (node.rstrip or node.single_word):
                k = end
                while node.rstrip and k < n and text[k].isspace():
                    k += 1
                last = never if k >= n else max(last or 0, k)
            if end >= n:
                if node.children:
                    last = never
                break
            following = node.children.get(text[end])
            if following is None:
                break
            node, depth = following, depth + 1
        if last is None:
            continue
        start = q
        if added.lstrip:
            while start > 0 and text[start - 1].isspace():
                start -= 1
        starts.append(start)
        lasts.append(last)
    order = sorted(range(len(starts)), key=starts.__getitem__)
    return [starts[i] for i in order], [lasts[i] for i in order]
