"""Metrics: answer extraction, exact match, chrF++/BLEU (sacrebleu), loss and perplexity, pass@k.

Extraction is applied to both the generation and the reference, so "first_number" compares the
numbers (thousands separators dropped: "1,234" reads as 1234), "full" compares whitespace-stripped
strings and "normalized" compares text the way QA benchmarks do (lower case, punctuation,
articles and extra spaces dropped). An experiment brings its own reader as
``extract: package.module:function`` (e.g. ``comm_cli.experiments.kv_arithmetic.tasks:answer``), a
function text -> answer or None; the core knows no experiment by name.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence

from comm_cli.errors import ConfigError

METRICS = ("loss", "exact_match", "chrf", "bleu", "pass_at_k")
EXTRACTORS = ("full", "normalized", "first_number", "last_number", "regex", "module:function")
# A number, with thousands separators ("1,234,567") read as one number; "4,5" is two numbers.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|-?\d+(?:\.\d+)?")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(r"[^\w\s]")


def _number(text: str) -> str:
    return text.replace(",", "")


def normalize_text(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _PUNCTUATION.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def extractor(kind: str, pattern: str | None = None) -> Callable[[str], str | None]:
    """A function text -> answer (None when no answer can be read)."""
    if kind == "full":
        return lambda text: text.strip()
    if kind == "normalized":
        return normalize_text
    if kind == "first_number":
        return lambda text: _number(m.group(0)) if (m := _NUMBER.search(text)) else None
    if kind == "last_number":
        return lambda text: _number(found[-1]) if (found := _NUMBER.findall(text)) else None
    if ":" in kind:
        return _imported(kind)
    if kind == "regex":
        if not pattern:
            raise ConfigError("extract=regex needs a pattern: set tasks.<name>.regex='...'")
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"tasks regex {pattern!r} does not compile ({err}): fix the pattern") from err

        def read(text: str) -> str | None:
            match = compiled.search(text)
            if match is None:
                return None
            return match.group(1) if match.groups() else match.group(0)

        return read
    raise ConfigError(f"extract '{kind}' is not one of {list(EXTRACTORS)}")


def exact_match(predictions: Sequence[str], references: Sequence[str], extract: Callable) -> list[bool]:
    out = []
    for prediction, reference in zip(predictions, references):
        expected = extract(reference)
        out.append(expected is not None and extract(prediction) == expected)
    return out


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF++ (character n-grams plus word bigrams), as sacrebleu computes it."""
    import sacrebleu

    return sacrebleu.corpus_chrf(list(predictions), [list(references)], word_order=2).score


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 50.0))


def _imported(path: str) -> Callable[[str], str | None]:
    """``package.module:function``, imported (an experiment's own answer reader)."""
    module_name, _, attr = path.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"extract '{path}' cannot be imported ({err}): give package.module:function of a function text -> answer"
        ) from err
    if not callable(function):
        raise ConfigError(f"extract '{path}' is not a function: give package.module:function")
    return function


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k (Chen et al., 2021) from n samples of which c passed:
    1 - C(n-c, k) / C(n, k), computed as a product so large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    result = 1.0
    for i in range(n - c + 1, n + 1):
        result *= 1.0 - k / i
    return 1.0 - result


def mean_pass_at_k(samples: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[str, float]:
    """``pass@k`` averaged over problems, for every k no larger than the smallest sample count."""
    n_min = min((len(s) for s in samples), default=0)
    out = {}
    for k in sorted(set(ks)):
        if 1 <= k <= n_min:
            out[f"pass@{k}"] = sum(pass_at_k(len(s), sum(s), k) for s in samples) / len(samples)
    return out
