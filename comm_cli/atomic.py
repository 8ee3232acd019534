"""Writing a file so that a reader (or a resumed run) sees the old content or the new, never a half.

Every small text output comm keeps (run config, trainer state, summaries, results, composition
config, the demo's table) goes through here.
"""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a hidden temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
