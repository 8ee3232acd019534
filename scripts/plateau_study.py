"""Do the bridges leave the plateau, and when? CALM trained under several settings and seeds on
either built-in experiment, with the per-bridge diagnostics logged over training.

Each run is what `comm-train experiment=<E>` builds (``build_calm`` of the composed config, so
every `bridge.*`, `optimizer.*`, `scheduler.*` or `trainer.*` override of a setting means what it
means there), trained by a plain loop with the composition core: the recipe's data, order
(seeded shuffle, drop_last), summed-token loss, gradient clipping and schedule, with the frozen
work computed once per specialist build and reused by every run (the real-facts anchor's first
28 layers, as `trainer.cache_anchor_prefix` does, and the augment's connected-layer states).
Every ``--eval-every`` steps it logs, as one JSON line:

- held-out validation accuracy, teacher-forced: the first city token of the one-hop answer for
  held-out people (real facts; its loss is that token's), every token of the completion for
  expressions over held-out keys (key-value, which equals greedy exact match of the whole
  completion; its loss is over the completion);
- per bridge, on a held-out batch: output/state norm ratio, attention entropy, the attention mass
  at the answer position on the tokens that hold the answer (key-value: the operand's key's last
  character; real facts: the person's name, and the answer position itself, where the specialist
  has already read "<name> lives in"), the gate;
- per bridge, on that step's training batch: gradient norms of W_Q, W_K, W_V, W_O, the projection
  and the gate (before clipping), and the weight norms.

At the end: greedy one hop / two hops on 200 held-out people and the anchor's city -> country
skill with the bridges on (real facts), greedy held-out KV-arithmetic on 500 expressions judged
on the final number (key-value), as comm-eval scores them; and the first step at which held-out
validation reached 50%.

    python scripts/plateau_study.py --experiment real_facts --settings base --calm-seeds 0,1 \\
        --specialist-seeds 0,1 --out /work/runs/plateau/study.jsonl
    python scripts/plateau_study.py --experiment kv_arithmetic --settings base \\
        --setting 'lr1e-3:optimizer.lr=1e-3' --specialist-seeds 0,1,2 --calm-seeds 0
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # datasets and transformers progress bars: one line per event here

import torch  # noqa: E402

# Named settings: Hydra overrides on top of experiment=<E>. The options a setting may use are
# BridgeConfig fields (bridge.*), optimizer.* / scheduler.* / trainer.* keys of comm-train, and
# ``lr_scales=q_proj:3,k_proj:3`` (optimizer lr_scales of comm_cli.training.optim, which the
# train config does not carry yet).
SETTINGS: dict[str, list[str]] = {
    "base": [],
}


def kind_of(experiment: str) -> str:
    """Which built-in experiment a config belongs to (its smoke and variant configs included)."""
    for kind in ("real_facts", "kv_arithmetic"):
        if experiment.startswith(kind) or experiment == "kv_smoke" and kind == "kv_arithmetic":
            return kind
    raise SystemExit(f"--experiment {experiment}: not a real_facts* or kv_* experiment config")


@dataclass
class Setting:
    name: str
    overrides: list[str] = field(default_factory=list)


def parse_setting(text: str) -> Setting:
    """``NAME`` (from SETTINGS) or ``NAME:override;override...``."""
    name, _, rest = text.partition(":")
    if not rest:
        if name not in SETTINGS:
            raise SystemExit(f"unknown setting {name!r}: give NAME:override;... or one of {sorted(SETTINGS)}")
        return Setting(name, list(SETTINGS[name]))
    return Setting(name, [o for o in rest.split(";") if o])


# --------------------------------------------------------------------------------- the bases


def compose(experiment: str, specialist_seed: int, overrides: list[str]):
    """The composed comm-train config of one run (and its bases built when missing)."""
    from comm_cli.experiments.kv_arithmetic.demo import compose_train_config

    base = [f"experiment={experiment}", "logger=none"]
    if kind_of(experiment) == "real_facts":
        # the demo's fixed draw of questions: every CALM seed trains on the same rows
        base += [
            f"facts.settings.seed={specialist_seed}",
            "facts.settings.num_threads=1",
            "data.facts.seed=0",
        ]
        from comm_cli.experiments.real_facts.setup import prepare
    else:
        base += [f"kv.specialists.seed={specialist_seed}", "kv.specialists.processes=1"]
        from comm_cli.experiments.kv_arithmetic.setup import prepare
    cfg = compose_train_config(base + overrides)
    prepare(cfg)
    return cfg


class Bases:
    """What every run over one specialist build shares: tokenizer, tokenised training rows,
    held-out rows with their answer positions, and the cached frozen states."""

    def __init__(
        self, experiment: str, specialist_seed: int, data_seed: int, cfg, cache_root: Path, eval_examples: int
    ):
        from comm_cli.compose.loading import load_tokenizer
        from comm_cli.data.build import raw_splits, tokenized_splits

        self.experiment, self.specialist_seed = kind_of(experiment), specialist_seed
        self.tokenizer = load_tokenizer(cfg.anchor.name_or_path, cfg.anchor)
        raw = raw_splits(cfg.data, cfg, seed=data_seed)
        raw.pop("validation", None)
        self.train = tokenized_splits(raw, self.tokenizer, cfg.data)["train"]
        self.train = self.train.add_column("example_id", list(range(len(self.train))))
        self.heldout = self._heldout(cfg, eval_examples)
        self.cache_dir = cache_root / f"{experiment}_spec{specialist_seed}_data{data_seed}"
        self.prefix_layers = cfg.trainer.anchor_prefix_layers if cfg.trainer.cache_anchor_prefix else None

    def _heldout(self, cfg, n: int):
        from comm_cli.data.build import eval_rows
        from comm_cli.data.tokenize import tokenize_split

        data_cfg = copy.deepcopy(cfg.data)
        if self.experiment == "real_facts":
            data_cfg.facts.people, data_cfg.facts.eval_task, data_cfg.facts.eval_examples = (
                "heldout",
                "one_hop",
                n,
            )
        else:
            data_cfg.kv.key_split, data_cfg.kv.task, data_cfg.kv.eval_examples = "heldout", "kv_arithmetic", n
        rows = eval_rows(data_cfg, cfg)
        tokenized, _ = tokenize_split(rows, self.tokenizer, data_cfg, split_name="heldout")
        tokenized = tokenized.add_column("example_id", list(range(len(tokenized))))
        marks = [self._answer_marks(rows[i], tokenized[i]) for i in range(len(rows))]
        if any(m["answer_position"] + 1 >= len(t) for m, t in zip(marks, tokenized["input_ids"])):
            raise SystemExit("held-out rows were cut before their answer: raise data.max_length (--override)")
        for key in ("answer_position", "answer_keys", "name_keys"):
            tokenized = tokenized.add_column(key, [m[key] for m in marks])
        return tokenized

    def _answer_marks(self, row: dict, tokens: dict) -> dict:
        """Where the answer is predicted, and which augment positions hold it."""
        ids, labels = tokens["input_ids"], tokens["labels"]
        start = next(i for i, label in enumerate(labels) if label != -100)  # first completion token
        if self.experiment == "kv_arithmetic":
            # prompt `abc+xyz-def=` (one token a character after bos), completion `4+7-3=8`:
            # operand i's digit is predicted at start - 1 + 2i from the key ending at 1 + 4i + 2
            bos = int(ids[0] == self.tokenizer.bos_token_id)
            eos = int(ids[-1] == self.tokenizer.eos_token_id)
            if len(ids) != bos + len(row["prompt"]) + len(row["completion"]) + eos:
                raise ValueError(f"expected one token a character: {row} -> {ids}")
            operands = row["prompt"].count("+") + row["prompt"].count("-") + 1
            width = len(row["prompt"]) // operands - 1
            pairs = [(start - 1 + 2 * i, bos + (width + 1) * i + width - 1) for i in range(operands)]
            return {"answer_position": pairs[0][0], "answer_keys": pairs, "name_keys": []}
        completion = row["completion"]
        person = completion.split(" lives in ")[0]
        before = completion[: completion.index(" lives in ") + len(" lives in")]
        n_before = len(self.tokenizer(before, add_special_tokens=False)["input_ids"])
        position = start + n_before - 1
        prompt_len = start
        names = []
        for text, offset in ((row["prompt"], 0), (completion, prompt_len)):
            spans = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
                "offset_mapping"
            ]
            at = text.find(person)
            names += [offset + j for j, (a, b) in enumerate(spans) if a < at + len(person) and b > at]
        return {"answer_position": position, "answer_keys": [(position, position)], "name_keys": names}

    def caches(self, model, cfg):
        """(prefix cache and AnchorPrefix, or None; augment cache) for train and held-out rows."""
        from comm_cli.compose.loading import torch_dtype
        from comm_cli.compose.prefix import AnchorPrefix, decoder_layers
        from comm_cli.training import anchor_prefix_cache as apc
        from comm_cli.training import augment_cache as ac

        dtype = torch_dtype(cfg.augment.dtype) if cfg.augment.dtype != "auto" else torch.float32
        out = {}
        for split, rows in (("train", self.train), ("heldout", self.heldout)):
            rows = rows.select_columns(["input_ids", "labels", "prompt_mask", "example_id"])
            key = ac.data_fingerprint(rows, model, model.mask_mode, dtype)
            directory = self.cache_dir / f"{split}_augment"
            augment = ac.AugmentStateCache.open(directory, key) or ac.build_cache(
                model, rows, directory, key, dtype, batch_size=64
            )
            prefix = None
            if self.prefix_layers:
                layers = decoder_layers(model.anchor)
                spec = {"name_or_path": cfg.anchor.name_or_path, "dtype": cfg.anchor.dtype}
                anchor_dtype = next(model.anchor.parameters()).dtype
                key = apc.fingerprint(rows, spec, self.prefix_layers, anchor_dtype)
                directory = self.cache_dir / f"{split}_prefix{self.prefix_layers}"
                prefix = apc.AnchorPrefixCache.open(directory, key) or apc.build_cache(
                    model.anchor, layers, self.prefix_layers, rows, directory, key, 64
                )
            out[split] = (augment, prefix)
        replay = None
        if self.prefix_layers:
            replay = AnchorPrefix(decoder_layers(model.anchor), self.prefix_layers)
            replay.probe(model.anchor)
        return out, replay


# --------------------------------------------------------------------------------- one run


def collate(bases: Bases, rows, caches, split: str) -> dict:
    from comm_cli.compose.encoding import CompletionCollator

    collator = CompletionCollator(bases.tokenizer.pad_token_id, padding_side="right")
    batch = collator(rows)
    ids = [int(r["example_id"]) for r in rows]
    augment, prefix = caches[split]
    batch["augment_states"] = augment.batch_states(ids, [batch["input_ids"].shape[1]])
    if prefix is not None:
        batch["anchor_prefix_states"] = prefix.batch_states(ids, batch["input_ids"].shape[1])
    return batch


def forward(model, replay, batch, **kwargs):
    import contextlib

    states = batch.get("anchor_prefix_states")
    context = replay.given(states) if replay is not None and states is not None else contextlib.nullcontext()
    with context:
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            augment_states=batch["augment_states"],
            **kwargs,
        )


def final_states(model, replay, batch) -> torch.Tensor:
    """The anchor's last hidden states (after its final norm), its head run at one position only."""
    captured = []
    handle = model.anchor.base_model.norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        forward(model, replay, batch, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


@torch.no_grad()
def heldout_scores(model, replay, bases: Bases, caches, batch_size: int = 50) -> dict:
    """Teacher-forced held-out accuracy (and loss), and the bridges' readings on the first batch."""
    from comm_cli.compose.diagnostics import BridgeProbe
    from comm_cli.output_head import output_head

    model.eval()
    head = output_head(model.anchor)
    right_first = right_all = total = 0
    loss_sum = loss_tokens = 0.0
    readings = None
    for start in range(0, len(bases.heldout), batch_size):
        rows = [bases.heldout[i] for i in range(start, min(start + batch_size, len(bases.heldout)))]
        batch = collate(bases, rows, caches, "heldout")
        with BridgeProbe(model) as probe:
            hidden = final_states(model, replay, batch)
        labels = batch["labels"]
        targets = labels[:, 1:]
        where = targets != -100
        if bases.experiment == "real_facts":
            # the head (49k words) at the answer position only: the loss is the city token's, and
            # "exact" is that token too
            where = torch.zeros_like(where)
            for i, row in enumerate(rows):
                where[i, row["answer_position"]] = True
        logits = head.logits(hidden[:, :-1][where]).float()
        loss_sum += torch.nn.functional.cross_entropy(logits, targets[where], reduction="sum").item()
        loss_tokens += where.sum().item()
        correct = torch.zeros_like(targets, dtype=torch.bool)
        correct[where] = logits.argmax(-1) == targets[where]
        for i, row in enumerate(rows):
            right_first += int(correct[i, row["answer_position"]])
            right_all += int(correct[i][where[i]].all())
        total += len(rows)
        if readings is None:
            readings = _readings(probe, batch, rows)
    model.train()
    return {
        "heldout_first": right_first / total,
        "heldout_exact": right_all / total,
        "heldout_loss": loss_sum / max(loss_tokens, 1),
        "bridges_heldout": readings,
    }


def _readings(probe, batch, rows) -> list[dict]:
    """Per bridge: the readings with the answer keys, and (real facts) the mass on the name."""
    batch_size, length = batch["input_ids"].shape
    answer = torch.zeros(batch_size, length, length, dtype=torch.bool)
    at = torch.zeros(batch_size, length, dtype=torch.bool)
    names = torch.zeros(batch_size, length, dtype=torch.bool)
    for i, row in enumerate(rows):
        for query, key in row["answer_keys"]:
            answer[i, query, key] = True
        at[i, row["answer_position"]] = True
        names[i, row["name_keys"]] = True
    readings = probe.readings(query_mask=batch["attention_mask"], answer_keys=answer)
    if any(row["name_keys"] for row in rows):
        on_names = probe.readings(query_mask=batch["attention_mask"], answer_keys=names, answer_queries=at)
        for reading, other in zip(readings, on_names):
            reading["name_mass"] = other["answer_mass"]
            reading["name_mass_best_head"] = other["answer_mass_best_head"]
    return [{k: _round(v) for k, v in r.items()} for r in readings]


def _round(value):
    return None if value is None else round(float(value), 5)


@torch.no_grad()
def greedy_scores(model, bases: Bases, cfg, n: int) -> dict:
    """The final numbers as comm-eval's tasks score them (greedy)."""
    model.eval()
    if bases.experiment == "real_facts":
        from comm_cli.experiments.real_facts import tasks
        from comm_cli.experiments.real_facts.data import load_world
        from comm_cli.experiments.real_facts.generation import greedy_answers

        world = load_world(cfg.facts.dir)
        people = world.heldout[:n]
        one = greedy_answers(model, bases.tokenizer, [tasks.one_hop(world, p)["prompt"] for p in people], 14)
        two = greedy_answers(model, bases.tokenizer, [tasks.two_hop(world, p)["prompt"] for p in people], 16)
        skill = greedy_answers(model, bases.tokenizer, [tasks.skill(c)["prompt"] for c in world.cities], 16)
        from comm_cli.experiments.real_facts.world import COUNTRY_OF

        return {
            "one_hop": sum(tasks.city(a) == world.home[p] for a, p in zip(one, people)) / len(people),
            "two_hop": sum(tasks.country(a) == world.country(p) for a, p in zip(two, people)) / len(people),
            "skill_bridges_on": sum(tasks.country(a) == COUNTRY_OF[c] for a, c in zip(skill, world.cities))
            / len(world.cities),
            "examples": one[:2] + two[:2],
        }
    from comm_cli.data.build import eval_rows
    from comm_cli.experiments.kv_arithmetic import tasks

    data_cfg = copy.deepcopy(cfg.data)
    data_cfg.kv.key_split, data_cfg.kv.task, data_cfg.kv.eval_examples = "heldout", "kv_arithmetic", n
    rows = eval_rows(data_cfg, cfg)
    tokenizer = bases.tokenizer
    right = 0
    for start in range(0, len(rows), 100):
        chunk = [rows[i] for i in range(start, min(start + 100, len(rows)))]
        prompts = [
            [tokenizer.bos_token_id] + tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
            for r in chunk
        ]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = model.generate(
            ids,
            mask,
            max_new_tokens=16,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, generated in zip(chunk, out[:, width:].tolist()):
            if tokenizer.eos_token_id in generated:
                generated = generated[: generated.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(generated, skip_special_tokens=True)
            right += tasks.is_correct("kv_arithmetic", text, row["completion"])
    return {"kv_arithmetic_heldout": right / len(rows)}


class Log:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a")  # noqa: SIM115

    def __call__(self, **entry) -> None:
        line = json.dumps(entry)
        print(line[:400] + (" ..." if len(line) > 400 else ""), flush=True)
        self.handle.write(line + "\n")
        self.handle.flush()


def run(setting: Setting, experiment: str, specialist_seed: int, calm_seed: int, args, bases_by_seed, log):
    from accelerate.utils import set_seed

    from comm_cli.compose.diagnostics import BridgeProbe, gradient_norms, weight_norms
    from comm_cli.training.models import build_calm
    from comm_cli.training.optim import build_optimizer, build_scheduler

    overrides = [*args.override, *setting.overrides, f"seed={calm_seed}"]
    lr_scales = {}
    for item in [o for o in overrides if o.startswith("lr_scales=")]:
        overrides.remove(item)
        for pair in item.split("=", 1)[1].split(","):
            key, _, value = pair.partition(":")
            lr_scales[key] = float(value)
    if args.steps:
        overrides.append(f"trainer.max_steps={args.steps}")
    cfg = compose(experiment, specialist_seed, overrides)
    # the recipe draws real-facts questions with data.facts.seed=0 (the demo's), key-value
    # expressions with the training seed (unless --data-seed fixes them: one cache, init seeds vary)
    data_seed = 0 if kind_of(experiment) == "real_facts" else calm_seed
    if args.data_seed is not None:
        data_seed = args.data_seed
    if (specialist_seed, data_seed) not in bases_by_seed:
        bases_by_seed.clear()  # one build's rows in memory at a time
        bases_by_seed[(specialist_seed, data_seed)] = Bases(
            experiment, specialist_seed, data_seed, cfg, Path(args.cache), args.eval_examples
        )
    bases = bases_by_seed[(specialist_seed, data_seed)]
    run_id = f"{experiment}/{setting.name}/spec{specialist_seed}/calm{calm_seed}"
    started = time.time()
    set_seed(calm_seed)
    model = build_calm(cfg)
    set_seed(calm_seed)
    caches, replay = bases.caches(model, cfg)
    model.train()
    if lr_scales:
        cfg.optimizer.lr_scales = lr_scales
    optimizer = build_optimizer(model, cfg.optimizer)
    total = int(cfg.trainer.max_steps)
    scheduler = build_scheduler(optimizer, cfg.scheduler, total)
    batch_size = cfg.trainer.batch_size
    steps_per_epoch = len(bases.train) // batch_size
    common = dict(run=run_id, setting=setting.name, overrides=setting.overrides, experiment=experiment,
                  specialist_seed=specialist_seed, calm_seed=calm_seed)  # fmt: skip
    log(event="start", **common, steps=total, lr=cfg.optimizer.lr, lr_scales=lr_scales, bridge=vars(cfg.bridge),
        scheduler=vars(cfg.scheduler), threads=torch.get_num_threads(), machine=platform.machine())  # fmt: skip

    def evaluate(step: int, window: list[float], train_probe, grads) -> dict:
        scores = heldout_scores(model, replay, bases, caches)
        entry = dict(event="eval", **common, step=step,
                     train_loss=round(sum(window) / len(window), 5) if window else None,
                     lr=scheduler.get_last_lr()[0], seconds=round(time.time() - started, 1),
                     **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in scores.items()})  # fmt: skip
        if train_probe is not None:
            entry["bridges_train"] = [
                {k: _round(v) for k, v in r.items() if k in ("output_ratio", "entropy")}
                for r in train_probe.readings(query_mask=None)
            ]
        entry["grads"] = [{k: _round(v) for k, v in g.items()} for g in grads] if grads else None
        entry["weights"] = [{k: _round(v) for k, v in w.items()} for w in weight_norms(model)]
        log(**entry)
        return scores

    first_50 = first_50_exact = None
    scores = evaluate(0, [], None, None)
    window: list[float] = []
    order: list[int] = []
    epoch = 0
    last = min(total, args.stop_after) if args.stop_after else total
    for step in range(1, last + 1):
        if not order:
            generator = torch.Generator().manual_seed(calm_seed * 100_003 + epoch)
            order = torch.randperm(len(bases.train), generator=generator).tolist()[
                : steps_per_epoch * batch_size
            ]
            epoch += 1
        rows = [bases.train[i] for i in order[:batch_size]]
        del order[:batch_size]
        batch = collate(bases, rows, caches, "train")
        measure = step % args.eval_every == 0 or step == last
        tokens = (batch["labels"][:, 1:] != -100).sum()
        probe = BridgeProbe(model) if measure else None
        if probe is not None:
            probe.__enter__()
        try:
            loss = forward(
                model, replay, batch, labels=batch["labels"], return_logits=False, loss_reduction="sum"
            ).loss
        finally:
            if probe is not None:
                probe.__exit__()
        (loss / tokens).backward()
        grads = gradient_norms(model) if measure else None
        if cfg.trainer.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        value = (loss / tokens).item()
        if not math.isfinite(value):
            log(event="diverged", **common, step=step)
            break
        window.append(value)
        if measure:
            scores = evaluate(step, window, probe, grads)
            window = []
            if first_50 is None and scores["heldout_first"] >= 0.5:
                first_50 = step
            if first_50_exact is None and scores["heldout_exact"] >= 0.5:
                first_50_exact = step
    final = dict(event="final", **common, steps=last, schedule_steps=total, first_step_50=first_50, first_step_50_exact=first_50_exact,
                 heldout_first=scores["heldout_first"], heldout_exact=scores["heldout_exact"],
                 train_seconds=round(time.time() - started, 1))  # fmt: skip
    if args.greedy:
        final.update(greedy_scores(model, bases, cfg, args.greedy))
    final["seconds"] = round(time.time() - started, 1)
    log(**final)


def summarise(path: Path) -> list[dict]:
    """One row per finished run of a study log: steps to 50% held-out, final numbers."""
    rows = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry["event"] != "final":
            continue
        row = {
            k: entry.get(k)
            for k in (
                "setting",
                "specialist_seed",
                "calm_seed",
                "steps",
                "first_step_50",
                "first_step_50_exact",
            )
        }
        row["heldout_tf"] = entry["heldout_first"] if "one_hop" in entry else entry["heldout_exact"]
        for key in ("one_hop", "two_hop", "skill_bridges_on", "kv_arithmetic_heldout"):
            if key in entry:
                row[key] = entry[key]
        rows.append(row)
    return rows


def print_summary(path: Path) -> None:
    rows = summarise(path)
    if not rows:
        print(f"no finished run in {path}")
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    print(" | ".join(columns))
    for row in rows:
        print(
            " | ".join(
                f"{row.get(c):.3f}" if isinstance(row.get(c), float) else str(row.get(c)) for c in columns
            )
        )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", help="real_facts, kv_arithmetic (or a variant)")
    parser.add_argument(
        "--summarise", metavar="JSONL", help="print the finished runs of a study log and exit"
    )
    parser.add_argument("--override", action="append", default=[], help="for every run (repeatable)")
    parser.add_argument("--settings", default="base", help="comma-separated names of SETTINGS")
    parser.add_argument("--setting", action="append", default=[], help="NAME:override;override (repeatable)")
    parser.add_argument("--specialist-seeds", default="0")
    parser.add_argument("--calm-seeds", default="0")
    parser.add_argument(
        "--steps", type=int, default=None, help="trainer.max_steps (default: the experiment's)"
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after N steps of the full schedule (a probe of the early phase; its greedy scores are the stopped model's)",
    )
    parser.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="key-value: draw the training expressions with this seed for every CALM seed (default: the CALM seed, as the recipe)",
    )
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument(
        "--eval-examples", type=int, default=None, help="held-out rows (200 people / 500 expressions)"
    )
    parser.add_argument("--greedy", type=int, default=None, help="greedy final scores on N (0: none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cache", default="/work/runs/plateau/cache", help="the frozen states, per specialist build"
    )
    parser.add_argument("--out", default="/work/runs/plateau/study.jsonl")
    args = parser.parse_args(argv)
    if args.summarise:
        print_summary(Path(args.summarise))
        return
    if not args.experiment:
        parser.error("--experiment is required")
    torch.set_num_threads(args.threads)
    default_n = 200 if kind_of(args.experiment) == "real_facts" else 500
    args.eval_examples = args.eval_examples or default_n
    args.greedy = default_n if args.greedy is None else args.greedy
    settings = [parse_setting(s) for s in args.settings.split(",") if s] + [
        parse_setting(s) for s in args.setting
    ]
    log = Log(Path(args.out))
    bases_by_seed: dict[int, Bases] = {}
    for setting in settings:
        for specialist_seed in [int(s) for s in args.specialist_seeds.split(",")]:
            for calm_seed in [int(s) for s in args.calm_seeds.split(",")]:
                run(setting, args.experiment, specialist_seed, calm_seed, args, bases_by_seed, log)


if __name__ == "__main__":
    main()
