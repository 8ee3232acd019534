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

import copy
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from comm_cli.errors import DataError
from comm_cli.experiments.builds import BuildDirectory
from comm_cli.experiments.real_facts import tasks
from comm_cli.experiments.real_facts.config import RECIPE_VERSION, FactsSettings
from comm_cli.experiments.real_facts.generation import greedy_answers
from comm_cli.experiments.real_facts.world import CITIES, COUNTRY_OF, FactsWorld
from comm_cli.experiments.shared import derive_seed, no_progress_bars, pad_rows, torch_threads
from comm_cli.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)

WORLD = "world.json"
MODELS = ("generic", "specialist", "random")
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


# ---------------------------------------------------------------------------------------------
# Entry points


def directory_of(directory: str | Path) -> BuildDirectory:
    """The bases' build directory (``comm_cli.experiments.builds``)."""
    needs = (WORLD, *(f"{model}/{name}" for model in MODELS for name in _MODEL_FILES))
    return BuildDirectory(Path(directory).absolute(), frozenset({*MODELS, WORLD}), needs, "real-facts output")


def read_complete_manifest(directory: str | Path, settings: FactsSettings) -> dict | None:
    """The manifest of a complete build of exactly these settings in ``directory``, else None."""
    return directory_of(directory).complete(settings.hash())


def ensure_bases(directory: str | Path, anchor_dir: str | Path, settings: FactsSettings) -> dict:
    """The world and the three augmenting models in ``directory`` (built when missing), over the
    converted anchor in ``anchor_dir``; returns the build's manifest."""
    manifest = read_complete_manifest(directory, settings)
    if manifest is not None:
        return manifest
    return build_bases(directory, anchor_dir, settings)


def build_bases(directory: str | Path, anchor_dir: str | Path, settings: FactsSettings) -> dict:
    def fill(tmp: Path) -> dict:
        with torch_threads(settings.num_threads):
            return _build_into(tmp, Path(anchor_dir), settings)

    manifest, _ = directory_of(directory).build(settings.hash(), fill)
    return manifest


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
        padded = {k: t.to(device) for k, t in pad_rows(batch, tokenizer.pad_token_id).items()}
        ids, mask, labels = padded["input_ids"], padded["attention_mask"], padded["labels"]
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


# ---------------------------------------------------------------------------------------------
# Directories


def _save(model, tokenizer, directory: Path) -> None:
    with no_progress_bars():
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
