"""The real-facts table over seeds: `make demo-real-seeds`.

One run of `make demo-real` is one build of the bases and one CALM training; the result moves with
both (and with the machine that built the specialist, through float rounding). This script builds
the bases from several seeds (``--specialist-seeds``: ``facts.settings.seed``, the world and the
specialist's weights; seed 0 is the demo's), trains CALM with several training seeds on each
(``--calm-seeds``), runs every control once per build, and prints each run's numbers and their
mean, minimum and standard deviation, against the targets of the experiment (one hop minimum
>= 75% and mean >= 80%, two hops mean >= 70%, every control <= 10% one hop, the anchor's own
skill within 2 points with the bridges on). It writes ``<output_root>/seeds.json``.

    make demo-real-seeds                                            # 2 specialist seeds x 3 CALM seeds
    python scripts/real_facts_seeds.py --specialist-seeds 0,1,2 --calm-seeds 0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from comm_cli.experiments.real_facts.demo import (
    FactsTable,
    add_common_arguments,
    base_overrides,
    prepare_bases,
    run_tables,
)
from comm_cli.experiments.shared import measured_on, stats, write_seeds_table

COLUMNS = ("one_hop_heldout", "two_hop_heldout")
CONTROLS = (
    "Anchor alone",
    "Specialist alone",
    "LoRA on the anchor",
    "CALM, generic augment",
    "CALM, random augment",
)
# the experiment's targets (fractions; skill: points of the anchor's own skill)
ONE_HOP_MIN, ONE_HOP_MEAN, TWO_HOP_MEAN, CONTROL_MAX, SKILL_GAP = 0.75, 0.80, 0.70, 0.10, 0.02


def summarise(tables: dict[int, dict]) -> dict:
    """Per-run rows, per-control rows and their aggregates, from each specialist seed's
    ``FactsTable.collect()``."""
    runs, controls = [], {name: [] for name in CONTROLS}
    for spec_seed, table in tables.items():
        by_system = {row["system"]: row for row in table["rows"]}
        anchor_skill = by_system["Anchor alone"]["anchor_skill"]
        for run in table["calm_runs"]:
            runs.append(
                {
                    "specialist_seed": spec_seed,
                    "calm_seed": run["seed"],
                    **{c: run[c] for c in COLUMNS},
                    "anchor_skill": run["anchor_skill"],
                    "anchor_skill_bridges_off": run["anchor_skill_bridges_off"],
                    "anchor_skill_alone": anchor_skill,
                    "steps_to_half": run["steps_to_half"],
                }
            )
        for name in CONTROLS:
            controls[name].append({"specialist_seed": spec_seed, **{c: by_system[name][c] for c in COLUMNS}})
    skill_gaps = [r["anchor_skill"] - r["anchor_skill_alone"] for r in runs]
    reached = [r["steps_to_half"] for r in runs if r["steps_to_half"] is not None]
    return {
        "runs": runs,
        "calm": {c: stats([r[c] for r in runs]) for c in COLUMNS},
        "controls": {
            name: {"runs": rows, **{c: stats([r[c] for r in rows]) for c in COLUMNS}}
            for name, rows in controls.items()
        },
        "anchor_skill_change": {"min": min(skill_gaps), "max": max(skill_gaps)},
        "steps_to_half": stats(reached) if reached else None,
    }


def targets(summary: dict) -> dict[str, bool]:
    """Whether each of the experiment's targets holds over these runs."""
    one, two = summary["calm"]["one_hop_heldout"], summary["calm"]["two_hop_heldout"]
    gap = summary["anchor_skill_change"]
    return {
        f"one hop minimum >= {100 * ONE_HOP_MIN:.0f}%": one["min"] >= ONE_HOP_MIN,
        f"one hop mean >= {100 * ONE_HOP_MEAN:.0f}%": one["mean"] >= ONE_HOP_MEAN,
        f"two hops mean >= {100 * TWO_HOP_MEAN:.0f}%": two["mean"] >= TWO_HOP_MEAN,
        f"every control one hop <= {100 * CONTROL_MAX:.0f}%": all(
            c["one_hop_heldout"]["max"] <= CONTROL_MAX for c in summary["controls"].values()
        ),
        f"the anchor's skill within {100 * SKILL_GAP:.0f} points with the bridges on": max(
            -gap["min"], gap["max"]
        )
        <= SKILL_GAP + 1e-9,
    }


