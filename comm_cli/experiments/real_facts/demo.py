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
<output_root>/logs/), run --workers at a time with --threads threads each.

    make demo-real                                          # scripts/real_facts_demo.py
    python scripts/real_facts_demo.py --calm-seeds 0,1,2    # CALM over three training seeds
    python scripts/real_facts_demo.py --lora-lrs 3e-4,1e-3,3e-3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from comm_cli.experiments.jobs import Runner, eval_job, train_job
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-root", default="outputs/real_facts")
    parser.add_argument("--calm-seeds", default="0", help="training seeds of CALM (the row is their mean)")
    parser.add_argument("--lora-lrs", default="3e-4,1e-3", help="LoRA learning-rate sweep")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--logger", default="none", help="tracker of every run (wandb, tensorboard, none)")
    parser.add_argument(
        "--experiment",
        default="real_facts",
        help="the experiment config (real_facts_smoke: tiny, plumbing only)",
    )
    parser.add_argument("--attention-examples", type=int, default=4)
    parser.add_argument("overrides", nargs="*", help="comm-train overrides for every training run")
    args = parser.parse_args(argv)

    root = Path(args.output_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = [
        f"experiment={args.experiment}",
        f"logger={args.logger}",
        "trainer.progress_bar=false",
        *args.overrides,
    ]

    # 1. the bases, once, before anything runs in parallel
    cfg = compose_train_config(base)
    from comm_cli.experiments.real_facts.setup import prepare

    prepare(cfg)
    facts_dir = Path(cfg.facts.dir)
    bases = json.loads((facts_dir / "manifest.json").read_text())
    world = json.loads((facts_dir / "world.json").read_text())
    kept = sum(r["correct"] for r in world["city_skill"].values())
    print(
        f"[demo] bases ready in {facts_dir} ({time.perf_counter() - start:.0f} s): the anchor names the country of "
        f"{kept} of {len(world['city_skill'])} candidate cities; the world has {len(world['home'])} people in "
        f"{len(world['cities'])} cities ({len(world['composition'])} composition, {len(world['validation'])} "
        f"validation, {len(world['heldout'])} held-out); the specialist completes '<name> lives in' correctly "
        f"for {100 * bases['specialist']['recall_all_people']:.1f}% of the people "
        f"(its untrained starting point: {100 * bases['generic']['recall_all_people']:.1f}%)",
        flush=True,
    )

    # 2-3. trainings first (long), evaluations as soon as what they read exists
    runner = Runner(root / "logs", args.workers, args.threads)
    seeds = [int(s) for s in args.calm_seeds.split(",")]
    lrs = args.lora_lrs.split(",")
    # comm-eval reads the very bases the trainings use
    eval_base = [SUITE, f"logger={args.logger}", f"facts.root={cfg.facts.root}", f"facts.dir={facts_dir}"]
    calm_runs = [f"calm_seed{s}" for s in seeds]
    lora_runs = [f"lora_lr{lr}" for lr in lrs]
    lora_loss: dict[str, float] = {}

    def best_lora() -> str:
        if not lora_loss:
            for lr, name in zip(lrs, lora_runs):
                lora_loss[lr] = summary(root, name)["metrics"].get("val/loss", float("inf"))
            print(
                f"[demo] LoRA sweep, validation loss {lora_loss}: best lr {min(lora_loss, key=lora_loss.get)}"
            )
        return f"lora_lr{min(lora_loss, key=lora_loss.get)}"

    augment = {"generic": facts_dir / "generic", "random": facts_dir / "random"}

    # The anchor's frozen prefix (trainer.anchor_prefix_layers of the experiment) is computed
    # once, by a job that has the machine to itself, and every training run reads it: all draw
    # the same questions (data.facts.seed); the CALM seeds vary the bridges' initialisation and
    # the data order.
    base = base + ["data.facts.seed=0", f"trainer.anchor_prefix_cache_dir={root / 'anchor_prefix'}"]
    if cfg.trainer.cache_anchor_prefix:
        alone = Runner(root / "logs", 1, args.workers * args.threads)
        alone.run([train_job("anchor_prefix", root, base + ["trainer.prepare_only=true"])])
        runner.seconds.update(alone.seconds)
    jobs = [train_job(name, root, base + [f"seed={s}"]) for name, s in zip(calm_runs, seeds)]
    jobs += [
        train_job(f"calm_{kind}", root, base + [f"seed={seeds[0]}", f"augment.name_or_path={path}"])
        for kind, path in augment.items()
    ]
    jobs += [
        train_job(name, root, base + ["method=lora", f"optimizer.lr={lr}"])
        for name, lr in zip(lora_runs, lrs)
    ]
    jobs += [
        eval_job(
            name, root, eval_base + [f"checkpoint={root / name / 'composition'}", "bridges_off=true"], (name,)
        )
        for name in calm_runs
    ]
    jobs += [
        eval_job(
            f"calm_{kind}",
            root,
            eval_base + [f"checkpoint={root / f'calm_{kind}' / 'composition'}"],
            (f"calm_{kind}",),
        )
        for kind in augment
    ]
    jobs += [
        eval_job("anchor", root, eval_base + ["model=anchor", "checkpoint=null"]),
        eval_job("specialist", root, eval_base + ["model=augment", "checkpoint=null"]),
        eval_job(
            "lora",
            root,
            lambda: eval_base + ["model=lora", f"checkpoint={root / best_lora() / 'adapter'}"],
            tuple(lora_runs),
        ),
    ]
    runner.run(jobs)
    best = best_lora()

    # 4. the table
    calm_results = [exact_matches(root, name) for name in calm_runs]
    calm_off = [exact_matches(root, name, "bridges off") for name in calm_runs]
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
        "CALM": summary(root, calm_runs[0])["parameters"]["trainable"],
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
    attention = attention_pictures(root, calm_runs[0], cfg, args.attention_examples, args.logger)
    elapsed = time.perf_counter() - start
    table = {
        "rows": rows,
        "calm_seeds": {
            f"seed{s}": {
                "one_hop_heldout": r["one_hop_heldout"],
                "two_hop_heldout": r["two_hop_heldout"],
                "anchor_skill": r["skill"],
            }
            for s, r in zip(seeds, calm_results)
        },
        "calm_bridges_off_anchor_skill": statistics.mean(r["skill"] for r in calm_off),
        "lora_sweep_val_loss": lora_loss,
        "lora_best": best,
        "attention_pictures": [str(p) for p in attention],
        "bases": {
            "dir": str(facts_dir),
            "cities_kept": kept,
            "cities_candidates": len(world["city_skill"]),
            "specialist_recall": bases["specialist"]["recall_all_people"],
            "generic_recall": bases["generic"]["recall_all_people"],
        },
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
        values = [r["one_hop_heldout"] for r in calm_results]
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
