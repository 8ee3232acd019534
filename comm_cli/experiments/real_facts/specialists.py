"""Building the real-facts experiment's world and augmenting models, once per settings.

1. The anchor (``anchor.ensure_anchor``): SmolLM2-135M-Instruct, converted from the wheel's GGUF.
2. Its city skill: for every candidate city of ``world.CITIES`` the anchor is asked "In which
   country is C?"; the world keeps the cities it places in the right country (printed, and kept
   in world.json), so the two-hop task asks for knowledge the anchor really has.
3. The world: invented people spread evenly over the kept cities, split into composition,
   validation and held-out people.
4. ``generic``: the anchor's embeddings, its first ``layers`` decoder layers, final norm and
   (tied) head, a truncated copy. It shares the anchor's tokenizer and vocabulary and is the
   paper's "generic model" control: the specialist's starting point, before it learnt a fact.
5. ``specialist``: ``generic`` fine-tuned on one plain statement per person per phrasing
   ("Zorvik Tallan lives in Lyon."), loss on the city only. It never sees a question or a
   country. Its embeddings (and so its tied head) stay frozen by default: its predictions then
   live in the anchor's own output vocabulary, and a step is cheaper.
6. ``random``: the same shape with random weights (the other control).

Everything is written into a temporary sibling directory and renamed into place with the
manifest (written last), so a killed build never looks complete:

    <facts.dir>/world.json  manifest.json  generic/  specialist/  random/
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from comm_cli.errors import DataError, OutputDirError
from comm_cli.experiments.real_facts import tasks
from comm_cli.experiments.real_facts.generation import greedy_answers
from comm_cli.experiments.real_facts.world import CITIES, COUNTRY_OF, FactsWorld
from comm_cli.experiments.shared import derive_seed
from comm_cli.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Bump when the build changes in a way the settings do not show (cached builds are then rebuilt).
RECIPE_VERSION = 1
MANIFEST = "manifest.json"
WORLD = "world.json"
MODELS = ("generic", "specialist", "random")
_OUR_ENTRIES = {*MODELS, WORLD, MANIFEST}
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass
class SpecialistSettings:
    """The truncated copy of the anchor and how it learns the statements."""

    layers: int = 4
    # about 4 passes over the 8000 statements (2000 people x 4 phrasings), ~40 statements a step
    steps: int = 800
    batch_size: int = 16  # lines, of 2.5 statements on average
    lr: float = 5e-4
    warmup_steps: int = 16
    freeze_embeddings: bool = True
    # A training line holds 1..statements_per_line statements about random people, so the
    # specialist recalls a city after any prefix (in the composition it reads a chat-formatted
    # question before the answer), not only at the start of a text.
    statements_per_line: int = 4


@dataclass
class FactsSettings:
    """Everything that decides the world and the augmenting models. Defaults are the demo's."""

    seed: int = 0
    # Many composition people is what makes the bridges read the specialist instead of memorising
    # name -> city pairs (measured, held-out one hop: 120 composition people 17.5%, 600 66.7%,
    # 1400 74%; README, "A real pretrained anchor").
    num_people: int = 2000
    composition_fraction: float = 0.7
    validation_fraction: float = 0.05
    # Keep only the cities whose country the anchor names (false: every candidate, for tests).
    filter_cities: bool = True
    min_cities: int = 10
    # Of those, the world uses this many (a seeded draw; None: all). Few cities and many people
    # per city is what makes the bridges read the specialist: each city's reading is then learnt
    # from several composition people, so it is cheaper than memorising person -> city.
    num_cities: int | None = 24
    specialist: SpecialistSettings = field(default_factory=SpecialistSettings)
    # Not part of the settings hash: speed, not what is built. None leaves torch's setting alone.
    num_threads: int | None = 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FactsSettings:
        data = dict(data)
        specialist = SpecialistSettings(**data.pop("specialist", {}))
        return cls(specialist=specialist, **data)

    def hash(self) -> str:
        data = self.to_dict()
        data.pop("num_threads")
        data["recipe_version"] = RECIPE_VERSION
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Entry points


