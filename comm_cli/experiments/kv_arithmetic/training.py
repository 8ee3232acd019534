"""Training the key-value experiment's two specialists: a plain PyTorch loop over generated lines.

- augment (m_A): a Qwen2-style model that memorises key -> value for every key of the world,
  trained on lines of pairs with the value right after its key (``abc4;xyz7 def1``), so its hidden
  state on a key's last character holds the value; the bridges read that state. Or (``kind:
  encoder``) a ModernBERT-style encoder trained by masked-LM on the same lines (prompt mode).
- anchor (m_B): a Llama-style model that learns arithmetic over single digits and never sees a
  value. Half of its training expressions follow a random prefix of letters and ``+-=; `` (half of
  those shaped like a key expression, ``qzr+bta=``), so it still computes after an unfamiliar
  prefix such as ``abc+xyz-def=4+7-3=``: the position the composition puts it in.

Both are real ``transformers`` models built from configs with seeds, trained with AdamW, warmup
and cosine decay; ``specialists.py`` builds and caches them, ``scoring.py`` measures them.
"""

from __future__ import annotations

import logging
import math
import random
import string
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from comm_cli.data.char_tokenizer import build_char_tokenizer
from comm_cli.experiments.kv_arithmetic import tasks as kv
from comm_cli.experiments.kv_arithmetic.config import KVSpecialistSettings
from comm_cli.experiments.kv_arithmetic.scoring import (
    evaluate_anchor,
    evaluate_augment,
    evaluate_encoder_augment,
)
from comm_cli.experiments.kv_arithmetic.world import KVWorld
from comm_cli.experiments.shared import derive_seed, pad_rows
from comm_cli.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)


def specialist_tokenizer(name: str, settings: KVSpecialistSettings):
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


def train_augment(world: KVWorld, tokenizer, settings: KVSpecialistSettings):
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
        return pad_rows(rows, tokenizer.pad_token_id)

    train_seconds, losses = _train_loop(model, batch, s.steps, s.lr, s.warmup_steps, s.weight_decay, seed)
    start = time.perf_counter()
    accuracy = evaluate_augment(model, tokenizer, world, settings)
    return model, _model_manifest(
        "augment", model, s, seed, train_seconds, time.perf_counter() - start, losses, accuracy
    )


def train_encoder_augment(world: KVWorld, tokenizer, settings: KVSpecialistSettings):
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
        return pad_rows(rows, tokenizer.pad_token_id)

    train_seconds, losses = _train_loop(model, batch, s.steps, s.lr, s.warmup_steps, s.weight_decay, seed)
    start = time.perf_counter()
    accuracy = evaluate_encoder_augment(model, tokenizer, world, settings)
    return model, _model_manifest(
        "augment", model, s, seed, train_seconds, time.perf_counter() - start, losses, accuracy
    )


def train_anchor(world: KVWorld, tokenizer, settings: KVSpecialistSettings):
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
        return pad_rows(rows, tokenizer.pad_token_id)

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
