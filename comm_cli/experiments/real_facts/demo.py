"""The real-facts experiment end to end: `make demo-real`.

1. the bases, built on first use and then reused from the cache (COMM_CACHE_DIR): the anchor
   converted from the wheel's GGUF, its city skill (printed), the world, the specialist, its
   untrained starting point (generic) and a random augment;
2. CALM (bridges between the specialist and the anchor) trained on questions about the
   composition people; the same with the generic and the random augment; LoRA on the anchor with
   the bridges' parameter budget (a learning-rate sweep, best by validation loss on the
   validation people);
3. comm-eval of every system on the held-out people (one hop, two hops) and on the anchor's own
   city -> country skill (CALM with the bridges on and off);
4. the table, printed and written to <output_root>/table.json, and the attention pictures.

Every training and evaluation is a plain `comm-train` / `comm-eval` run (logs under
<output_root>/logs/), run --workers at a time with --threads threads each. ``seeds.py`` runs the
same table over several builds of the bases and CALM seeds (`make demo-real-seeds`).

    make demo-real                                          # scripts/real_facts_demo.py
    python scripts/real_facts_demo.py --calm-seeds 0,1,2    # CALM over three training seeds
    python scripts/real_facts_demo.py --lora-lrs 3e-4,1e-3,3e-3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from comm_cli.experiments.jobs import Job, Runner, eval_job, train_job
from comm_cli.experiments.shared import format_table

SYSTEMS = (
    "Anchor alone",
    "Specialist alone",
    "LoRA on the anchor",
    "CALM",
    "CALM, generic augment",
    "CALM, random augment",
)
SUITE = "suite=real_facts"


def compose_train_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from comm_cli.cli import config_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, "output_dir=unused"])
    return OmegaConf.to_object(cfg)


def exact_matches(root: Path, name: str, variant: str | None = None) -> dict[str, float]:
    rows = json.loads((root / f"eval_{name}" / "results.json").read_text())["results"]
    return {
        r["task"]: r["value"] for r in rows if r["metric"] == "exact_match" and r.get("variant") == variant
    }


def summary(root: Path, name: str) -> dict:
    return json.loads((root / name / "train_summary.json").read_text())


@dataclass
class Bases:
    """One build of the experiment's bases (world, specialist, generic and random augments)."""

    cfg: object  # the composed comm-train config that describes them
    dir: Path
    manifest: dict
    world: dict

    @property
    def cities_kept(self) -> int:
        return sum(r["correct"] for r in self.world["city_skill"].values())

    def describe(self) -> dict:
        return {
            "dir": str(self.dir),
            "cities_kept": self.cities_kept,
            "cities_candidates": len(self.world["city_skill"]),
            "specialist_recall": self.manifest["specialist"]["recall_all_people"],
            "generic_recall": self.manifest["generic"]["recall_all_people"],
        }


def prepare_bases(overrides: list[str]) -> Bases:
    """Build (or reuse from the cache) the bases the overrides describe, and say what they hold."""
    from comm_cli.experiments.real_facts.setup import prepare

    start = time.perf_counter()
    cfg = compose_train_config(overrides)
    prepare(cfg)
    facts_dir = Path(cfg.facts.dir)
    bases = Bases(
        cfg,
        facts_dir,
        json.loads((facts_dir / "manifest.json").read_text()),
        json.loads((facts_dir / "world.json").read_text()),
    )
    world = bases.world
    print(
        f"[demo] bases ready in {facts_dir} ({time.perf_counter() - start:.0f} s): the anchor names the country of "
        f"{bases.cities_kept} of {len(world['city_skill'])} candidate cities; the world has {len(world['home'])} people in "
        f"{len(world['cities'])} cities ({len(world['composition'])} composition, {len(world['validation'])} "
        f"validation, {len(world['heldout'])} held-out); the specialist completes '<name> lives in' correctly "
        f"for {100 * bases.manifest['specialist']['recall_all_people']:.1f}% of the people "
        f"(its untrained starting point: {100 * bases.manifest['generic']['recall_all_people']:.1f}%)",
        flush=True,
    )
    return bases


