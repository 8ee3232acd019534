"""`make demo-real-seeds`: the real-facts table over several specialist and training seeds.

The script lives in ``comm_cli/experiments/real_facts/seeds.py``; this file only runs it, from
a checkout with or without the package installed. ``--help`` lists the options.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not any(Path(p, "comm_cli").is_dir() for p in sys.path if p):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comm_cli.experiments.real_facts.seeds import main  # noqa: E402

if __name__ == "__main__":
    main()
