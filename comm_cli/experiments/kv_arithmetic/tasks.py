"""The synthetic key-value arithmetic task of CALM (Bansal et al. 2024, section 4.1).

A seeded *world* maps random string keys to single-digit values. Two specialists are built
from it (see ``specialists``): the augmenting model memorises key -> value for every key,
the anchor only learns arithmetic over digits and never sees a value. The composition is trained
on expressions over the *composition* keys and evaluated on the *held-out* keys, whose values
only the augmenting model knows.

Every example is a plain dict ``{"prompt": ..., "completion": ...}``; the model reads
``prompt`` and should generate ``completion``. Formats, for keys ``abc``, ``xyz``, ``def`` with
values 4, 7, 3:

- arithmetic (the anchor's skill): ``4+7-3=`` -> ``8``; 2-3 single-digit operands, ``+``/``-``,
  results from -18 to 27.
- lookup (the augment's skill): ``abc`` -> ``4``. The augment is trained on lines of pairs with
  the value right after the key, ``abc4;xyz7 def1`` (``lookup_line``).
- kv_arithmetic (the composition's task): ``abc+xyz-def=`` -> ``4+7-3=8``, judged on the ``8``.
- kv_substitution: ``abc+xyz-def=`` -> ``4+7-3``, the first half of kv_arithmetic.
- kv_prefixed: ``abc+xyz-def=4+7-3=`` -> ``8``, what the anchor must finish in the composition.

The kv_arithmetic completion writes the substituted expression before the result, so the anchor
only has to finish arithmetic it already knows once the bridges have supplied the digits.

Everything is deterministic for a seed: generators take a ``random.Random`` and draw from it
in a fixed order, and ``sample_examples`` builds its own ``random.Random(seed)``.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence

from comm_cli.errors import DataError
from comm_cli.experiments.kv_arithmetic.world import KVWorld

Example = dict[str, str]

TASKS = ("arithmetic", "lookup", "kv_arithmetic", "kv_substitution", "kv_prefixed")
KEY_TASKS = ("lookup", "kv_arithmetic", "kv_substitution", "kv_prefixed")

# Characters of the anchor's random training prefixes: anything a key expression is made of,
# never a digit (so a prefix cannot leak or imitate a value).
PREFIX_CHARS = string.ascii_lowercase + "+-=; "
# Separators between key-value pairs on one augment training line. "+" and "-" put keys after the
# characters they follow in a kv_arithmetic prompt.
PAIR_SEPARATORS = "; +-"

_NUMBER = re.compile(r"-?\d+")


# ---------------------------------------------------------------------------------------------
# Expressions


def _draw_ops(rng: random.Random, num_operands: int) -> list[str]:
    return [rng.choice("+-") for _ in range(num_operands - 1)]


def _num_operands(rng: random.Random, min_operands: int, max_operands: int) -> int:
    return rng.randint(min_operands, max_operands)


def render(operands: Sequence[object], ops: Sequence[str]) -> str:
    """``render([4, 7, 3], ["+", "-"]) == "4+7-3"``."""
    text = str(operands[0])
    for op, operand in zip(ops, operands[1:]):
        text += op + str(operand)
    return text


def evaluate(operands: Sequence[int], ops: Sequence[str]) -> int:
    total = operands[0]
    for op, operand in zip(ops, operands[1:]):
        total = total + operand if op == "+" else total - operand
    return total


def arithmetic_example(rng: random.Random, min_operands: int = 2, max_operands: int = 3) -> Example:
    """Numeric arithmetic, the anchor's skill: ``4+7-3=`` -> ``8`` (results may be negative)."""
    n = _num_operands(rng, min_operands, max_operands)
    operands = [rng.randrange(10) for _ in range(n)]
    ops = _draw_ops(rng, n)
    return {"prompt": render(operands, ops) + "=", "completion": str(evaluate(operands, ops))}


def random_prefix(
    rng: random.Random, min_length: int = 1, max_length: int = 15, shaped_fraction: float = 0.5
) -> str:
    """A prefix of letters and ``+-=; `` (never digits) for the anchor to compute after.

    With probability ``shaped_fraction`` it has the shape of a key expression, e.g. ``qzr+bta=``
    (random letters, not drawn from the world, and never a value): the prefix the anchor meets
    in the composition ends in ``=`` right before the digits, which uniformly random characters
    rarely do. Otherwise it is ``min_length``-``max_length`` uniformly random characters.
    """
    if rng.random() < shaped_fraction:
        n = rng.randint(1, 3)
        words = ["".join(rng.choices(string.ascii_lowercase, k=3)) for _ in range(n)]
        shaped = render(words, _draw_ops(rng, n)) + "="
        if min_length <= len(shaped) <= max_length:
            return shaped
    return "".join(rng.choices(PREFIX_CHARS, k=rng.randint(min_length, max_length)))


def _draw_keys(world: KVWorld, rng: random.Random, keys: Sequence[str], n: int) -> list[str]:
    """``n`` keys, distinct within one expression when the subset is big enough."""
    return rng.sample(list(keys), n) if len(keys) >= n else rng.choices(list(keys), k=n)