def read_complete_manifest(directory: str | Path, settings: FactsSettings) -> dict | None:
    """The manifest of a complete build of exactly these settings in ``directory``, else None."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not manifest.get("complete") or manifest.get("settings_hash") != settings.hash():
        return None
    if not (directory / WORLD).is_file():
        return None
    if not all((directory / m / f).is_file() for m in MODELS for f in _MODEL_FILES):
        return None
    return manifest


def ensure_bases(directory: str | Path, anchor_dir: str | Path, settings: FactsSettings) -> dict:
    """The world and the three augmenting models in ``directory`` (built when missing), over the
    converted anchor in ``anchor_dir``; returns the build's manifest."""
    manifest = read_complete_manifest(directory, settings)
    if manifest is not None:
        return manifest
    return build_bases(directory, anchor_dir, settings)


def build_bases(directory: str | Path, anchor_dir: str | Path, settings: FactsSettings) -> dict:
    directory = Path(directory).absolute()
    _check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.partial-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        with _torch_threads(settings.num_threads):
            manifest = _build_into(tmp, Path(anchor_dir), settings)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        theirs = read_complete_manifest(directory, settings)
        if theirs is not None:  # another process finished the same build first
            return theirs
        if directory.exists():
            _check_replaceable(directory)
            shutil.rmtree(directory)
        tmp.rename(directory)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Building


def _build_into(root: Path, anchor_dir: Path, settings: FactsSettings) -> dict:
    from transformers import AutoModelForCausalLM

    from comm_cli.training.models import load_tokenizer

    start = time.perf_counter()
    tokenizer = load_tokenizer(str(anchor_dir))
    anchor = AutoModelForCausalLM.from_pretrained(anchor_dir, dtype=torch.float32).eval()

    skill_start = time.perf_counter()
    skill = measure_city_skill(anchor, tokenizer, [c for c, _ in CITIES])
    kept = [c for c, r in skill.items() if r["correct"]] if settings.filter_cities else [c for c, _ in CITIES]
    print_city_skill(skill)
    if len(kept) < settings.min_cities:
        raise DataError(
            f"the anchor names the country of only {len(kept)} of {len(CITIES)} cities (at least "
            f"{settings.min_cities} are needed): check the anchor, or set facts.settings.filter_cities=false"
        )
    skill_seconds = time.perf_counter() - skill_start
    if settings.num_cities is not None and settings.num_cities < len(kept):
        kept = sorted(random.Random(derive_seed(settings.seed, "cities")).sample(kept, settings.num_cities))
    world = FactsWorld.create(
        seed=settings.seed,
        num_people=settings.num_people,
        cities=kept,
        composition_fraction=settings.composition_fraction,
        validation_fraction=settings.validation_fraction,
        city_skill=skill,
    )
    world.save(root / WORLD)

    generic = truncated_copy(anchor, settings.specialist.layers)
    del anchor
    _save(generic, tokenizer, root / "generic")
    specialist, train_info = train_specialist(copy.deepcopy(generic), tokenizer, world, settings)
    _save(specialist, tokenizer, root / "specialist")
    recall_start = time.perf_counter()
    recall = {
        name: recall_accuracy(m, tokenizer, world)
        for name, m in (("specialist", specialist), ("generic", generic))
    }
    recall_seconds = time.perf_counter() - recall_start
    _save(random_copy(generic, seed=derive_seed(settings.seed, "random")), tokenizer, root / "random")
    return {
        "complete": True,
        "settings_hash": settings.hash(),
        "recipe_version": RECIPE_VERSION,
        "settings": settings.to_dict(),
        "cities_used": len(kept),
        "cities_candidates": len(CITIES),
        "city_skill_seconds": round(skill_seconds, 1),
        "specialist": {**train_info, "recall_all_people": recall["specialist"]},
        "generic": {"recall_all_people": recall["generic"]},
        "recall_seconds": round(recall_seconds, 1),
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "total_seconds": round(time.perf_counter() - start, 1),
    }


def measure_city_skill(model, tokenizer, cities: list[str], max_new_tokens: int = 16) -> dict[str, dict]:
    """For every city, the anchor's answer to "In which country is C?" and whether it names the
    right country first (``tasks.country``)."""
    prompts = [tasks.skill(city)["prompt"] for city in cities]
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return {
        city: {"answer": answer, "correct": tasks.country(answer) == COUNTRY_OF[city]}
        for city, answer in zip(cities, answers)
    }


def print_city_skill(skill: dict[str, dict]) -> None:
    kept = [c for c, r in skill.items() if r["correct"]]
    dropped = [c for c, r in skill.items() if not r["correct"]]
    print(
        f"[real_facts] the anchor names the right country for {len(kept)} of {len(skill)} cities; "
        f"the world uses those. Dropped: {', '.join(dropped) or 'none'}",
        flush=True,
    )


