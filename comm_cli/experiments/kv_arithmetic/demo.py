"""The paper's key-value arithmetic experiment (CALM section 4.1), end to end: `make demo`.

1. the two specialists (built on first use, then reused from the cache),
2. CALM: bridges between the augment (knows every key's value) and the anchor (arithmetic only),
   trained on expressions over the 20% composition keys,
3. the paper's controls: CALM with a randomly initialised augment of the same shape (same
   budget), and LoRA on the anchor with the bridges' parameter budget (a learning-rate sweep,
   best by validation loss),
4. comm-eval of every system on the held-out keys, numeric arithmetic and key lookup (and, for
   the trained systems, the composition keys they trained on),
5. the table, printed and written to <output_root>/table.json.

Every training and evaluation is a plain `comm-train` / `comm-eval` run (logs under
<output_root>/logs/). Independent runs go to --workers processes with --threads threads each
(default 2 x 1 on this 2-core machine: two single-threaded runs side by side finish sooner than
the same runs one after the other with two threads each).

    make demo                                          # the experiment (scripts/kv_demo.py)
    python scripts/kv_demo.py                          # the same
    python scripts/kv_demo.py --lora-steps 1500        # LoRA with CALM's full step budget
    python scripts/kv_demo.py --fast --output-root /tmp/demo    # tiny sizes: the plumbing only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

# The directory that holds the comm_cli package (a checkout or site-packages): the jobs import it from there.
PACKAGE_ROOT = Path(__file__).resolve().parents[3]

SYSTEMS = ("m_A alone", "m_B alone", "LoRA on m_B", "CALM", "CALM, random m_A")
COLUMNS = ("kv_arithmetic_heldout", "kv_substitution_heldout", "numeric_arithmetic", "key_lookup")
TRAIN_KEYS = "kv_arithmetic_train_keys"
FAST_TRAIN = ["experiment=kv_smoke", "trainer.max_steps=4"]
FAST_EVAL = ["generation.batch_size=16"]


def compose_train_config(overrides: list[str]):
    """The composed comm-train config (to read kv.dir and the specialists' settings)."""
    from hydra import compose, initialize_config_dir

    from comm_cli.cli import config_dir
    from comm_cli.schema import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, "output_dir=unused"])
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg)


class Job:
    """A comm-train / comm-eval run; ``args`` may be a callable evaluated when the job starts
    (after its dependencies, e.g. the best LoRA learning rate)."""

    def __init__(self, module: str, name: str, args, after: tuple[str, ...] = ()):
        self.module, self.name, self.args, self.after = module, name, args, after