@dataclass
class FactsTable:
    """Every run behind one table over one build of the bases: CALM trained with each of
    ``calm_seeds``, CALM with the generic and the random augment, the LoRA sweep, and the
    evaluations. Runs live under ``root``; job keys start with ``prefix`` so that several tables
    can share one Runner."""

    root: Path
    bases: Bases
    calm_seeds: tuple[int, ...] = (0,)
    lora_lrs: tuple[str, ...] = ("3e-4", "1e-3")
    train_overrides: list[str] = field(default_factory=list)
    logger: str = "none"
    prefix: str = ""
    lora_loss: dict[str, float] = field(default_factory=dict)

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    @property
    def calm_runs(self) -> list[str]:
        return [f"calm_seed{s}" for s in self.calm_seeds]

    @property
    def lora_runs(self) -> list[str]:
        return [f"lora_lr{lr}" for lr in self.lora_lrs]

    def _train(self) -> list[str]:
        # The anchor's frozen prefix (trainer.anchor_prefix_layers of the experiment) is computed
        # once and every training run reads it: all draw the same questions (data.facts.seed);
        # the CALM seeds vary the bridges' initialisation and the data order.
        prefix_dir = self.root / "anchor_prefix"
        return [*self.train_overrides, "data.facts.seed=0", f"trainer.anchor_prefix_cache_dir={prefix_dir}"]

    def _eval(self) -> list[str]:
        # comm-eval reads the very bases the trainings use
        cfg = self.bases.cfg
        return [SUITE, f"logger={self.logger}", f"facts.root={cfg.facts.root}", f"facts.dir={self.bases.dir}"]

    def best_lora(self) -> str:
        if not self.lora_loss:
            for lr, name in zip(self.lora_lrs, self.lora_runs):
                self.lora_loss[lr] = summary(self.root, name)["metrics"].get("val/loss", float("inf"))
            print(
                f"[demo] {self.prefix}LoRA sweep, validation loss {self.lora_loss}: "
                f"best lr {min(self.lora_loss, key=self.lora_loss.get)}"
            )
        return f"lora_lr{min(self.lora_loss, key=self.lora_loss.get)}"

    def prefix_jobs(self) -> list[Job]:
        """The shared anchor prefix, to run before ``jobs`` with the machine to itself (none when
        the experiment does not cache it)."""
        if not self.bases.cfg.trainer.cache_anchor_prefix:
            return []
        train = self._train() + ["trainer.prepare_only=true"]
        return [train_job("anchor_prefix", self.root, train, key=self.key("anchor_prefix"))]

    def jobs(self) -> list[Job]:
        """Trainings first (long), evaluations as soon as what they read exists."""
        root, key, train, base = self.root, self.key, self._train(), self._eval()
        augment = {"generic": self.bases.dir / "generic", "random": self.bases.dir / "random"}
        jobs = [
            train_job(name, root, train + [f"seed={s}"], key=key(name))
            for name, s in zip(self.calm_runs, self.calm_seeds)
        ]
        jobs += [
            train_job(
                f"calm_{kind}",
                root,
                train + [f"seed={self.calm_seeds[0]}", f"augment.name_or_path={path}"],
                key=key(f"calm_{kind}"),
            )
            for kind, path in augment.items()
        ]
        jobs += [
            train_job(name, root, train + ["method=lora", f"optimizer.lr={lr}"], key=key(name))
            for name, lr in zip(self.lora_runs, self.lora_lrs)
        ]
        # CALM with the bridges on and off (the anchor's own skill); its controls with them on
        off = {name: ["bridges_off=true"] for name in self.calm_runs}
        jobs += [
            eval_job(
                name,
                root,
                base + [f"checkpoint={root / name / 'composition'}", *off.get(name, [])],
                (key(name),),
                key=key(f"eval_{name}"),
            )
            for name in self.calm_runs + [f"calm_{kind}" for kind in augment]
        ]
        jobs += [
            eval_job("anchor", root, base + ["model=anchor", "checkpoint=null"], key=key("eval_anchor")),
            eval_job(
                "specialist", root, base + ["model=augment", "checkpoint=null"], key=key("eval_specialist")
            ),
            eval_job(
                "lora",
                root,
                lambda: base + ["model=lora", f"checkpoint={root / self.best_lora() / 'adapter'}"],
                tuple(key(name) for name in self.lora_runs),
                key=key("eval_lora"),
            ),
        ]
        return jobs

    def collect(self) -> dict:
        """The finished table: the rows (CALM: the mean over its seeds), each CALM seed's
        results (bridges on, and the anchor's skill with them off) and the LoRA sweep."""
        root, best = self.root, self.best_lora()
        calm_results = [exact_matches(root, name) for name in self.calm_runs]
        calm_off = [exact_matches(root, name, "bridges off") for name in self.calm_runs]
        results = {
            "Anchor alone": exact_matches(root, "anchor"),
            "Specialist alone": exact_matches(root, "specialist"),
            "LoRA on the anchor": exact_matches(root, "lora"),
            "CALM": {k: statistics.mean(r[k] for r in calm_results) for k in calm_results[0]},
            "CALM, generic augment": exact_matches(root, "calm_generic"),
            "CALM, random augment": exact_matches(root, "calm_random"),
        }
        params = {
            "Anchor alone": 0,
            "Specialist alone": 0,
            "LoRA on the anchor": summary(root, best)["parameters"]["trainable"],
            "CALM": summary(root, self.calm_runs[0])["parameters"]["trainable"],
            "CALM, generic augment": summary(root, "calm_generic")["parameters"]["trainable"],
            "CALM, random augment": summary(root, "calm_random")["parameters"]["trainable"],
        }
        rows = [
            {
                "system": system,
                "one_hop_heldout": results[system]["one_hop_heldout"],
                "two_hop_heldout": results[system]["two_hop_heldout"],
                "anchor_skill": results[system]["skill"],
                "trainable_params": params[system],
            }
            for system in SYSTEMS
        ]
        calm_runs = [
            {
                "seed": seed,
                "one_hop_heldout": on["one_hop_heldout"],
                "two_hop_heldout": on["two_hop_heldout"],
                "anchor_skill": on["skill"],
                "anchor_skill_bridges_off": off["skill"],
                "steps_to_half": steps_to_half(root / name),
            }
            for seed, name, on, off in zip(self.calm_seeds, self.calm_runs, calm_results, calm_off)
        ]
        return {
            "rows": rows,
            "calm_runs": calm_runs,
            "calm_bridges_off_anchor_skill": statistics.mean(r["skill"] for r in calm_off),
            "lora_sweep_val_loss": self.lora_loss,
            "lora_best": best,
        }


