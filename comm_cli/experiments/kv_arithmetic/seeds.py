"""The key-value table over seeds: `make demo-seeds`.

One run of `make demo` is one specialist build and one CALM training; the result moves with both
(and with the machine that built the specialists, through float rounding). This script builds the
specialists from several seeds (``--specialist-seeds``), trains CALM with several training seeds on
each (``--calm-seeds``), runs every control once per specialist build, and prints each run's numbers
and their mean, minimum and standard deviation, with what each specialist learned (key lookup, the
anchor's arithmetic after key-shaped prefixes) beside its CALM results. It writes
``<output_root>/seeds.json``.

    make demo-seeds                                              # 3 specialist seeds x 2 CALM seeds
    python scripts/kv_seeds.py --specialist-seeds 0,1,2,3 --calm-seeds 0
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from comm_cli.experiments.jobs import Runner
from comm_cli.experiments.kv_arithmetic.demo import (
    KVTable,
    add_common_arguments,
    base_overrides,
    prepare_specialists,
)
from comm_cli.experiments.shared import measured_on, stats, write_seeds_table

HELDOUT = "kv_arithmetic_heldout"
CONTROLS = ("m_A alone", "m_B alone", "LoRA on m_B", "CALM, random m_A")
SPECIALIST_METRICS = (
    ("augment", "lookup_all_keys"),
    ("augment", "lookup_in_heldout_expression"),
    ("anchor", "arithmetic"),
    ("anchor", "arithmetic_after_kv_prefix"),
)


def summarise(tables: dict[int, dict], manifests: dict[int, dict]) -> dict:
    """Per-run rows and the aggregate docs/experiments/key_value.md reports."""
    runs, controls, specialists = [], {name: [] for name in CONTROLS}, []
    for spec_seed, table in tables.items():
        by_system = {row["system"]: row for row in table["rows"]}
        anchor_alone = by_system["m_B alone"]["numeric_arithmetic"]
        for run in table["calm_runs"]:
            runs.append(
                {
                    "specialist_seed": spec_seed,
                    "calm_seed": run["seed"],
                    HELDOUT: run[HELDOUT],
                    "kv_substitution_heldout": run["kv_substitution_heldout"],
                    "train_keys": run["kv_arithmetic_train_keys"],
                    "numeric_arithmetic": run["numeric_arithmetic"],
                    "numeric_arithmetic_anchor": anchor_alone,
                    "val_loss": run["val_loss"],
                    "value_errors": run.get("value_errors"),
                }
            )
        for name in CONTROLS:
            if by_system[name][HELDOUT] is not None:  # None: an encoder augment writes no text
                controls[name].append({"specialist_seed": spec_seed, HELDOUT: by_system[name][HELDOUT]})
        manifest = manifests[spec_seed]
        specialists.append(
            {
                "specialist_seed": spec_seed,
                **{
                    f"{model}.{metric}": manifest[model]["accuracy"][metric]
                    for model, metric in SPECIALIST_METRICS
                },
            }
        )
    skill_gaps = [abs(r["numeric_arithmetic"] - r["numeric_arithmetic_anchor"]) for r in runs]
    by_count: dict[int, list[float]] = {}
    for r in runs:
        for cell in (r.get("value_errors") or {}).values():
            by_count.setdefault(cell["composition_keys"], []).append(cell["error"])
    return {
        "runs": runs,
        "calm_heldout": stats([r[HELDOUT] for r in runs]),
        "controls": {
            name: {"runs": rows, **stats([r[HELDOUT] for r in rows])}
            for name, rows in controls.items()
            if rows
        },
        "anchor_skill_max_abs_change": max(skill_gaps),
        # held-out slot error of a value against how many composition keys hold it, over all runs
        "error_by_composition_keys_per_value": {
            n: statistics.fmean(errors) for n, errors in sorted(by_count.items())
        },
        "specialists": specialists,
    }


def format_report(summary: dict) -> str:
    pct = lambda v: f"{100 * v:5.1f}%"  # noqa: E731
    lines = ["specialist_seed  calm_seed  kv_heldout  kv_subst  train_keys  numeric (anchor)  val_loss"]
    for r in summary["runs"]:
        lines.append(
            f"{r['specialist_seed']:15d}  {r['calm_seed']:9d}  {pct(r[HELDOUT]):>10}  "
            f"{pct(r['kv_substitution_heldout']):>8}  {pct(r['train_keys']):>10}  "
            f"{pct(r['numeric_arithmetic'])} ({pct(r['numeric_arithmetic_anchor'])})  {r['val_loss']:.4f}"
        )
    s = summary["calm_heldout"]
    lines.append(
        f"CALM held-out kv_arithmetic over {s['n']} runs: mean {pct(s['mean'])}, min {pct(s['min'])}, "
        f"max {pct(s['max'])}, std {100 * s['std']:.1f} points"
    )
    for name, c in summary["controls"].items():
        values = ", ".join(pct(r[HELDOUT]) for r in c["runs"])
        lines.append(f"{name:17} held-out: {values}  (max {pct(c['max'])})")
    lines.append(
        f"anchor's numeric arithmetic, bridges on vs the anchor alone: largest change "
        f"{100 * summary['anchor_skill_max_abs_change']:.1f} points"
    )
    if summary.get("error_by_composition_keys_per_value"):
        lines.append(
            "held-out substitution error of a value, by how many composition keys hold it: "
            + ", ".join(
                f"{n} keys {pct(e)}" for n, e in summary["error_by_composition_keys_per_value"].items()
            )
        )
    lines.append("specialists: " + "  ".join(f"{m}.{k}" for m, k in SPECIALIST_METRICS))
    for row in summary["specialists"]:
        values = "  ".join(pct(row[f"{m}.{k}"]) for m, k in SPECIALIST_METRICS)
        lines.append(f"  seed {row['specialist_seed']}: {values}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, "outputs/kv_seeds")
    parser.add_argument("--specialist-seeds", default="0,1,2")
    parser.add_argument("--calm-seeds", default="0,1")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="read the finished runs under --output-root again; train nothing",
    )
    args = parser.parse_args()
    specialist_seeds = [int(s) for s in args.specialist_seeds.split(",")]
    calm_seeds = tuple(int(s) for s in args.calm_seeds.split(","))

    root = Path(args.output_root).resolve()
    start = time.perf_counter()
    tables, manifests, jobs, build_seconds = {}, {}, [], {}
    for spec_seed in specialist_seeds:
        train, evaluation = base_overrides(args, spec_seed)
        t0 = time.perf_counter()
        kv_dir, manifests[spec_seed] = prepare_specialists(train)
        build_seconds[spec_seed] = round(time.perf_counter() - t0, 1)
        print(f"[seeds] specialists of seed {spec_seed} ready in {kv_dir}", flush=True)
        table = KVTable(
            root=root / f"specialists_seed{spec_seed}",
            kv_dir=kv_dir,
            augment_generates=manifests[spec_seed]["settings"]["augment"].get("kind", "causal") != "encoder",
            calm_seeds=calm_seeds,
            lora_lrs=tuple(args.lora_lrs.split(",")),
            lora_steps=args.lora_steps,
            train_overrides=train,
            eval_overrides=evaluation + [f"kv.dir={kv_dir}"],
            fast=args.fast,
            prefix=f"s{spec_seed}/",
        )
        tables[spec_seed] = table
        if not args.report_only:
            jobs += table.jobs()
    runner = Runner(root / "logs", args.workers, args.threads)
    runner.run(jobs)
    summary = summarise({s: t.collect() for s, t in tables.items()}, manifests)
    summary.update(
        {
            "specialist_seeds": specialist_seeds,
            "calm_seeds": list(calm_seeds),
            "build_seconds": build_seconds,
            **measured_on(runner.seconds, time.perf_counter() - start, args.workers, args.threads),
            "fast": args.fast,
        }
    )
    write_seeds_table(root, summary, format_report(summary))


if __name__ == "__main__":
    main()
