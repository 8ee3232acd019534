"""The paper's key-value arithmetic experiment (CALM section 4.1), end to end: `make demo`.

1. the two specialists (built on first use, then reused from the cache),
2. CALM: bridges between the augment (knows every key's value) and the anchor (arithmetic only),
   trained on expressions over the 20% composition keys,
3. the paper's controls: CALM with a randomly initialised augment of the same shape, and LoRA on
   the anchor with the bridges' parameter budget (a small learning-rate sweep, best by
   validation loss),
4. comm-eval of every system on the held-out keys, numeric arithmetic and key lookup,
5. the table, printed and written to <output_root>/table.json.

Each step is the same config comm-train / comm-eval use (composed in this process, so the
models load once per step and Python starts once). `--fast` runs tiny sizes in seconds (the
test suite uses it); it checks the plumbing, not the accuracy.

    python scripts/kv_demo.py                     # the real experiment
    python scripts/kv_demo.py --fast --output-root /tmp/demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYSTEMS = ("m_A alone", "m_B alone", "LoRA on m_B", "CALM", "CALM, random m_A")
COLUMNS = ("kv_arithmetic_heldout", "kv_substitution_heldout", "numeric_arithmetic", "key_lookup")

# Tiny everything: seconds, for tests of the pipeline.
FAST_TRAIN = [
    "experiment=kv_smoke",
    "trainer.max_steps=4",
    "trainer.save_every=null",
    "trainer.eval_every=null",
]
FAST_EVAL = ["generation.batch_size=16"] + [f"tasks.{task}.data.kv.eval_examples=8" for task in COLUMNS]


def compose_config(config_name: str, overrides: list[str], output_dir: Path):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from comm_cli.cli import config_dir
    from comm_cli.schema import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            config_name=config_name,
            overrides=[*overrides, f"output_dir={output_dir}"],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def train(root: Path, name: str, overrides: list[str]) -> dict:
    from comm_cli.train import run

    start = time.perf_counter()
    run_dir = root / name
    cfg = compose_config(
        "train", [f"name={name}", f"output_root={root}", "overwrite=true", *overrides], run_dir
    )
    run(cfg)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    summary["seconds"] = time.perf_counter() - start
    print(f"[demo] trained {name} in {summary['seconds']:.0f} s", flush=True)
    return summary


def evaluate(root: Path, name: str, overrides: list[str]) -> dict[str, float]:
    from comm_cli.eval import run

    cfg = compose_config("eval", [f"output_root={root}", *overrides], root / "eval" / name)
    rows = run(cfg)
    return {
        row["task"]: row["value"] for row in rows if row["metric"] == "exact_match" and not row.get("variant")
    }, rows


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
    parser.add_argument("--logger", default="none", help="logger for every step (wandb, tensorboard, none)")
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(args.output_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = [f"logger={args.logger}", "trainer.progress_bar=false"] + (FAST_TRAIN if args.fast else [])

    # 1-2. specialists (first use builds them) and CALM
    calm = train(root, "calm", base)
    kv_dir = Path(compose_config("train", base, root / "calm").kv.dir)
    eval_base = [f"logger={args.logger}", f"kv.dir={kv_dir}"] + (FAST_EVAL if args.fast else [])

    # 3. controls
    random_dir = random_augment(root, kv_dir, seed=1234)
    calm_random = train(root, "calm_random_augment", base + [f"augment.name_or_path={random_dir}"])
    lora_runs = {}
    for lr in args.lora_lrs.split(","):
        lora_runs[lr] = train(root, f"lora_lr{lr}", base + ["method=lora", f"optimizer.lr={lr}"])
    best_lr = min(lora_runs, key=lambda lr: lora_runs[lr]["metrics"].get("val/loss", float("inf")))
    print(f"[demo] LoRA sweep {args.lora_lrs}: best lr {best_lr} by validation loss", flush=True)

    # 4. evaluation of every system
    calm_dir, random_calm_dir = root / "calm" / "composition", root / "calm_random_augment" / "composition"
    lora_dir = root / f"lora_lr{best_lr}" / "adapter"
    results = {
        "m_A alone": evaluate(root, "m_A", eval_base + ["model=augment", "checkpoint=null"]),
        "m_B alone": evaluate(root, "m_B", eval_base + ["model=anchor", "checkpoint=null"]),
        "LoRA on m_B": evaluate(root, "lora", eval_base + ["model=lora", f"checkpoint={lora_dir}"]),
        "CALM": evaluate(
            root, "calm", eval_base + ["model=calm", f"checkpoint={calm_dir}", "bridges_off=true"]
        ),
        "CALM, random m_A": evaluate(
            root, "calm_random", eval_base + ["model=calm", f"checkpoint={random_calm_dir}"]
        ),
    }
    params = {
        "m_A alone": 0,
        "m_B alone": 0,
        "LoRA on m_B": lora_runs[best_lr]["parameters"]["trainable"],
        "CALM": calm["parameters"]["trainable"],
        "CALM, random m_A": calm_random["parameters"]["trainable"],
    }
    rows = [
        {"system": s, **{c: results[s][0].get(c) for c in COLUMNS}, "trainable_params": params[s]}
        for s in SYSTEMS
    ]
    bridges_off = {
        r["task"]: r["value"] for r in results["CALM"][1] if r.get("variant") and r["metric"] == "exact_match"
    }
    elapsed = time.perf_counter() - start
    table = {
        "rows": rows,
        "calm_bridges_off": bridges_off,
        "lora_sweep": {lr: run["metrics"].get("val/loss") for lr, run in lora_runs.items()},
        "lora_best_lr": best_lr,
        "seconds": round(elapsed, 1),
        "fast": args.fast,
    }
    path = root / "table.json"
    tmp = path.with_name(".table.json.tmp")
    tmp.write_text(json.dumps(table, indent=2) + "\n")
    os.replace(tmp, path)
    print()
    print(format_table(rows))
    print(
        f"\nCALM with its bridges off (= m_B): numeric_arithmetic {100 * bridges_off.get('numeric_arithmetic', 0):.1f}%"
    )
    print(f"[demo] {elapsed:.0f} s in all; table written to {path}")


if __name__ == "__main__":
    main()
