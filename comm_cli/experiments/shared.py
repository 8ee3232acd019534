"""Small helpers every built-in experiment uses: per-component seeds and the printed table.

The experiment packages (``kv_arithmetic``, ``real_facts``) each own their world, specialists and
demo; what they do alike lives here once, so the two cannot drift apart.
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, name: str) -> int:
    """A separate, stable seed per component, so changing one part does not shift another's draws."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "big") % (2**31)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of ``rows``: the system name, ``columns`` as percentages (n/a for None)
    and the trainable parameter count, in aligned columns under a rule."""
    header = ["system", *columns, "trainable_params"]
    lines = [header] + [
        [
            row["system"],
            *("n/a" if row[c] is None else f"{100 * row[c]:.1f}%" for c in columns),
            f"{row['trainable_params']:,}",
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
