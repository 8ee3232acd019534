"""Build (or reuse) the two specialists of the key-value arithmetic demo and print their scores.

    python scripts/build_specialists.py --out-dir runs/specialists --seed 0
    python scripts/build_specialists.py --out-dir /tmp/kv_tiny --fast      # seconds; for tests

A rerun with the same settings reuses the saved models (``--force`` rebuilds them).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, "") and not any(Path(p, "comm_cli").is_dir() for p in sys.path if p):
    # Run as a file from a checkout without the package installed: import it from the checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comm_cli.errors import CommError
from comm_cli.experiments.kv_arithmetic.config import KVSpecialistSettings
from comm_cli.experiments.kv_arithmetic.specialists import ensure_specialists


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True, help="directory for world.json, augment/ and anchor/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fast", action="store_true", help="tiny models, a few steps (layout only, not accuracy)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    parser.add_argument(
        "--processes", type=int, default=2, help="build the two specialists side by side (2) or in turn (1)"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-step training log")
    return parser.parse_args(argv)


def format_report(manifest: dict, built: bool) -> str:
    """A small table: one row per measured accuracy, then the timings."""
    lines = [f"{'model':8} {'metric':32} {'value':>8}"]
    for name in ("augment", "anchor"):
        for metric, value in manifest[name]["accuracy"].items():
            lines.append(f"{name:8} {metric:32} {value:8.3f}")
    for name in ("augment", "anchor"):
        m = manifest[name]
        lines.append(
            f"{name:8} {'train / eval seconds':32} {m['train_seconds']:8.1f} / {m['eval_seconds']:.1f}"
            f"  ({m['architecture']}, {m['num_parameters']:,} params, {m['steps']} steps)"
        )
    lines.append(f"{'total':8} {'build seconds':32} {manifest['total_seconds']:8.1f}")
    lines.append("(built now)" if built else "(reused an existing build with the same settings)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    settings = KVSpecialistSettings.tiny(args.seed) if args.fast else KVSpecialistSettings(seed=args.seed)
    settings.processes = args.processes
    try:
        paths = ensure_specialists(args.out_dir, settings, force=args.force)
    except CommError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_report(paths.manifest, paths.built))
    print(f"augment: {paths.augment}\nanchor:  {paths.anchor}\nworld:   {paths.world}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