def recall_accuracy(model, tokenizer, world: FactsWorld) -> float:
    """How often "<name> lives in" continues with the person's city, over every person."""
    rows = tasks.examples("statement", world, world.people)
    answers = greedy_answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=6)
    return sum(tasks.city(a) == tasks.city(r["completion"]) for a, r in zip(answers, rows)) / len(rows)


def truncated_copy(anchor, layers: int):
    """The anchor's embeddings, first ``layers`` decoder layers, final norm and head, as a model
    of its own (a deep copy; the anchor is untouched)."""
    from transformers import AutoModelForCausalLM

    if not 0 < layers <= anchor.config.num_hidden_layers:
        raise DataError(
            f"facts.settings.specialist.layers={layers}: pick 1..{anchor.config.num_hidden_layers}"
        )
    config = copy.deepcopy(anchor.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(anchor.state_dict(), strict=False)
    if missing and set(missing) != {"lm_head.weight"}:
        raise RuntimeError(f"truncated copy is missing weights {missing[:3]}")
    assert all(k.startswith("model.layers.") for k in unexpected)
    model.tie_weights()
    return model.eval()


def random_copy(model, seed: int):
    """A model of ``model``'s exact shape with freshly initialised weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=torch.float32).eval()


def train_specialist(
    model, tokenizer, world: FactsWorld, settings: FactsSettings, device=None, seed: int | None = None
):
    """Fine-tune on every person's statements in every phrasing; loss (and logits) on the city
    tokens only. AdamW, linear warmup, cosine decay to zero. Returns (model, what happened).

    ``device``: where the batches go (the model must be there already; default: the CPU).
    ``seed``: the training's seed (default: derived from ``settings.seed``)."""
    s = settings.specialist
    seed = derive_seed(settings.seed, "specialist") if seed is None else seed
    statements = []
    for example in tasks.examples("statement", world, world.people, paraphrases=True):
        prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
        following = tokenizer(" " + example["prompt"], add_special_tokens=False)["input_ids"]
        statements.append((prompt, following, completion))
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if s.freeze_embeddings:  # the anchor's vocabulary, in and out (tied or not)
        model.get_input_embeddings().requires_grad_(False)
        model.get_output_embeddings().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses, start = [], time.perf_counter()
    order: list[int] = []
    for step in range(s.steps):
        batch = []
        for _ in range(s.batch_size):
            count = rng.randint(1, s.statements_per_line)
            if len(order) < count:  # epochs of shuffled statements
                order += rng.sample(range(len(statements)), len(statements))
            batch.append(_line([statements[i] for i in order[:count]]))
            del order[:count]
        ids, mask, labels = (t.to(device) for t in _pad(batch, tokenizer.pad_token_id))
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        targets = labels[:, 1:]
        where = targets != IGNORE_INDEX
        loss = F.cross_entropy(model.lm_head(hidden[:, :-1][where]).float(), targets[where])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(1, s.steps // 10) == 0 or step == s.steps - 1:
            losses.append(round(loss.item(), 4))
            logger.info("specialist step %d/%d loss %.4f", step + 1, s.steps, loss.item())
    model.eval()
    model.requires_grad_(True)
    info = {
        "train_seconds": round(time.perf_counter() - start, 1),
        "steps": s.steps,
        "statements": len(statements),
        "trainable_parameters": sum(p.numel() for p in params),
        "losses": losses,
        "seed": seed,
    }
    return model, info


def _line(statements) -> tuple[list[int], list[int]]:
    """One training line, ``A lives in X. B resides in Y.``: (ids, labels on the cities only).
    ``statements`` are (prompt ids, the same prompt after a space, completion ids)."""
    ids, labels = [], []
    for i, (prompt, following, completion) in enumerate(statements):
        head = following if i else prompt
        ids += head + completion
        labels += [IGNORE_INDEX] * len(head) + completion
    return ids, labels


def _pad(rows, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (ids, labels) rows."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, row_labels) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, : len(row)] = torch.tensor(row_labels)
    return ids, mask, labels


# ---------------------------------------------------------------------------------------------
# Directories


def _save(model, tokenizer, directory: Path) -> None:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _check_replaceable(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise OutputDirError(f"real-facts output '{directory}' is a file: give a directory path")
    if directory.is_dir():
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in _OUR_ENTRIES)
        if foreign:
            raise OutputDirError(
                f"real-facts output '{directory}' holds other files ({', '.join(foreign[:3])}): "
                "give an empty or new directory"
            )


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
