"""What the character alignment costs per tokenizer family (docs/alignment.md, "What it costs").

Run from the checkout (it builds the tokenizers of tests/tokenizer_zoo.py, nothing downloaded):

    TOKENIZERS_PARALLELISM=false python scripts/alignment_cost.py [--texts 40] [--length 1000]

Prints one markdown row per tokenizer: the rule decided once per tokenizer; encode alone, and a
read with settle points, per text; the check comm makes on every text of a tokenizer the rule is
not argued for, at each anchor token's end (a GPT-2-style anchor), with one encode per cut and,
for reference, computing every cut's settle points. Times are CPU seconds of this process (one
thread), so other jobs on the machine change them little.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comm_cli.compose.alignment import TokenReader, check_final_tokens  # noqa: E402
from tests import tokenizer_zoo as zoo  # noqa: E402

UNKNOWN_REGEX = r"[A-Za-z]+|[0-9]{1,2}|\s+|[^A-Za-z0-9\s]+"
KINDS = (
    "byte_bpe",
    "qwen2_bpe",
    "gpt4o_bpe",
    "wordpiece",
    "unigram",
    "sentencepiece_bpe",
    "llama2_metaspace",
)


def texts_of(count: int, length: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = zoo.corpus(2000, seed)
    out = []
    for _ in range(count):
        parts: list[str] = []
        while sum(map(len, parts)) < length:
            parts.append(rng.choice(pieces))
        out.append(" ".join(parts)[:length])
    return out


def cpu_seconds(work, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        work()
        best = min(best, time.process_time() - start)
    return best


def tokenizer_of(kind: str):
    if kind == "smollm2":
        return zoo.smollm2()
    if kind == "unknown_regex":
        return zoo._wrap(zoo._regex_bpe(UNKNOWN_REGEX, ["<pad>"], 300), pad_token="<pad>")
    return zoo.build(kind)


def row(kind: str, texts: list[str], cuts: dict[str, list[int]]) -> str:
    """One tokenizer's markdown row."""
    tok = tokenizer_of(kind)
    rule = cpu_seconds(lambda: TokenReader(tok, kind))
    reader = TokenReader(tok, kind)
    encode = cpu_seconds(lambda: [reader._raw.encode(t, add_special_tokens=False) for t in texts])
    read = cpu_seconds(lambda: [reader.read([t]) for t in texts])
    few = texts[:8]
    wholes = {t: reader.read([t]) for t in few}
    check = cpu_seconds(lambda: [check_final_tokens(reader, [t], cuts[t], wholes[t]) for t in few], 1)
    full = cpu_seconds(
        lambda: [check_final_tokens(reader, [t], cuts[t], wholes[t], True) for t in few[:2]], 1
    )
    name = kind if reader.proven else f"{kind} (not proven)"
    per = 1e3 / len(texts)
    return (
        f"| {name} | {rule * 1e3:.1f} | {encode * per:.1f} | {read * per:.1f} | "
        f"{check * 1e3 / len(few):.0f} | {full * 1e3 / 2:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=40)
    parser.add_argument("--length", type=int, default=1000, help="characters per text")
    args = parser.parse_args()
    texts = texts_of(args.texts, args.length)
    anchor = TokenReader(zoo.gpt2_bpe(), "anchor", settle=False)
    cuts = {t: anchor.read([t], add_prefix=False).ends for t in texts}
    print(
        "| tokenizer | rule (ms, once) | encode (ms/text) | read (ms/text) | check (ms/text) | every cut computed |"
    )
    print("|---|---|---|---|---|---|")
    kinds = [*KINDS, "unknown_regex"] + (["smollm2"] if zoo.smollm2() is not None else [])
    for kind in kinds:
        print(row(kind, texts, cuts), flush=True)


if __name__ == "__main__":
    main()
