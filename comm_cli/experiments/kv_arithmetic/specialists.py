"""Build and train the two specialists of the key-value arithmetic experiment (CALM section 4.1).

- augment (m_A): a Qwen2-style model, width 64, that memorises key -> value for every key of the
  world. It is trained on lines of pairs with the value right after its key (``abc4;xyz7 def1``),
  so its hidden state on a key's last character holds the value; the bridges read that state.
- anchor (m_B): a Llama-style model, width 128, that learns arithmetic over single digits and never
  sees a value. Half of its training expressions follow a random prefix of letters and ``+-=; ``
  (half of those shaped like a key expression, ``qzr+bta=``, from random letters), so it still
  computes after an unfamiliar prefix such as ``abc+xyz-def=4+7-3=``: that is the position the
  composition puts it in once the bridges have written the substituted digits.

Both are real ``transformers`` models built from configs with seeds, trained with a small plain
PyTorch loop (AdamW, warmup + cosine) and saved with ``save_pretrained`` beside the shared
character tokenizer. ``ensure_specialists`` builds them once per settings and reuses them after:

    <out_dir>/world.json              the keys, their values, the composition / held-out split
    <out_dir>/manifest.json           settings, their hash, timings, accuracies (written last)
    <out_dir>/augment/, anchor/       config.json, model.safetensors, tokenizer, manifest.json

A build is written into a temporary sibling directory and renamed into place at the end, so a
build killed half way never looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import socket
import string
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from comm_cli.data.char_tokenizer import build_char_tokenizer
from comm_cli.errors import OutputDirError
from comm_cli.experiments.kv_arithmetic import tasks as kv
from comm_cli.experiments.kv_arithmetic.world import KVWorld
from comm_cli.experiments.shared import derive_seed
from comm_cli.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Bump when the training recipe changes in a way the settings do not show, so that cached
# specialists built by older code are rebuilt rather than reused.
RECIPE_VERSION = 2
# The same for the encoder augment's recipe alone (``augment.kind == "encoder"``), so changing it
# rebuilds the encoder builds and leaves the causal builds' hashes as they are. 2: ModernBERT
# (pre-LN, rotary positions) with init std width**-0.5, in place of a post-LN BERT at std 0.02.
ENCODER_RECIPE_VERSION = 2
MANIFEST = "manifest.json"
WORLD = "world.json"
# The only entries a specialists directory holds; a directory with anything else is not ours to replace.
_OUR_ENTRIES = {"augment", "anchor", WORLD, MANIFEST}
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MANIFEST)


@dataclass
class AugmentSettings:
    """The augmenting model (Qwen2-style) and how it memorises the keys."""

    width: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    steps: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 40
    weight_decay: float = 0.0
    pairs_per_line: int = 8
    # "causal" (Qwen2-style, next-token loss on the values) or "encoder" (ModernBERT, masked-LM on
    # the values: the variant composed in prompt mode).
    kind: str = "causal"
    # encoder: a masked value is shown as [MASK] or, this often, as one of the characters that
    # follow a key in a prompt ("+-=" or a letter), so that the encoder's state right after a key
    # in ``abc+xyz-def=`` predicts the key's value (BERT's random replacement, made frequent).
    replace_fraction: float = 0.5


@dataclass
class AnchorSettings:
    """The anchor (Llama-style) and how it learns arithmetic after random prefixes."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 512
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    prefix_fraction: float = 0.5
    max_prefix_length: int = 15
    # Of the prefixes, this fraction is shaped like a key expression (``qzr+bta=``), see kv.random_prefix.
    shaped_prefix_fraction: float = 0.5


