"""Training throughput (``--throughput``): comm's step on prompt/completion rows with each loss
backend of ``comm_cli/linear_ce.py`` side by side (``COMM_LINEAR_CE=torch|liger|cce``), at every
sequence length of ``--throughput-seqs`` with about ``--throughput-tokens`` tokens a step. The
GPU suite runs it at the 1b preset (~1.5B anchor + 0.6B augment, random weights of the real
shapes, nothing downloaded), bf16 bases with fp32 bridges under autocast.

Per sequence length and backend it reports the step time, the step against the lower bound
(docs/performance.md, "The cost model"; the bound computes every logit), MFU as ``report.mfu``
counts it (the definition in docs/performance.md, kept there alone), tokens/s, peak memory against the same step computing
every logit, and the loss and bridge gradients against the torch backend's (a backend that is
fast but wrong must not become ``COMM_LINEAR_CE=auto``'s first choice). A backend that cannot run
here (a CPU, a library not installed) is recorded as skipped with the reason ``select_backend``
gives, one that fails (a library's API or kernel) as failed with its error, and the others still
run; ``measured_order`` is the backends that agree with torch, fastest first.
"""

from __future__ import annotations

import contextlib
import os

import torch

from benchmarks.measure import peak_memory_cuda, precision, time_interleaved
from benchmarks.models import with_values
from benchmarks.report import device_name, mfu
from benchmarks.variants import Variants
from comm_cli.errors import ConfigError
from comm_cli.linear_ce import BACKEND_ENV, select_backend
from comm_cli.output_head import output_head

BACKENDS = ("torch", "liger", "cce")
# a backend agrees with torch when its loss and bridge gradients are this close (relative)
AGREEMENT = 2e-2


@contextlib.contextmanager
def loss_backend(name: str | None):
    """``COMM_LINEAR_CE=name`` while the block runs (read by comm at every loss)."""
    old = os.environ.get(BACKEND_ENV)
    if name is None:
        os.environ.pop(BACKEND_ENV, None)
    else:
        os.environ[BACKEND_ENV] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = old


def usable_backends(variants) -> tuple[list[str], dict]:
    """The backends that can run here, and for the others why not (select_backend's words)."""
    head = output_head(variants.anchor)
    usable, not_run = [], {}
    for name in BACKENDS:
        try:
            select_backend(variants.device, head, name)
        except ConfigError as error:
            needs_cuda = variants.device.type != "cuda"
            not_run[name] = {"status": "skipped", "reason": "needs CUDA" if needs_cuda else str(error)}
        else:
            usable.append(name)
    with loss_backend(None):
        auto = select_backend(variants.device, head) if head is not None else "torch"
    return usable, {"not_run": not_run, "auto_selects": auto}


def loss_and_gradients(variants) -> tuple[float, torch.Tensor]:
    """One forward and backward of comm's step (no optimizer step): the loss and the bridges'
    gradients, flattened in float32."""
    variants.optimizer.zero_grad(set_to_none=True)
    with precision(variants.device):
        out = variants.composed(variants.ids, variants.mask, labels=variants.labels, return_logits=False)
    out.loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in variants.composed.bridges.parameters()])
    variants.optimizer.zero_grad(set_to_none=True)
    return float(out.loss.detach()), grads


def agreement(variants, backends: list[str]) -> tuple[dict, dict]:
    """Each backend's loss and gradients against the torch backend's, on the same batch; and the
    backends that failed (a library's API or kernel), so that they cost the others nothing."""
    reference = None
    out, failed = {}, {}
    for name in ["torch", *[b for b in backends if b != "torch"]]:
        if name not in backends:
            continue
        try:
            with loss_backend(name):
                loss, grads = loss_and_gradients(variants)
        except Exception as error:  # recorded with the reason; the other backends still run
            failed[name] = {"status": "failed", "reason": f"{type(error).__name__}: {error}"[:500]}
            variants.optimizer.zero_grad(set_to_none=True)
            continue
        if reference is None:
            reference = (loss, grads)
        ref_loss, ref_grads = reference
        out[name] = {
            "loss": loss,
            "loss_rel_diff": abs(loss - ref_loss) / max(abs(ref_loss), 1e-12),
            "grad_rel_diff": float((grads - ref_grads).norm() / ref_grads.norm().clamp_min(1e-12)),
        }
        del grads
    return out, failed