# Held-out validation accuracy a training run may log over training (its metrics.jsonl step log):
# the first step at which one of these reaches 50% is where the bridges left the plateau.
VALIDATION_ACCURACY = ("val/exact_match", "val/accuracy")


def steps_to_half(run_dir: Path) -> int | None:
    """The first logged step at which held-out validation accuracy reached 50%, from the run's
    step log (``metrics.jsonl``); None when the log has no such accuracy or it never got there."""
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        return None
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if any(entry.get(name, 0.0) >= 0.5 for name in VALIDATION_ACCURACY):
            return entry["step"]
    return None


def add_common_arguments(parser: argparse.ArgumentParser, default_root: str, calm_seeds: str) -> None:
    parser.add_argument("--output-root", default=default_root)
    parser.add_argument("--calm-seeds", default=calm_seeds, help="training seeds of CALM")
    parser.add_argument("--lora-lrs", default="3e-4,1e-3", help="LoRA learning-rate sweep")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--logger", default="none", help="tracker of every run (wandb, tensorboard, none)")
    parser.add_argument(
        "--experiment",
        default="real_facts",
        help="the experiment config (real_facts_smoke: tiny, plumbing only)",
    )
    parser.add_argument("overrides", nargs="*", help="comm-train overrides for every training run")


def base_overrides(args) -> list[str]:
    """comm-train overrides of every run (and of the bases) of a table."""
    return [
        f"experiment={args.experiment}",
        f"logger={args.logger}",
        "trainer.progress_bar=false",
        *args.overrides,
    ]