def format_report(summary: dict) -> str:
    pct = lambda v: f"{100 * v:5.1f}%"  # noqa: E731
    lines = ["specialist_seed  calm_seed  one_hop  two_hops  skill on (alone)  steps_to_50%"]
    for r in summary["runs"]:
        steps = "n/a" if r["steps_to_half"] is None else str(r["steps_to_half"])
        lines.append(
            f"{r['specialist_seed']:15d}  {r['calm_seed']:9d}  {pct(r['one_hop_heldout']):>7}  "
            f"{pct(r['two_hop_heldout']):>8}  {pct(r['anchor_skill'])} ({pct(r['anchor_skill_alone'])})  {steps:>12}"
        )
    for column, label in zip(COLUMNS, ("one hop", "two hops")):
        s = summary["calm"][column]
        lines.append(
            f"CALM held-out {label} over {s['n']} runs: mean {pct(s['mean'])}, min {pct(s['min'])}, "
            f"max {pct(s['max'])}, std {100 * s['std']:.1f} points"
        )
    for name, c in summary["controls"].items():
        one = ", ".join(pct(r["one_hop_heldout"]) for r in c["runs"])
        two = ", ".join(pct(r["two_hop_heldout"]) for r in c["runs"])
        lines.append(
            f"{name:21} one hop: {one} (mean {pct(c['one_hop_heldout']['mean'])}, max "
            f"{pct(c['one_hop_heldout']['max'])}); two hops: {two}"
        )
    gap = summary["anchor_skill_change"]
    lines.append(
        f"anchor's city -> country skill, bridges on vs the anchor alone: change from "
        f"{100 * gap['min']:+.1f} to {100 * gap['max']:+.1f} points"
    )
    s = summary["steps_to_half"]
    lines.append(
        "steps to 50% held-out validation: "
        + (
            f"mean {s['mean']:.0f}, min {s['min']:.0f}, max {s['max']:.0f} over {s['n']} of {len(summary['runs'])} runs"
            if s
            else "not in the training logs"
        )
    )
    lines += [f"target: {'met' if ok else 'missed'} ({name})" for name, ok in summary["targets"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, "outputs/real_facts_seeds", "0,1,2")
    parser.add_argument("--specialist-seeds", default="0,1", help="facts.settings.seed of each build")
    args = parser.parse_args(argv)
    specialist_seeds = [int(s) for s in args.specialist_seeds.split(",")]
    calm_seeds = tuple(int(s) for s in args.calm_seeds.split(","))

    root = Path(args.output_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tables, build_seconds = {}, {}
    for spec_seed in specialist_seeds:
        train = base_overrides(args) + [f"facts.settings.seed={spec_seed}"]
        t0 = time.perf_counter()
        bases = prepare_bases(train)
        build_seconds[spec_seed] = round(time.perf_counter() - t0, 1)
        tables[spec_seed] = FactsTable(
            root / f"specialists_seed{spec_seed}",
            bases,
            calm_seeds,
            tuple(args.lora_lrs.split(",")),
            train,
            args.logger,
            prefix=f"s{spec_seed}/",
        )
    runner = run_tables(list(tables.values()), args.workers, args.threads, root / "logs")
    summary = summarise({s: t.collect() for s, t in tables.items()})
    summary["targets"] = targets(summary)
    summary.update(
        {
            "specialist_seeds": specialist_seeds,
            "calm_seeds": list(calm_seeds),
            "bases": {s: t.bases.describe() for s, t in tables.items()},
            "lora_best": {s: t.best_lora() for s, t in tables.items()},
            "build_seconds": build_seconds,
            **measured_on(runner.seconds, time.perf_counter() - start, args.workers, args.threads),
        }
    )
    write_seeds_table(root, summary, format_report(summary))


if __name__ == "__main__":
    main()
