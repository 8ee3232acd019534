"""Decoding per token (``--decoding``): the composition's KV-cached greedy decoding against the
anchor's and the augment's own (a plain KV-cached greedy loop over each model alone), at every
batch of ``--decode-batches`` (the GPU suite: the 1b preset at batch 1 and 16). The ratio
composed / (anchor + augment) is the number the cost model (docs/performance.md) promises stays near 1; the
target on a GPU is <= 1.10.

Per token means as in the default case: the time of the whole call (prompt + ``--new-tokens``
tokens) over ``--new-tokens``, median of ``--repeats`` interleaved rounds after ``--warmup``.

``--compiled`` adds the composition's compiled / CUDA-graph decoding step when comm offers one
(an option of ``comm_cli.compose.generate`` named in COMPILED_OPTIONS) and checks its tokens
against the eager ones; while comm has none the case says "not available" and why.
"""

from __future__ import annotations

import copy
import inspect

import torch

from benchmarks.measure import time_interleaved
from benchmarks.models import base_dtype, build_models, compose, mapping_and_bridge
from benchmarks.report import device_name
from comm_cli.compose import cache_kwarg, generate

# The keyword of comm_cli.compose.generate that turns on a compiled / CUDA-graph decoding step,
# in the order they are looked for. When comm grows one under another name, add it here.
COMPILED_OPTIONS = ("compiled", "compile", "cuda_graphs", "static_cache")


def compiled_option() -> str | None:
    """The keyword of comm's generate that compiles decoding, or None while it has none."""
    parameters = inspect.signature(generate).parameters
    return next((name for name in COMPILED_OPTIONS if name in parameters), None)


def batches(args) -> list[int]:
    return [int(b) for b in args.decode_batches.split(",") if b.strip()]


class Decoders:
    """The anchor, the augment and their composition (random bridges), decoding the same random
    prompts; eos is switched off so every row decodes every token."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        anchor, augment = build_models(args, base_dtype(device), device)
        for model in (anchor, augment):
            model.generation_config.eos_token_id = None
        self.anchor, self.augment = anchor, augment
        # the composition gets a copy: composing may cut the augment above its last connection
        self.composed, _ = compose(anchor, copy.deepcopy(augment), *mapping_and_bridge(args))
        self.composed.eval()
        widest = max(batches(args))
        g = torch.Generator().manual_seed(2)
        vocab = anchor.config.vocab_size
        self.prompts = torch.randint(3, vocab, (widest, args.prompt), generator=g).to(device)

    @torch.no_grad()
    def composition(self, batch: int, **options) -> torch.Tensor:
        ids = self.prompts[:batch]
        out = self.composed.generate(ids, max_new_tokens=self.args.new_tokens, **options)
        return out[:, ids.shape[1] :]

    @torch.no_grad()
    def alone(self, model, batch: int) -> torch.Tensor:
        """A plain KV-cached greedy loop over one HF model (as the default case's baseline)."""
        from transformers import DynamicCache

        ids = self.prompts[:batch]
        cache = {cache_kwarg(model): DynamicCache(config=model.config)}
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache)
        tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(self.args.new_tokens - 1):
            out = model(input_ids=tokens[-1], use_cache=True, logits_to_keep=1, **cache)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        return torch.cat(tokens, 1)


def compiled_status(device) -> tuple[str | None, dict | None]:
    """(the option to pass, None) when a compiled step can be timed here, else (None, why not)."""
    option = compiled_option()
    if option is None:
        return None, {
            "status": "not available",
            "reason": "comm_cli.compose.generate has no compiled / CUDA-graph decoding option yet "
            f"(looked for: {', '.join(COMPILED_OPTIONS)})",
        }
    if device.type != "cuda":
        return None, {"status": "skipped", "reason": "needs CUDA", "option": option}
    return option, None


def decoding_case(args, device) -> dict:
    option, unavailable = compiled_status(device) if args.compiled else (None, None)
    if unavailable is not None:
        return unavailable  # the eager numbers are the plain case's; nothing to repeat
    decoders = Decoders(args, device)
    rows = {}
    for batch in batches(args):
        fns = {
            "composed": lambda b=batch: decoders.composition(b),
            "anchor": lambda b=batch: decoders.alone(decoders.anchor, b),
            "augment": lambda b=batch: decoders.alone(decoders.augment, b),
        }
        if option is not None:
            fns["composed_compiled"] = lambda b=batch: decoders.composition(b, **{option: True})
        seconds = time_interleaved(fns, device, args.warmup, args.repeats)
        per_token = {name: value / args.new_tokens for name, value in seconds.items()}
        alone = per_token["anchor"] + per_token["augment"]
        row = {
            "seconds_per_token": per_token,
            "composed_over_anchor_plus_augment": per_token["composed"] / alone,
            "tokens_per_s": batch / per_token["composed"],
        }
        if option is not None:
            eager, compiled = decoders.composition(batch), decoders.composition(batch, **{option: True})
            row["compiled_over_anchor_plus_augment"] = per_token["composed_compiled"] / alone
            row["compiled_tokens_equal_eager"] = bool(torch.equal(eager, compiled))
        rows[str(batch)] = row
    result = {
        "batches": rows,
        "new_tokens": args.new_tokens,
        "prompt": args.prompt,
        "target": "composed_over_anchor_plus_augment <= 1.10",
        "shapes": {
            "anchor": {
                k: getattr(decoders.anchor.config, k)
                for k in ("hidden_size", "num_hidden_layers", "vocab_size")
            },
            "augment": {k: getattr(decoders.augment.config, k) for k in ("hidden_size", "num_hidden_layers")},
            "connections": [list(c[1:]) for c in decoders.composed.bridge_connections],
        },
        "device": device_name(device),
        "dtype": "bfloat16 bases, float32 bridges, bf16 autocast" if device.type == "cuda" else "float32",
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    if option is not None:
        result["compiled_option"] = option
    return result