def one_length(args, device, seq: int) -> dict:
    batch = max(1, args.throughput_tokens // seq)
    case = with_values(args, seq=seq, batch=batch, prompt_fraction=args.case_prompt_fraction)
    variants = Variants(case, device, lean=True)
    backends, notes = usable_backends(variants)
    agree, failed = agreement(variants, backends)
    notes["not_run"].update(failed)
    backends = [name for name in backends if name in agree]

    def step_with(name):
        def step():
            with loss_backend(name):
                variants.calm_step()

        return step

    fns = {"lower_bound": variants.lower_bound, "calm_step_full_logits": variants.calm_step_full_logits}
    fns.update({f"calm_step_{name}": step_with(name) for name in backends})
    seconds = time_interleaved(fns, device, args.warmup, args.repeats)
    memory = {}
    if device.type == "cuda" and not args.no_memory:
        memory = peak_memory_cuda(variants, ["calm_step_full_logits"])
        for name in backends:
            with loss_backend(name):
                memory[f"calm_step_{name}"] = peak_memory_cuda(variants, ["calm_step"])["calm_step"]
    tokens = case.batch * case.seq
    rows = {}
    for name in BACKENDS:
        if name not in backends:
            rows[name] = notes["not_run"][name]
            continue
        step = seconds[f"calm_step_{name}"]
        rows[name] = {
            "status": "ok",
            "step_seconds": step,
            "step_over_lower_bound": step / seconds["lower_bound"],
            "tokens_per_s": tokens / step,
            "mfu": mfu(variants.anchor, variants.augment_base, step, tokens)
            if device.type == "cuda"
            else None,
            "peak_memory_mib": memory.get(f"calm_step_{name}"),
            "peak_memory_over_full_logits": memory[f"calm_step_{name}"] / memory["calm_step_full_logits"]
            if memory
            else None,
            **agree[name],
        }
    agreeing = [
        n for n in backends if rows[n]["loss_rel_diff"] < AGREEMENT and rows[n]["grad_rel_diff"] < AGREEMENT
    ]
    return {
        "seq": case.seq,
        "batch": case.batch,
        "tokens_per_step": tokens,
        "loss_tokens_per_step": int((variants.labels[:, 1:] != -100).sum()),
        "backends": rows,
        "seconds": seconds,
        "full_logits_over_lower_bound": seconds["calm_step_full_logits"] / seconds["lower_bound"],
        "peak_memory_full_logits_mib": memory.get("calm_step_full_logits"),
        "parameters": {
            "anchor": sum(p.numel() for p in variants.anchor.parameters()),
            "augment_used": sum(p.numel() for p in variants.augment_base.parameters()),
            "bridges": variants.budget,
        },
        "auto_selects": notes["auto_selects"],
        "measured_order": sorted(agreeing, key=lambda n: seconds[f"calm_step_{n}"]),
    }


def throughput_case(args, device) -> dict:
    lengths = [int(s) for s in args.throughput_seqs.split(",") if s.strip()]
    rows = []
    for seq in lengths:
        rows.append(one_length(args, device, seq))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    best = {
        name: max((r["backends"][name].get("mfu") or 0.0) for r in rows)
        for name in BACKENDS
        if any(r["backends"][name]["status"] == "ok" for r in rows)
    }
    return {
        "lengths": rows,
        "best_mfu": best if device.type == "cuda" else None,
        "mfu_note": "4 x anchor + 2 x augment parameters x tokens over the GPU's dense bf16 peak "
        "(benchmarks/report.py mfu; COMM_PEAK_FLOPS overrides the 989 TFLOP/s of an H100/H200 SXM)"
        if device.type == "cuda"
        else "not computed: no dense bf16 peak for a CPU",
        "target": "mfu >= 0.45; step_over_lower_bound <= 1.10",
        "prompt_fraction": args.case_prompt_fraction,
        "preset": args.preset,
        "device": device_name(device),
        "dtype": "bfloat16 bases, float32 bridges, bf16 autocast" if device.type == "cuda" else "float32",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
