"""Prompt/completion rows (``--case-prompt-fraction``, default 70% prompt, no loss there) at
``--case-vocab`` (default 128256, Llama 3): comm's step (the anchor's head only at the loss
positions, in chunks) against the lower bound that computes every logit, and its peak memory
against the same step computing every logit. Each point of the sweep is this case."""

from __future__ import annotations

from benchmarks.measure import peak_memory, time_interleaved
from benchmarks.models import with_values
from benchmarks.variants import Variants


def measure_steps(args, device, values: dict, warmup: int, repeats: int):
    """The case ``args`` with ``values`` replaced: its settings, its variants, the median seconds
    of the bound and both steps, and the peak memory of both steps."""
    case = with_values(args, **values)
    variants = Variants(case, device, lean=True)
    steps = {
        "lower_bound": variants.lower_bound,
        "calm_step": variants.calm_step,
        "calm_step_full_logits": variants.calm_step_full_logits,
    }
    times = time_interleaved(steps, device, warmup, repeats)
    memory = peak_memory(variants, ["calm_step", "calm_step_full_logits"], values)
    return case, variants, times, memory


def prompt_case(args, device) -> dict:
    values = {"vocab": args.case_vocab, "prompt_fraction": args.case_prompt_fraction}
    case, variants, times, memory = measure_steps(args, device, values, args.warmup, args.repeats)
    return {
        "calm_step_over_lower_bound": times["calm_step"] / times["lower_bound"],
        "calm_step_full_logits_over_lower_bound": times["calm_step_full_logits"] / times["lower_bound"],
        "peak_memory_over_full_logits": memory["calm_step"] / memory["calm_step_full_logits"]
        if memory
        else None,
        "seconds": times,
        "peak_memory_mib": memory,
        "vocab": variants.vocab,
        "prompt_fraction": case.prompt_fraction,
        "loss_tokens_per_step": int((variants.labels[:, 1:] != -100).sum()),
        "tokens_per_step": case.batch * case.seq,
    }