class Runner:
    """Runs jobs as subprocesses on --workers worker threads. A free worker takes the first job
    (in the order given) whose dependencies have finished."""

    def __init__(self, root: Path, workers: int, threads: int):
        self.root, self.workers, self.threads = root, workers, threads
        self.seconds: dict[str, float] = {}
        (root / "logs").mkdir(parents=True, exist_ok=True)

    def train(self, name: str, overrides, after: tuple[str, ...] = ()) -> Job:
        head = [
            f"name={name}",
            f"output_root={self.root}",
            "overwrite=true",
            f"trainer.num_threads={self.threads}",
        ]
        return Job("comm_cli.train", name, lambda: head + _resolve(overrides), after)

    def eval(self, name: str, overrides, after: tuple[str, ...] = ()) -> Job:
        head = [f"name=eval_{name}", f"output_root={self.root}", f"num_threads={self.threads}"]
        return Job("comm_cli.eval", f"eval_{name}", lambda: head + _resolve(overrides), after)

    def _run(self, job: Job) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "TOKENIZERS_PARALLELISM": "false"}
        env.pop("WANDB_SERVICE", None)
        env["PYTHONPATH"] = str(PACKAGE_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        log = self.root / "logs" / f"{job.name}.log"
        start = time.perf_counter()
        with open(log, "w") as out:
            status = subprocess.run(
                [sys.executable, "-m", job.module, *job.args()],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,
            ).returncode
        if status != 0:
            tail = "\n".join(log.read_text().splitlines()[-25:])
            raise RuntimeError(f"{job.name} failed (exit {status}); the end of {log}:\n{tail}")
        self.seconds[job.name] = time.perf_counter() - start
        print(f"[demo] {job.name} done in {self.seconds[job.name]:.0f} s", flush=True)

    def run(self, jobs: list[Job]) -> None:
        todo, done, failures = list(jobs), set(), []
        lock = threading.Condition()

        def worker() -> None:
            while True:
                with lock:
                    while True:
                        if failures or not todo:
                            return
                        ready = next((j for j in todo if set(j.after) <= done), None)
                        if ready is not None:
                            todo.remove(ready)
                            break
                        lock.wait()
                try:
                    self._run(ready)
                except RuntimeError as err:
                    with lock:
                        failures.append(err)
                        lock.notify_all()
                    return
                with lock:
                    done.add(ready.name)
                    lock.notify_all()

        threads = [threading.Thread(target=worker) for _ in range(self.workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise SystemExit(f"[demo] {failures[0]}")


def _resolve(overrides):
    return overrides() if callable(overrides) else list(overrides)


def random_augment(root: Path, kv_dir: Path, seed: int) -> Path:
    """An augment of the specialist's exact shape with random weights (the paper's control)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from comm_cli.training.models import load_tokenizer

    target = root / "random_augment"
    if not (target / "config.json").is_file():
        config = AutoConfig.from_pretrained(kv_dir / "augment")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
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


def format_table(rows: list[dict]) -> str:
    header = ["system", *COLUMNS, "trainable_params"]
    lines = [header] + [
        [row["system"], *(f"{100 * row[c]:.1f}%" for c in COLUMNS), f"{row['trainable_params']:,}"]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-root", default="outputs/kv_demo")
    parser.add_argument("--fast", action="store_true", help="tiny sizes, a few steps (checks the pipeline)")
    parser.add_argument("--lora-lrs", default="1e-3,3e-3,1e-2", help="LoRA learning-rate sweep")
    parser.add_argument(
        "--lora-steps", type=int, default=300, help="steps of each LoRA sweep run (CALM's budget: 1500)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--logger", default="none", help="tracker of every run (wandb, tensorboard, none)")
    args = parser.parse_args()

    root = Path(args.output_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = [f"logger={args.logger}", "trainer.progress_bar=false"] + (FAST_TRAIN if args.fast else [])
    lora_steps = 4 if args.fast else args.lora_steps

    # 1. the specialists, once, before anything runs in parallel
    cfg = compose_train_config(base)
    from comm_cli.experiments.kv_arithmetic.setup import prepare

    prepare(cfg)
    kv_dir = Path(cfg.kv.dir)
    print(f"[demo] specialists ready in {kv_dir} ({time.perf_counter() - start:.0f} s)", flush=True)

    # 2-4. CALM, the controls and their evaluations: the long trainings first, the evaluations
    # of the untrained specialists fill gaps, each trained system is scored as soon as it is done.
    runner = Runner(root, args.workers, args.threads)
    random_dir = random_augment(root, kv_dir, seed=1234)
    lrs = args.lora_lrs.split(",")
    eval_base = [f"logger={args.logger}", f"kv.dir={kv_dir}"] + (FAST_EVAL if args.fast else [])
    if args.fast:
        eval_base += [f"tasks.{task}.data.kv.eval_examples=8" for task in COLUMNS]
    train_keys = [f"+task@tasks.{TRAIN_KEYS}={TRAIN_KEYS}"]
    if args.fast:
        train_keys.append(f"tasks.{TRAIN_KEYS}.data.kv.eval_examples=8")
    lora_loss: dict[str, float] = {}

    def best_lora_lr() -> str:
        if not lora_loss:
            for lr in lrs:
                summary = json.loads((root / f"lora_lr{lr}" / "train_summary.json").read_text())
                lora_loss[lr] = summary["metrics"].get("val/loss", float("inf"))
            print(
                f"[demo] LoRA sweep {lora_loss}: best lr {min(lora_loss, key=lora_loss.get)} by validation loss"
            )
        return min(lora_loss, key=lora_loss.get)

    calm_dir, random_calm_dir = root / "calm" / "composition", root / "calm_random_augment" / "composition"
    lora_names = tuple(f"lora_lr{lr}" for lr in lrs)
    runner.run(
        [
            runner.train("calm", base),
            runner.train("calm_random_augment", base + [f"augment.name_or_path={random_dir}"]),
            runner.eval(
                "calm",
                eval_base + train_keys + ["model=calm", f"checkpoint={calm_dir}", "bridges_off=true"],
                ("calm",),
            ),
            runner.eval(
                "calm_random",
                eval_base + train_keys + ["model=calm", f"checkpoint={random_calm_dir}"],
                ("calm_random_augment",),
            ),
            *(
                runner.train(
                    f"lora_lr{lr}",
                    base + ["method=lora", f"optimizer.lr={lr}", f"trainer.max_steps={lora_steps}"],
                )
                for lr in lrs
            ),
            runner.eval("m_A", eval_base + ["model=augment", "checkpoint=null"]),
            runner.eval("m_B", eval_base + ["model=anchor", "checkpoint=null"]),
            runner.eval(
                "lora",
                lambda: (
                    eval_base
                    + train_keys
                    + ["model=lora", f"checkpoint={root / f'lora_lr{best_lora_lr()}' / 'adapter'}"]
                ),
                lora_names,
            ),
        ]
    )
    best_lr = best_lora_lr()
    summaries = {
        name: json.loads((root / name / "train_summary.json").read_text())
        for name in ["calm", "calm_random_augment", f"lora_lr{best_lr}"]
    }

    # 5. the table
    results = {
        "m_A alone": exact_matches(root, "m_A"),
        "m_B alone": exact_matches(root, "m_B"),
        "LoRA on m_B": exact_matches(root, "lora"),
        "CALM": exact_matches(root, "calm"),
        "CALM, random m_A": exact_matches(root, "calm_random"),
    }
    params = {
        "m_A alone": 0,
        "m_B alone": 0,
        "LoRA on m_B": summaries[f"lora_lr{best_lr}"]["parameters"]["trainable"],
        "CALM": summaries["calm"]["parameters"]["trainable"],
        "CALM, random m_A": summaries["calm_random_augment"]["parameters"]["trainable"],
    }
    rows = [
        {"system": s, **{c: results[s].get(c) for c in COLUMNS}, "trainable_params": params[s]}
        for s in SYSTEMS
    ]
    elapsed = time.perf_counter() - start
    table = {
        "rows": rows,
        "calm_bridges_off": exact_matches(root, "calm", "bridges off"),
        "train_keys_kv_arithmetic": {
            s: results[s].get(TRAIN_KEYS) for s in ("LoRA on m_B", "CALM", "CALM, random m_A")
        },
        "lora_sweep_val_loss": lora_loss,
        "lora_best_lr": best_lr,
        "lora_steps": lora_steps,
        "job_seconds": {k: round(v, 1) for k, v in runner.seconds.items()},
        "seconds": round(elapsed, 1),
        "workers": args.workers,
        "threads_per_worker": args.threads,
        "fast": args.fast,
    }
    from comm_cli.atomic import atomic_write_text

    path = root / "table.json"
    atomic_write_text(path, json.dumps(table, indent=2) + "\n")
    print()
    print(format_table(rows))
    off = table["calm_bridges_off"].get("numeric_arithmetic")
    print(
        f"\nCALM with its bridges switched off: numeric_arithmetic {100 * (off or 0):.1f}% (m_B alone: "
        f"{100 * results['m_B alone'].get('numeric_arithmetic', 0):.1f}%)"
    )
    print(
        "kv_arithmetic on the composition (training) keys: "
        + ", ".join(f"{s} {100 * (v or 0):.1f}%" for s, v in table["train_keys_kv_arithmetic"].items())
    )
    print(f"[demo] {elapsed:.0f} s in all; table written to {path}")


if __name__ == "__main__":
    main()