def run_tables(tables: list[FactsTable], workers: int, threads: int, logs: Path) -> Runner:
    """Every table's anchor prefix first, one at a time with the whole machine, then every
    table's runs ``workers`` at a time; returns the runner (its ``seconds`` per job)."""
    runner = Runner(logs, workers, threads)
    alone = Runner(logs, 1, workers * threads)
    alone.run([job for table in tables for job in table.prefix_jobs()])
    runner.seconds.update(alone.seconds)
    runner.run([job for table in tables for job in table.jobs()])
    return runner


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, "outputs/real_facts", "0")
    parser.add_argument("--attention-examples", type=int, default=4)
    args = parser.parse_args(argv)

    root = Path(args.output_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # 1. the bases, once, before anything runs in parallel
    base = base_overrides(args)
    bases = prepare_bases(base)
    # 2-3. trainings and evaluations
    seeds = [int(s) for s in args.calm_seeds.split(",")]
    table_runs = FactsTable(root, bases, tuple(seeds), tuple(args.lora_lrs.split(",")), base, args.logger)
    runner = run_tables([table_runs], args.workers, args.threads, root / "logs")

    # 4. the table
    collected = table_runs.collect()
    rows = collected["rows"]
    attention = attention_pictures(
        root, table_runs.calm_runs[0], bases.cfg, args.attention_examples, args.logger
    )
    elapsed = time.perf_counter() - start
    table = {
        "rows": rows,
        "calm_seeds": {
            f"seed{r['seed']}": {k: r[k] for k in ("one_hop_heldout", "two_hop_heldout", "anchor_skill")}
            for r in collected["calm_runs"]
        },
        "calm_bridges_off_anchor_skill": collected["calm_bridges_off_anchor_skill"],
        "lora_sweep_val_loss": collected["lora_sweep_val_loss"],
        "lora_best": collected["lora_best"],
        "attention_pictures": [str(p) for p in attention],
        "bases": bases.describe(),
        "job_seconds": {k: round(v, 1) for k, v in runner.seconds.items()},
        "seconds": round(elapsed, 1),
        "workers": args.workers,
        "threads_per_worker": args.threads,
    }
    from comm_cli.atomic import atomic_write_text

    path = root / "table.json"
    atomic_write_text(path, json.dumps(table, indent=2) + "\n")
    print()
    print(format_table(rows, ["one_hop_heldout", "two_hop_heldout", "anchor_skill"]))
    off = table["calm_bridges_off_anchor_skill"]
    print(
        f"\nthe anchor's own city -> country skill: bridges off {100 * off:.1f}%, on {100 * rows[3]['anchor_skill']:.1f}%"
    )
    if len(seeds) > 1:
        values = [r["one_hop_heldout"] for r in collected["calm_runs"]]
        print(f"CALM one hop over seeds {seeds}: {', '.join(f'{100 * v:.1f}%' for v in values)}")
    print(f"[demo] {elapsed:.0f} s in all; table written to {path}")


def attention_pictures(root: Path, run: str, cfg, examples: int, logger_name: str) -> list[Path]:
    """PNGs of the trained bridges' attention on a few held-out one-hop questions."""
    import torch

    from comm_cli.compose import ComposedModel
    from comm_cli.experiments.real_facts import attention, tasks
    from comm_cli.experiments.real_facts.data import load_world
    from comm_cli.training.models import load_tokenizer

    world = load_world(cfg.facts.dir)
    model = ComposedModel.from_pretrained(root / run / "composition").eval()
    tokenizer = load_tokenizer(model.config.anchor.name_or_path, model.config.anchor)
    torch.set_num_threads(2)
    results = []
    for person in world.heldout[:examples]:
        example = tasks.one_hop(world, person)
        results.append(
            attention.answer_attention(
                model, tokenizer, example["prompt"], example["completion"], world.home[person]
            )
        )
    paths = attention.plot(results, model.bridge_connections, root)
    if logger_name in ("wandb", "tensorboard"):
        _log_images(root, paths, logger_name)
    return paths


def _log_images(root: Path, paths: list[Path], logger_name: str) -> None:
    """Send the pictures to the tracker of the demo's own run (images, not numbers)."""
    import numpy as np
    from accelerate import Accelerator
    from PIL import Image

    from comm_cli.schema import LoggerConfig
    from comm_cli.training.trackers import log_with, start_trackers

    logger_cfg = LoggerConfig(name=logger_name)
    accelerator = Accelerator(cpu=True, log_with=log_with(logger_cfg), project_dir=str(root))
    start_trackers(accelerator, logger_cfg, root, {"demo": "real_facts"}, None, "real_facts_attention")
    images = {p.stem: [np.asarray(Image.open(p).convert("RGB"))] for p in paths}
    for tracker in accelerator.trackers:
        tracker.log_images(images, step=0)
    accelerator.end_training()


if __name__ == "__main__":
    main()