@dataclass
class SpecialistSettings:
    """Everything that decides the specialists. Defaults are the demo's real sizes;
    ``SpecialistSettings.tiny()`` is a seconds-long build for tests."""

    seed: int = 0
    num_keys: int = 500
    key_length: int = 3
    composition_fraction: float = 0.2
    # Composition keys hold every value equally often (KVWorld.create(balanced=True)). Measured
    # (README): a random split of world seed 0 gave value 4 only 4 of the 100 composition keys,
    # and held-out expressions needing a 4 failed 40% of the time against 7% or less for the rest.
    balanced_split: bool = True
    min_operands: int = 2
    max_operands: int = 3
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    anchor: AnchorSettings = field(default_factory=AnchorSettings)
    eval_examples: int = 500
    # The anchor's tokenizer: "char" (shared with the augment) or "bpe" (trained on the anchor's
    # own pretraining text, ``bpe_vocab_size`` tokens: the cross-tokenizer variant).
    anchor_tokenizer: str = "char"
    bpe_vocab_size: int = 160
    # Not part of the settings hash: how many processes build the two specialists (2: side by
    # side, 1: one after the other). Each trains with exactly one torch thread either way, so
    # the weights do not depend on this or on the machine's thread settings.
    processes: int = 2

    @classmethod
    def tiny(cls, seed: int = 0) -> SpecialistSettings:
        """Small models and a few steps: the layout and behaviour of a real build in seconds,
        not its accuracy."""
        return cls(
            seed=seed,
            num_keys=40,
            augment=AugmentSettings(width=16, intermediate=32, heads=2, kv_heads=1, steps=6, batch_size=8),
            anchor=AnchorSettings(width=32, intermediate=64, heads=2, kv_heads=2, steps=6, batch_size=8),
            eval_examples=16,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SpecialistSettings:
        data = dict(data)
        data.pop("num_threads", None)  # written by comm before the build was single-threaded
        augment = AugmentSettings(**data.pop("augment", {}))
        anchor = AnchorSettings(**data.pop("anchor", {}))
        return cls(augment=augment, anchor=anchor, **data)

    def hash(self) -> str:
        """A short stable hash of what decides the weights (the recipe version included). Options
        added after a release leave the hash alone at their default, so builds stay reused."""
        data = self.to_dict()
        data.pop("processes")
        for section, key, default in _LATER_OPTIONS:
            where = data[section] if section else data
            if where.get(key) == default:
                where.pop(key)
        data["recipe_version"] = RECIPE_VERSION
        if self.augment.kind == "encoder":
            data["encoder_recipe_version"] = ENCODER_RECIPE_VERSION
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# (section, key, default) of settings added after RECIPE_VERSION 2.
_LATER_OPTIONS = (
    (None, "anchor_tokenizer", "char"),
    (None, "balanced_split", False),
    (None, "bpe_vocab_size", 160),
    ("augment", "kind", "causal"),
    ("augment", "replace_fraction", 0.5),
)


@dataclass
class SpecialistPaths:
    """Where a complete build lies, and whether this call trained it (``built``) or reused it."""

    root: Path
    augment: Path
    anchor: Path
    world: Path
    manifest: dict
    built: bool


# ---------------------------------------------------------------------------------------------
# Public entry points


def ensure_specialists(
    out_dir: str | Path, settings: SpecialistSettings | None = None, force: bool = False
) -> SpecialistPaths:
    """The specialists for ``settings`` under ``out_dir``: reused when a complete build with the
    same settings hash is there, built otherwise (or when ``force``).

    A directory holding an older or partial build of ours is replaced; a directory holding
    anything else raises ``OutputDirError`` rather than being deleted.
    """
    settings = settings or SpecialistSettings()
    out_dir = Path(out_dir)
    if not force:
        remove_stale_partials(out_dir)  # a killed build's leftovers go even when nothing is built
        manifest = read_complete_manifest(out_dir, settings)
        if manifest is not None:
            logger.info("reusing specialists in %s (settings %s)", out_dir, settings.hash())
            return _paths(out_dir, manifest, built=False)
    return build_specialists(out_dir, settings)


def build_specialists(out_dir: str | Path, settings: SpecialistSettings | None = None) -> SpecialistPaths:
    """Build both specialists from scratch into ``out_dir`` (atomically replacing a build there)."""
    settings = settings or SpecialistSettings()
    out_dir = Path(out_dir).absolute()
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{_HOST}-{time.time_ns()}"
    tmp.mkdir()
    try:
        manifest = _build_into(tmp, settings)
        return _install(tmp, out_dir, settings, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_complete_manifest(out_dir: str | Path, settings: SpecialistSettings) -> dict | None:
    """The top-level manifest of a complete build for exactly these settings, else None.

    Complete means: the manifest (written last) says so with the same settings hash, and every file
    a loader needs is present. Anything short of that is treated as missing.
    """
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not manifest.get("complete") or manifest.get("settings_hash") != settings.hash():
        return None
    if not (out_dir / WORLD).is_file():
        return None
    for name in ("augment", "anchor"):
        if not all((out_dir / name / f).is_file() for f in _MODEL_FILES):
            return None
    return manifest


# ---------------------------------------------------------------------------------------------
# Building


def _build_into(root: Path, settings: SpecialistSettings) -> dict:
    start = time.perf_counter()
    world = KVWorld.create(
        seed=settings.seed,
        num_keys=settings.num_keys,
        key_length=settings.key_length,
        composition_fraction=settings.composition_fraction,
        balanced=settings.balanced_split,
    )
    world.save(root / WORLD)
    names = ("augment", "anchor")
    if settings.processes > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a fresh interpreter per specialist, whatever threads this process has started
        with ProcessPoolExecutor(
            max_workers=2,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_die_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            futures = [pool.submit(_train_and_save, name, str(root), settings.to_dict()) for name in names]
            models = dict(zip(names, (future.result() for future in futures)))
    else:
        models = {name: _train_and_save(name, str(root), settings.to_dict()) for name in names}
    return {
        "complete": True,
        "settings_hash": settings.hash(),
        "recipe_version": RECIPE_VERSION,
        **({"encoder_recipe_version": ENCODER_RECIPE_VERSION} if settings.augment.kind == "encoder" else {}),
        "settings": settings.to_dict(),
        "num_threads": 1,
        "processes": settings.processes,
        "torch_version": torch.__version__,
        "total_seconds": round(time.perf_counter() - start, 2),
        "augment": models["augment"],
        "anchor": models["anchor"],
    }


def _die_with_parent(parent_pid: int) -> None:
    """A build worker ends when the process that started it is killed (Linux: the kernel sends
    it SIGTERM), instead of training on, orphaned, into a directory nobody will install. A
    parent that died while this worker was still starting is caught by the pid check."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        os._exit(1)


def _train_and_save(name: str, root: str, settings_dict: dict) -> dict:
    """Train one specialist with a single torch thread (its weights then do not depend on the
    thread count: float sums are not split across threads) and save it; its manifest."""
    settings = SpecialistSettings.from_dict(settings_dict)
    world = KVWorld.load(Path(root) / WORLD)
    tokenizer = specialist_tokenizer(name, settings)
    train = {"augment": _train_augment, "anchor": _train_anchor}[name]
    if name == "augment" and settings.augment.kind == "encoder":
        train = _train_encoder_augment
    with _torch_threads(1):
        model, manifest = train(world, tokenizer, settings)
    with _no_progress_bars():
        model.save_pretrained(Path(root) / name)
    tokenizer.save_pretrained(Path(root) / name)
    manifest["settings_hash"] = settings.hash()
    (Path(root) / name / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def specialist_tokenizer(name: str, settings: SpecialistSettings):
    """The tokenizer a specialist reads with: the character tokenizer, plus [MASK] for an encoder
    augment, or the anchor's own BPE (cross-tokenizer variant)."""
    if name == "anchor" and settings.anchor_tokenizer == "bpe":
        from comm_cli.experiments.kv_arithmetic.bpe import anchor_texts, build_bpe_tokenizer

        texts = anchor_texts(derive_seed(settings.seed, "anchor-bpe"), 20000, settings)
        return build_bpe_tokenizer(texts, settings.bpe_vocab_size)
    if settings.anchor_tokenizer not in ("char", "bpe"):
        raise ValueError(f"anchor_tokenizer must be char or bpe, got {settings.anchor_tokenizer!r}")
    tokenizer = build_char_tokenizer()
    if name == "augment" and settings.augment.kind == "encoder":
        tokenizer.add_special_tokens({"mask_token": "[MASK]"})
    return tokenizer


def _train_augment(world: KVWorld, tokenizer, settings: SpecialistSettings):
    s = settings.augment
    from transformers import Qwen2Config

    config = Qwen2Config(**_config_kwargs(s, tokenizer))
    seed = derive_seed(settings.seed, "augment")
    model = _init_model(config, seed)
    rng = random.Random(seed)
    keys = world.keys

    vocab = tokenizer.get_vocab()

    def batch():
        rows = []
        for _ in range(s.batch_size):
            line = kv.lookup_line(world, rng, keys, s.pairs_per_line)
            ids = [vocab[c] for c in line]
            # Loss on the values only: keys are random, a value is the one thing to learn after a key.
            labels = [t if c.isdigit() else IGNORE_INDEX for t, c in zip(ids, line)]
            rows.append(([tokenizer.bos_token_id, *ids], [IGNORE_INDEX, *labels]))
        return _pad(rows, tokenizer.pad_token_id)

    train_seconds, losses = _train_loop(model, batch, s.steps, s.lr, s.warmup_steps, s.weight_decay, seed)
    start = time.perf_counter()
    accuracy = evaluate_augment(model, tokenizer, world, settings)
    return model, _model_manifest(
        "augment", model, s, seed, train_seconds, time.perf_counter() - start, losses, accuracy
    )


def _train_encoder_augment(world: KVWorld, tokenizer, settings: SpecialistSettings):
    """A ModernBERT-style encoder that learns every key's value by masked-LM on the same key lines.

    Every value is the masked token: shown as [MASK], or (``replace_fraction`` of the time) as a
    character that follows a key in a prompt, so the encoder's state right after a key predicts
    its value whatever stands there.

    ModernBERT (pre-LN, rotary positions) with init std ``width ** -0.5``, not BERT at the usual
    0.02: the masked position holds nothing of its key, so its state must take the key from its
    neighbours by attention from the first step. With std 0.02 the attention's share of that state
    is tiny beside the normalised embedding (at initialisation the masked state's spread across
    keys is 0.005 against a norm of 8), the gradient towards the key vanishes, and the loss sits at
    ln 10 (the values' marginal): measured over 400-600 steps at lr 3e-4 to 3e-3 for BERT at
    std 0.02 or 0.125 and for ModernBERT at 0.02. ModernBERT at 0.125 leaves the plateau within
    200 steps and looks up every key."""
    s = settings.augment
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    config = ModernBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.width,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        intermediate_size=s.intermediate,
        max_position_embeddings=128,
        initializer_range=s.width**-0.5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        cls_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.eos_token_id,
    )
    seed = derive_seed(settings.seed, "augment")
    torch.manual_seed(seed)
    model = ModernBertForMaskedLM(config)
    rng = random.Random(seed)
    vocab = tokenizer.get_vocab()
    followers = [vocab[c] for c in "+-=" + string.ascii_lowercase]

    def batch():
        rows = []
        for _ in range(s.batch_size):
            line = kv.lookup_line(world, rng, world.keys, s.pairs_per_line)
            ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
            for c in line:
                if c.isdigit():
                    shown = (
                        rng.choice(followers)
                        if rng.random() < s.replace_fraction
                        else tokenizer.mask_token_id
                    )
                    ids.append(shown)
                    labels.append(vocab[c])
                else:
                    ids.append(vocab[c])
                    labels.append(IGNORE_INDEX)
            rows.append((ids, labels))
        return _pad(rows, tokenizer.pad_token_id)

    train_seconds, losses = _train_loop(model, batch, s.steps, s.lr, s.warmup_steps, s.weight_decay, seed)
    start = time.perf_counter()
    accuracy = evaluate_encoder_augment(model, tokenizer, world, settings)
    return model, _model_manifest(
        "augment", model, s, seed, train_seconds, time.perf_counter() - start, losses, accuracy
    )


@torch.no_grad()
def evaluate_encoder_augment(
    model, tokenizer, world: KVWorld, settings: SpecialistSettings
) -> dict[str, float]:
    """Its masked-LM guess of a key's value: at ``abc[MASK]`` for every key, and right after each
    key inside held-out kv_arithmetic prompts (``abc+xyz-def=``: what the bridges read)."""
    vocab = tokenizer.get_vocab()
    keys = world.keys
    ids = torch.tensor(
        [[tokenizer.bos_token_id, *[vocab[c] for c in key], tokenizer.mask_token_id] for key in keys]
    )
    predicted = model(input_ids=ids).logits[:, -1].argmax(-1).tolist()
    lookup = sum(tokenizer.convert_ids_to_tokens(p) == str(world.values[k]) for p, k in zip(predicted, keys))
    examples = kv.sample_examples(
        "kv_arithmetic", settings.eval_examples, derive_seed(settings.seed, "eval-augment"), world, "heldout",
        settings.min_operands, settings.max_operands,
    )  # fmt: skip
    correct = total = 0
    width = world.key_length
    for e in examples:
        prompt = e["prompt"]
        row = torch.tensor([[tokenizer.bos_token_id, *[vocab[c] for c in prompt]]])
        guesses = model(input_ids=row).logits[0].argmax(-1).tolist()
        for k in range(0, len(prompt) - 1, width + 1):
            after = 1 + k + width  # +1 for <bos>: the character right after the key
            correct += tokenizer.convert_ids_to_tokens(guesses[after]) == str(
                world.values[prompt[k : k + width]]
            )
            total += 1
    return {"lookup_all_keys": lookup / len(keys), "lookup_in_heldout_expression": correct / max(1, total)}


def _train_anchor(world: KVWorld, tokenizer, settings: SpecialistSettings):
    s = settings.anchor
    from transformers import LlamaConfig

    config = LlamaConfig(**_config_kwargs(s, tokenizer))
    seed = derive_seed(settings.seed, "anchor")
    model = _init_model(config, seed)
    rng = random.Random(seed)

    vocab = tokenizer.get_vocab()
    if settings.anchor_tokenizer == "char":

        def encode(text: str) -> list[int]:
            return [vocab[c] for c in text]

    else:

        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

    def batch():
        rows = []
        for _ in range(s.batch_size):
            example = kv.arithmetic_example(rng, settings.min_operands, settings.max_operands)
            prefix = ""
            if rng.random() < s.prefix_fraction:
                prefix = kv.random_prefix(rng, 1, s.max_prefix_length, s.shaped_prefix_fraction)
            context = [tokenizer.bos_token_id] + encode(prefix + example["prompt"])
            answer = encode(example["completion"]) + [tokenizer.eos_token_id]
            # Loss on the result and <eos> only: prefixes and operands are random.
            rows.append((context + answer, [IGNORE_INDEX] * len(context) + answer))
        return _pad(rows, tokenizer.pad_token_id)

    train_seconds, losses = _train_loop(model, batch, s.steps, s.lr, s.warmup_steps, s.weight_decay, seed)
    start = time.perf_counter()
    accuracy = evaluate_anchor(model, tokenizer, world, settings)
    return model, _model_manifest(
        "anchor", model, s, seed, train_seconds, time.perf_counter() - start, losses, accuracy
    )


def _config_kwargs(s, tokenizer, max_positions: int = 128) -> dict:
    """Config fields both families share; the task's sequences stay well under 64 tokens."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=s.width,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def _init_model(config, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _pad(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``(ids, labels)`` rows to the longest; labels are unshifted (the model shifts them)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        target[i, : len(labels)] = torch.tensor(labels)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": target}


def _train_loop(
    model,
    next_batch: Callable[[], dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    warmup_steps: int,
    weight_decay: float,
    seed: int,
) -> tuple[float, list[float]]:
    """AdamW with linear warmup and cosine decay to zero; returns (seconds, losses every ~10%)."""
    torch.manual_seed(seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses: list[float] = []
    every = max(1, steps // 10)
    start = time.perf_counter()
    for step in range(steps):
        loss = model(**next_batch()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % every == 0 or step == steps - 1:
            losses.append(round(loss.item(), 4))
            logger.info("%s step %d/%d loss %.4f", model.config.model_type, step + 1, steps, loss.item())
    model.eval()
    return time.perf_counter() - start, losses


def _model_manifest(name, model, s, seed, train_seconds, eval_seconds, losses, accuracy) -> dict:
    import transformers

    return {
        "model": name,
        "architecture": model.config.model_type,
        "settings": asdict(s),
        "seed": seed,
        "steps": s.steps,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "losses": losses,
        "accuracy": accuracy,
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


# ---------------------------------------------------------------------------------------------
# Evaluation (greedy decoding)


@torch.no_grad()
def greedy_generate(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 256
) -> list[str]:
    """Greedy continuations of ``prompts`` (without the prompt), cut at ``<eos>``.

    Prompts are grouped by token length so no batch needs padding: the result cannot depend on
    how padding is handled, and the loop stays a few lines.
    """
    eos = tokenizer.eos_token_id
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    outputs: list[str] = [""] * len(prompts)
    for indices in by_length.values():
        for chunk_start in range(0, len(indices), batch_size):
            chunk = indices[chunk_start : chunk_start + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk])
            prompt_len = ids.shape[1]
            done = torch.zeros(len(chunk), dtype=torch.bool)
            for _ in range(max_new_tokens):
                next_token = model(input_ids=ids).logits[:, -1].argmax(-1)
                ids = torch.cat([ids, next_token[:, None]], dim=1)
                done |= next_token == eos
                if done.all():
                    break
            for row, i in enumerate(chunk):
                new = ids[row, prompt_len:].tolist()
                if eos in new:
                    new = new[: new.index(eos)]
                outputs[i] = tokenizer.decode(new, skip_special_tokens=True)
    return outputs


def accuracy(model, tokenizer, task: str, examples: Sequence[kv.Example], max_new_tokens: int) -> float:
    """Exact-match accuracy of greedy generations (``kv_arithmetic.is_correct``)."""
    generations = greedy_generate(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens)
    correct = sum(kv.is_correct(task, g, e["completion"]) for g, e in zip(generations, examples))
    return correct / max(1, len(examples))


@torch.no_grad()
def lookup_in_expression_accuracy(model, tokenizer, world: KVWorld, examples: Sequence[kv.Example]) -> float:
    """How often the augment's next-token guess on each key's last character is that key's value,
    reading kv_arithmetic prompts such as ``abc+xyz-def=``: the states the bridges will read."""
    correct = total = 0
    width = world.key_length
    for e in examples:
        prompt = e["prompt"]
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        predicted = model(input_ids=ids).logits[0].argmax(-1).tolist()
        keys = [prompt[i : i + width] for i in range(0, len(prompt) - 1, width + 1)]
        for k, key in enumerate(keys):
            last = 1 + k * (width + 1) + width - 1  # +1 for <bos>
            correct += tokenizer.convert_ids_to_tokens(predicted[last]) == str(world.values[key])
            total += 1
    return correct / max(1, total)


def evaluate_augment(model, tokenizer, world: KVWorld, settings: SpecialistSettings) -> dict[str, float]:
    """Key lookup over every key, and inside held-out kv_arithmetic prompts."""
    n = settings.eval_examples
    in_expr = kv.sample_examples(
        "kv_arithmetic", n, derive_seed(settings.seed, "eval-augment"), world, "heldout",
        settings.min_operands, settings.max_operands,
    )  # fmt: skip
    return {
        "lookup_all_keys": accuracy(model, tokenizer, "lookup", kv.lookup_all(world), max_new_tokens=1),
        "lookup_in_heldout_expression": lookup_in_expression_accuracy(model, tokenizer, world, in_expr),
    }


def evaluate_anchor(model, tokenizer, world: KVWorld, settings: SpecialistSettings) -> dict[str, float]:
    """Arithmetic on clean and key-prefixed expressions, and the held-out kv task alone (should
    be near chance: the anchor never saw a value)."""
    n, seed = settings.eval_examples, derive_seed(settings.seed, "eval-anchor")
    ops = (settings.min_operands, settings.max_operands)
    clean = kv.sample_examples("arithmetic", n, seed, None, "all", *ops)
    prefixed = kv.sample_examples("kv_prefixed", n, seed + 1, world, "heldout", *ops)
    kv_alone = kv.sample_examples("kv_arithmetic", n, seed + 2, world, "heldout", *ops)
    return {
        "arithmetic": accuracy(model, tokenizer, "arithmetic", clean, max_new_tokens=4),
        "arithmetic_after_kv_prefix": accuracy(model, tokenizer, "kv_prefixed", prefixed, max_new_tokens=4),
        "kv_arithmetic_heldout_alone": accuracy(
            model, tokenizer, "kv_arithmetic", kv_alone, max_new_tokens=12
        ),
    }


# ---------------------------------------------------------------------------------------------
# Directories


def _paths(root: Path, manifest: dict, built: bool) -> SpecialistPaths:
    return SpecialistPaths(
        root=root,
        augment=root / "augment",
        anchor=root / "anchor",
        world=root / WORLD,
        manifest=manifest,
        built=built,
    )


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"specialists output '{out_dir}' is a file: give a directory path")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _OUR_ENTRIES)
        if foreign:
            raise OutputDirError(
                f"specialists output '{out_dir}' holds other files ({', '.join(foreign[:3])}): "
                "give an empty or new directory"
            )


def _install(tmp: Path, out_dir: Path, settings: SpecialistSettings, manifest: dict) -> SpecialistPaths:
    """Write the manifest last, then rename the finished build into place."""
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    theirs = read_complete_manifest(out_dir, settings)
    if theirs is not None:
        # Another process finished the same build first: keep theirs.
        return _paths(out_dir, theirs, built=True)
    old = None
    if out_dir.exists():
        _check_replaceable(out_dir)
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{time.time_ns()}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("specialists written to %s", out_dir)
    return _paths(out_dir, manifest, built=True)


# The build directory names carry the builder's host as well as its pid: on a cache shared by
# several machines, a pid only says whether a build of *this* host is still running.
_HOST = socket.gethostname().replace("-", "_").replace("/", "_") or "localhost"


def remove_stale_partials(out_dir: str | Path) -> None:
    """Delete leftovers of builds that were killed: ``.<name>.partial-<pid>-<host>-<ns>``
    directories whose process is gone (``.partial-<pid>-<ns>``, the older form, counts as this
    host's). A build of another host is left alone."""
    out_dir = Path(out_dir).absolute()
    for entry in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        parts = entry.name.rsplit(".partial-", 1)[1].split("-")
        try:
            pid = int(parts[0])
        except ValueError:
            continue
        host = parts[1] if len(parts) == 3 else _HOST
        if host == _HOST and not _process_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a progress bar for every save; a build saves two tiny models."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
