"""Measuring the key-value experiment's specialists by greedy decoding: the augment's key lookup
(alone and inside held-out expressions, where the bridges read it), the anchor's arithmetic
(clean and after key-shaped prefixes) and the held-out task alone (near chance: no values)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from comm_cli.experiments.kv_arithmetic import tasks as kv
from comm_cli.experiments.kv_arithmetic.config import KVSpecialistSettings
from comm_cli.experiments.kv_arithmetic.world import KVWorld
from comm_cli.experiments.shared import derive_seed


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


def evaluate_augment(model, tokenizer, world: KVWorld, settings: KVSpecialistSettings) -> dict[str, float]:
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


def evaluate_anchor(model, tokenizer, world: KVWorld, settings: KVSpecialistSettings) -> dict[str, float]:
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


@torch.no_grad()
def evaluate_encoder_augment(
    model, tokenizer, world: KVWorld, settings: KVSpecialistSettings
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