def _kv_parts(world: KVWorld, rng: random.Random, keys: Sequence[str], min_operands: int, max_operands: int):
    n = _num_operands(rng, min_operands, max_operands)
    chosen = _draw_keys(world, rng, keys, n)
    ops = _draw_ops(rng, n)
    values = [world.values[k] for k in chosen]
    return render(chosen, ops), render(values, ops), evaluate(values, ops)


def kv_arithmetic_example(
    world: KVWorld, rng: random.Random, keys: Sequence[str], min_operands: int = 2, max_operands: int = 3
) -> Example:
    """``abc+xyz-def=`` -> ``4+7-3=8``: substitute the values, then compute."""
    key_expr, value_expr, result = _kv_parts(world, rng, keys, min_operands, max_operands)
    return {"prompt": key_expr + "=", "completion": f"{value_expr}={result}"}


def kv_substitution_example(
    world: KVWorld, rng: random.Random, keys: Sequence[str], min_operands: int = 2, max_operands: int = 3
) -> Example:
    """``abc+xyz-def=`` -> ``4+7-3``: only the substitution (reference for ``substitution()``)."""
    key_expr, value_expr, _ = _kv_parts(world, rng, keys, min_operands, max_operands)
    return {"prompt": key_expr + "=", "completion": value_expr}


def kv_prefixed_example(
    world: KVWorld, rng: random.Random, keys: Sequence[str], min_operands: int = 2, max_operands: int = 3
) -> Example:
    """``abc+xyz-def=4+7-3=`` -> ``8``: what the anchor must finish once the bridges have written
    the substitution. Used to evaluate the anchor, never to train it (the prompt holds values)."""
    key_expr, value_expr, result = _kv_parts(world, rng, keys, min_operands, max_operands)
    return {"prompt": f"{key_expr}={value_expr}=", "completion": str(result)}


def lookup_example(world: KVWorld, rng: random.Random, keys: Sequence[str]) -> Example:
    """``abc`` -> ``4``: the augment's skill, in the layout it is trained on (value right after key)."""
    key = rng.choice(keys)
    return {"prompt": key, "completion": str(world.values[key])}


def lookup_line(world: KVWorld, rng: random.Random, keys: Sequence[str], num_pairs: int) -> str:
    """An augment training line of ``num_pairs`` key-value pairs, e.g. ``abc4;xyz7 def1``.

    The value comes right after its key, so the augment's hidden state on a key's last character
    carries the value at every layer; that state is what the bridges read in ``abc+xyz-def=``.
    """
    parts = []
    for i in range(num_pairs):
        key = rng.choice(keys)
        if i:
            parts.append(rng.choice(PAIR_SEPARATORS))
        parts.append(f"{key}{world.values[key]}")
    return "".join(parts)


def sample_examples(
    task: str,
    n: int,
    seed: int,
    world: KVWorld | None = None,
    split: str = "all",
    min_operands: int = 2,
    max_operands: int = 3,
) -> list[Example]:
    """``n`` examples of ``task`` over the keys of ``split``, deterministic for ``seed``.

    ``world`` is required for every task except "arithmetic". For "lookup" with ``n`` equal to
    the split size, use ``lookup_all`` instead to get every key exactly once.
    """
    if task not in TASKS:
        raise DataError(f"unknown key-value task '{task}': use one of {', '.join(TASKS)}")
    rng = random.Random(seed)
    if task == "arithmetic":
        return [arithmetic_example(rng, min_operands, max_operands) for _ in range(n)]
    if world is None:
        raise DataError(
            f"task '{task}' needs a KVWorld: pass world=KVWorld.create(seed) or KVWorld.load(path)"
        )
    keys = world.split_keys(split)
    if task == "lookup":
        return [lookup_example(world, rng, keys) for _ in range(n)]
    make = {
        "kv_arithmetic": kv_arithmetic_example,
        "kv_substitution": kv_substitution_example,
        "kv_prefixed": kv_prefixed_example,
    }[task]
    return [make(world, rng, keys, min_operands, max_operands) for _ in range(n)]


def lookup_all(world: KVWorld, split: str = "all") -> list[Example]:
    """One lookup example per key of ``split``, in key order."""
    return [{"prompt": key, "completion": str(world.values[key])} for key in world.split_keys(split)]


# ---------------------------------------------------------------------------------------------
# Reading generations


def answer(generation: str) -> str | None:
    """The final number of a generation: after the last ``=`` (or from the start when there is
    none), an optional ``-`` and digits, up to the first other character.

    ``answer("4+7-3=8") == "8"``, ``answer("-9;x") == "-9"``, ``answer("4+7=") is None``.
    Compared as strings, so ``08`` does not match ``8`` (exact match).
    """
    tail = generation.rsplit("=", 1)[-1]
    match = _NUMBER.match(tail)
    return match.group(0) if match else None


def substitution(generation: str) -> str:
    """The substituted expression of a kv_arithmetic *completion*: the text before its first
    ``=`` (which is the second ``=`` of prompt + completion). ``substitution("4+7-3=8") == "4+7-3"``.
    Pass the generated text only, not the prompt."""
    return generation.split("=", 1)[0]


def is_correct(task: str, generation: str, completion: str) -> bool:
    """Exact match as the paper scores it: the final number for arithmetic-like tasks and lookup,
    the substituted expression for kv_substitution."""
    if task == "kv_substitution":
        return substitution(generation) == completion
    expected = answer(completion)
    return expected is not None and answer(generation) == expected
