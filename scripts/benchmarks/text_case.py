"""The default case (every token carries loss): comm's step against its lower bound and against
LoRA with the same parameter budget, the cached step against the anchor alone, decoding against
anchor + augment decoding, and peak memory. Its keys are the top of bench.json."""

from __future__ import annotations

import torch

from benchmarks.measure import peak_memory, time_interleaved
from benchmarks.report import device_name, mfu
from benchmarks.variants import Variants


def text_case(args, device) -> dict:
    variants = Variants(args, device)
    variants.lora()
    steps = {
        "lower_bound": variants.lower_bound,
        "anchor_fwd_bwd": variants.anchor_fwd_bwd,
        "augment_forward": variants.augment_forward,
        "calm_step": variants.calm_step,
        "cached_step": variants.cached_step,
        "lora_step": variants.lora_step,
    }
    step_times = time_interleaved(steps, device, args.warmup, args.repeats)
    gen = {
        "composed_generate": variants.composed_generate,
        "anchor_generate": variants.anchor_generate,
        "augment_generate": variants.augment_generate,
    }
    gen_times = time_interleaved(gen, device, 1, max(5, args.repeats // 2))
    per_token = {k: v / args.new_tokens for k, v in gen_times.items()}
    memory = peak_memory(variants, ["calm_step", "lora_step", "cached_step", "lower_bound"], {})

    tokens = args.batch * args.seq
    _, _, lora_rank, lora_params = variants.lora()
    result = {
        "calm_step_over_lower_bound": step_times["calm_step"] / step_times["lower_bound"],
        "calm_step_over_lora_step": step_times["calm_step"] / step_times["lora_step"],
        "cached_step_over_anchor_fwd_bwd": step_times["cached_step"] / step_times["anchor_fwd_bwd"],
        "generation_over_anchor_plus_augment": per_token["composed_generate"]
        / (per_token["anchor_generate"] + per_token["augment_generate"]),
        "peak_memory_over_lora": (memory["calm_step"] / memory["lora_step"]) if memory else None,
        "seconds": step_times,
        "generation_seconds_per_token": per_token,
        "peak_memory_mib": memory,
        "memory_measure": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "peak RSS of a child process",
        "tokens_per_step": tokens,
        "calm_tokens_per_s": tokens / step_times["calm_step"],
        "shapes": {
            "anchor": {
                k: getattr(variants.anchor.config, k)
                for k in ("hidden_size", "num_hidden_layers", "vocab_size")
            },
            "augment": {
                k: getattr(variants.full_augment.config, k) for k in ("hidden_size", "num_hidden_layers")
            },
            "connections": [list(c[1:]) for c in variants.composed.bridge_connections],
            "batch": args.batch,
            "seq": args.seq,
            "bridge_params": variants.budget,
            "lora_rank": lora_rank,
            "lora_params": lora_params,
        },
        "device": device_name(device),
        "dtype": "bfloat16 bases, float32 bridges, bf16 autocast" if device.type == "cuda" else "float32",
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        result["mfu"] = mfu(variants.anchor, variants.augment_base, step_times["calm_step"], tokens)
    return result
