"""The paper's key-value arithmetic experiment (CALM section 4.1), end to end: `make demo`.

1. the two specialists for ``--seed`` (built on first use, then reused from the cache),
2. CALM: bridges between the augment (knows every key's value) and the anchor (arithmetic only),
   trained on expressions over the 20% composition keys,
3. the paper's controls: CALM with a randomly initialised augment of the same shape (same
   budget), and LoRA on the anchor with the bridges' parameter budget (a learning-rate sweep,
   best by validation loss),
4. comm-eval of every system on the held-out keys, numeric arithmetic and key lookup (and, for
   the trained systems, the composition keys they trained on),
5. the table, printed and written to <output_root>/table.json.

Every training and evaluation is a plain `comm-train` / `comm-eval` run (logs under
<output_root>/logs/), run by ``comm_cli.experiments.jobs.Runner``: --workers processes with
--threads threads each (default 2 x 1 on this 2-core machine). ``seeds.py`` runs the same table
for several specialist seeds and training seeds (`make demo-seeds`).

    make demo                                          # the experiment (scripts/kv_demo.py)
    python scripts/kv_demo.py --seed 1                 # specialists built from seed 1
    python scripts/kv_demo.py --lora-steps 2500        # LoRA with CALM's full step budget
    python scripts/kv_demo.py --fast --output-root /tmp/demo    # tiny sizes: the plumbing only
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from comm_cli.experiments.jobs import Job, Runner, eval_job, train_job
from comm_cli.experiments.shared import format_table

SYSTEMS = ("m_A alone", "m_B alone", "LoRA on m_B", "CALM", "CALM, random m_A")
COLUMNS = ("kv_arithmetic_heldout", "kv_substitution_heldout", "numeric_arithmetic", "key_lookup")
TRAIN_KEYS = "kv_arithmetic_train_keys"
# the tiny sizes of conf/size/tiny.yaml (what experiment=kv_smoke uses), for any kv experiment
FAST_TRAIN = ["+size=tiny", "trainer.max_steps=4"]
FAST_EVAL = ["generation.batch_size=16"]


def compose_train_config(overrides: list[str]):
    """The composed comm-train config (to read kv.dir and the specialists' settings)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from comm_cli.cli import config_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, "output_dir=unused"])
    return OmegaConf.to_object(cfg)


def prepare_specialists(overrides: list[str]) -> tuple[Path, dict]:
    """Build (or reuse) the specialists the overrides describe; their directory and manifest."""
    from comm_cli.experiments.kv_arithmetic.setup import prepare

    cfg = compose_train_config(overrides)
    prepare(cfg)
    kv_dir = Path(cfg.kv.dir)
    manifest = json.loads((kv_dir / "manifest.json").read_text())
    for line in unlearnt_jobs(manifest):
        print(f"[demo] warning: {line}", flush=True)
    return kv_dir, manifest


# Below these a specialist has not learnt its job and the composition has nothing to read (chance
# is 10% for a value, and the anchor's arithmetic is near 98% when it learns).
LEARNT = {("augment", "lookup_all_keys"): 0.9, ("anchor", "arithmetic"): 0.9}


def unlearnt_jobs(manifest: dict) -> list[str]:
    """One line per specialist whose own accuracy says it did not learn its job (so a table built
    on it measures nothing): which model, the accuracy, and what to change."""
    lines = []
    for (model, metric), floor in LEARNT.items():
        value = manifest.get(model, {}).get("accuracy", {}).get(metric)
        if value is not None and value < floor:
            lines.append(
                f"the {model} specialist did not learn its job: {metric} {100 * value:.1f}% (below "
                f"{100 * floor:.0f}%); the composition cannot do better than its controls. Its training "
                f"losses are in the manifest; change its kv.specialists.{model} settings (lr, steps)"
            )
    return lines


def random_augment(root: Path, kv_dir: Path, seed: int) -> Path:
    """An augment of the specialist's exact shape with random weights (the paper's control)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from comm_cli.compose.blocks import is_encoder
    from comm_cli.training.models import load_tokenizer

    target = root / "random_augment"
    if not (target / "config.json").is_file():
        config = AutoConfig.from_pretrained(kv_dir / "augment")
        torch.manual_seed(seed)
        model = (AutoModelForMaskedLM if is_encoder(config) else AutoModelForCausalLM).from_config(config)
        tmp = root / ".random_augment.tmp"
        model.save_pretrained(tmp)
        load_tokenizer(str(kv_dir / "augment")).save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def exact_matches(root: Path, name: str, variant: str | None = None) -> dict[str, float]:
    rows = json.loads((root / f"eval_{name}" / "results.json").read_text())["results"]
    return {
        r["task"]: r["value"] for r in rows if r["metric"] == "exact_match" and r.get("variant") == variant
    }


def value_errors(eval_dir: Path, kv_dir: Path) -> dict[str, dict[str, float]]:
    """Where a composition fails, by the value it had to carry: for each value, how many of the
    composition keys hold it (what the bridges trained on) and the fraction of held-out key slots
    with that value that the substitution got wrong (``kv_substitution_heldout`` predictions)."""
    from comm_cli.experiments.kv_arithmetic.world import KVWorld

    world = KVWorld.load(kv_dir / "world.json")
    training = {v: 0 for v in range(world.num_values)}
    for key in world.composition_keys:
        training[world.values[key]] += 1
    slots = {v: [0, 0] for v in range(world.num_values)}  # value -> [wrong, total]
    for line in (eval_dir / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["task"] != "kv_substitution_heldout" or "(" in row["model"]:
            continue
        keys = [
            row["prompt"][i : i + world.key_length]
            for i in range(0, len(row["prompt"]) - 1, world.key_length + 1)
        ]
        digits = [c for c in str(row["prediction"]).split("=")[0] if c.isdigit()]
        for i, key in enumerate(keys):
            value = world.values[key]
            slots[value][1] += 1
            slots[value][0] += not (i < len(digits) and digits[i] == str(value))
    return {
        str(v): {"composition_keys": training[v], "error": slots[v][0] / max(1, slots[v][1])}
        for v in range(world.num_values)
    }


@dataclass
class KVTable:
    """Every run behind one table: the specialists of one build (``kv_dir``), CALM trained with
    each of ``calm_seeds``, and the controls once. Runs live under ``root``; job keys start with
    ``prefix`` so that several tables can share one Runner."""

    root: Path
    kv_dir: Path
    calm_seeds: tuple[int, ...] = (0,)
    lora_lrs: tuple[str, ...] = ("1e-3", "3e-3", "1e-2")
    lora_steps: int = 300
    train_overrides: list[str] = field(default_factory=list)
    eval_overrides: list[str] = field(default_factory=list)
    fast: bool = False
    prefix: str = ""
    # False for an encoder augment: it cannot write text, so "m_A alone" has no generations to score
    augment_generates: bool = True
    lora_loss: dict[str, float] = field(default_factory=dict)

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def calm_name(self, seed: int) -> str:
        return "calm" if seed == self.calm_seeds[0] else f"calm_seed{seed}"

    def _train_keys(self) -> list[str]:
        out = [f"+task@tasks.{TRAIN_KEYS}={TRAIN_KEYS}"]
        return out + ([f"tasks.{TRAIN_KEYS}.data.kv.eval_examples=8"] if self.fast else [])

    def best_lora_lr(self) -> str:
        if not self.lora_loss:
            for lr in self.lora_lrs:
                summary = json.loads((self.root / f"lora_lr{lr}" / "train_summary.json").read_text())
                self.lora_loss[lr] = summary["metrics"].get("val/loss", float("inf"))
        return min(self.lora_loss, key=self.lora_loss.get)

    def jobs(self) -> list[Job]:
        """The long trainings first; evaluations of the untrained specialists fill the gaps, each
        trained system is scored as soon as it is done."""
        root, key, train, base = self.root, self.key, self.train_overrides, self.eval_overrides
        random_dir = random_augment(root, self.kv_dir, seed=1234)
        jobs = []
        for seed in self.calm_seeds:
            name = self.calm_name(seed)
            jobs.append(train_job(name, root, train + [f"seed={seed}"], key=key(name)))
        jobs.append(
            train_job(
                "calm_random_augment",
                root,
                train + [f"augment.name_or_path={random_dir}"],
                key=key("calm_random_augment"),
            )
        )
        for seed in self.calm_seeds:
            name = self.calm_name(seed)
            checkpoint = root / name / "composition"
            jobs.append(
                eval_job(
                    name,
                    root,
                    base
                    + self._train_keys()
                    + ["model=calm", f"checkpoint={checkpoint}", "bridges_off=true"],
                    after=(key(name),),
                    key=key(f"eval_{name}"),
                )
            )
        jobs.append(
            eval_job(
                "calm_random",
                root,
                base
                + self._train_keys()
                + ["model=calm", f"checkpoint={root / 'calm_random_augment' / 'composition'}"],
                after=(key("calm_random_augment"),),
                key=key("eval_calm_random"),
            )
        )
        lora_steps = 4 if self.fast else self.lora_steps
        for lr in self.lora_lrs:
            jobs.append(
                train_job(
                    f"lora_lr{lr}",
                    root,
                    train + ["method=lora", f"optimizer.lr={lr}", f"trainer.max_steps={lora_steps}"],
                    key=key(f"lora_lr{lr}"),
                )
            )
        if self.augment_generates:
            jobs.append(
                eval_job("m_A", root, base + ["model=augment", "checkpoint=null"], key=key("eval_m_A"))
            )
        jobs.append(eval_job("m_B", root, base + ["model=anchor", "checkpoint=null"], key=key("eval_m_B")))
        jobs.append(
            eval_job(
                "lora",
                root,
                lambda: (
                    base
                    + self._train_keys()
                    + ["model=lora", f"checkpoint={root / f'lora_lr{self.best_lora_lr()}' / 'adapter'}"]
                ),
                after=tuple(key(f"lora_lr{lr}") for lr in self.lora_lrs),
                key=key("eval_lora"),
            )
        )
        return jobs

    def collect(self) -> dict:
        """The finished table: rows for the first CALM seed, and CALM's results for every seed."""
        root, best_lr = self.root, self.best_lora_lr()

        def summary(name: str) -> dict:
            return json.loads((root / name / "train_summary.json").read_text())

        calm = self.calm_name(self.calm_seeds[0])
        results = {
            "m_A alone": exact_matches(root, "m_A") if self.augment_generates else {},
            "m_B alone": exact_matches(root, "m_B"),
            "LoRA on m_B": exact_matches(root, "lora"),
            "CALM": exact_matches(root, calm),
            "CALM, random m_A": exact_matches(root, "calm_random"),
        }
        params = {
            "m_A alone": 0,
            "m_B alone": 0,
            "LoRA on m_B": summary(f"lora_lr{best_lr}")["parameters"]["trainable"],
            "CALM": summary(calm)["parameters"]["trainable"],
            "CALM, random m_A": summary("calm_random_augment")["parameters"]["trainable"],
        }
        rows = [
            {"system": s, **{c: results[s].get(c) for c in COLUMNS}, "trainable_params": params[s]}
            for s in SYSTEMS
        ]
        calm_runs = []
        for seed in self.calm_seeds:
            name = self.calm_name(seed)
            on, off = exact_matches(root, name), exact_matches(root, name, "bridges off")
            calm_runs.append(
                {
                    "seed": seed,
                    **{c: on.get(c) for c in COLUMNS},
                    TRAIN_KEYS: on.get(TRAIN_KEYS),
                    "numeric_arithmetic_bridges_off": off.get("numeric_arithmetic"),
                    "val_loss": summary(name)["metrics"].get("val/loss"),
                    "value_errors": value_errors(root / f"eval_{name}", self.kv_dir),
                }
            )
        return {
            "rows": rows,
            "calm_runs": calm_runs,
            "calm_bridges_off": exact_matches(root, calm, "bridges off"),
            "train_keys_kv_arithmetic": {
                s: results[s].get(TRAIN_KEYS) for s in ("LoRA on m_B", "CALM", "CALM, random m_A")
            },
            "lora_sweep_val_loss": self.lora_loss,
            "lora_best_lr": best_lr,
            "lora_steps": 4 if self.fast else self.lora_steps,
        }


def add_common_arguments(parser: argparse.ArgumentParser, default_root: str) -> None:
    parser.add_argument("--output-root", default=default_root)
    parser.add_argument("--fast", action="store_true", help="tiny sizes, a few steps (checks the pipeline)")
    parser.add_argument("--lora-lrs", default="1e-3,3e-3,1e-2", help="LoRA learning-rate sweep")
    parser.add_argument(
        "--lora-steps", type=int, default=300, help="steps of each LoRA sweep run (CALM's budget: 2500)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--logger", default="none", help="tracker of every run (wandb, tensorboard, none)")
    parser.add_argument(
        "--experiment",
        default="kv_arithmetic",
        help="kv_arithmetic, kv_arithmetic_cross_tokenizer (BPE anchor) or kv_arithmetic_encoder (encoder augment)",
    )


def base_overrides(args, specialist_seed: int) -> tuple[list[str], list[str]]:
    """(comm-train overrides, comm-eval overrides without kv.dir) shared by every run of a table."""
    train = [
        f"experiment={args.experiment}",
        f"logger={args.logger}",
        "trainer.progress_bar=false",
        f"kv.specialists.seed={specialist_seed}",
    ]
    train += FAST_TRAIN if args.fast else []
    evaluation = ["suite=kv_arithmetic", f"logger={args.logger}"] + (FAST_EVAL if args.fast else [])
    if args.fast:
        evaluation += [f"tasks.{task}.data.kv.eval_examples=8" for task in COLUMNS]
    return train, evaluation


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, "outputs/kv_demo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the specialists (world and weights)")
    parser.add_argument("--calm-seed", type=int, default=0, help="training seed of CALM")
    args = parser.parse_args()

    root = Path(args.output_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train, evaluation = base_overrides(args, args.seed)
    print(
        f"[demo] {args.experiment}: specialist seed {args.seed}, CALM training seed {args.calm_seed}",
        flush=True,
    )
    kv_dir, manifest = prepare_specialists(train)
    print(f"[demo] specialists ready in {kv_dir} ({time.perf_counter() - start:.0f} s)", flush=True)

    table = KVTable(
        root=root,
        kv_dir=kv_dir,
        augment_generates=manifest["settings"]["augment"].get("kind", "causal") != "encoder",
        calm_seeds=(args.calm_seed,),
        lora_lrs=tuple(args.lora_lrs.split(",")),
        lora_steps=args.lora_steps,
        train_overrides=train,
        eval_overrides=evaluation + [f"kv.dir={kv_dir}"],
        fast=args.fast,
    )
    runner = Runner(root / "logs", args.workers, args.threads)
    runner.run(table.jobs())
    result = table.collect()
    print(
        f"[demo] LoRA sweep {result['lora_sweep_val_loss']}: best lr {result['lora_best_lr']} by validation loss"
    )
    elapsed = time.perf_counter() - start
    result.update(
        {
            "experiment": args.experiment,
            "specialist_seed": args.seed,
            "calm_seed": args.calm_seed,
            "kv_dir": str(kv_dir),
            "job_seconds": {k: round(v, 1) for k, v in runner.seconds.items()},
            "seconds": round(elapsed, 1),
            "workers": args.workers,
            "threads_per_worker": args.threads,
            "fast": args.fast,
        }
    )
    from comm_cli.atomic import atomic_write_text

    path = root / "table.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    rows = result["rows"]
    print()
    print(format_table(rows, COLUMNS))
    off = result["calm_bridges_off"].get("numeric_arithmetic")
    m_b = next(r for r in rows if r["system"] == "m_B alone")["numeric_arithmetic"]
    print(
        f"\nCALM with its bridges switched off: numeric_arithmetic {100 * (off or 0):.1f}% "
        f"(m_B alone: {100 * (m_b or 0):.1f}%)"
    )
    print(
        "kv_arithmetic on the composition (training) keys: "
        + ", ".join(f"{s} {100 * (v or 0):.1f}%" for s, v in result["train_keys_kv_arithmetic"].items())
    )
    print(
        f"[demo] one run: specialist seed {args.seed}, CALM seed {args.calm_seed}; "
        "`make demo-seeds` gives the mean, minimum and spread over seeds"
    )
    print(f"[demo] {elapsed:.0f} s in all; table written to {path}")


if __name__ == "__main__":
    main()
