"""What a bench run reports: the table it prints, the JSON record it writes, model FLOPs
utilisation on a GPU and the name of the device it ran on."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def device_name(device) -> str:
    return (
        torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    )


def write_json(result: dict, path) -> Path:
    """``result`` as indented JSON at ``path``; returns the absolute path (printed by the caller)."""
    out = Path(path).resolve()
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def mfu(anchor, augment, step_seconds, tokens) -> float:
    """Model FLOPs utilisation of a calm step: 2*N*T (augment forward) + 4*N*T (anchor forward, and
    a backward of activation gradients only: frozen weights get no weight gradients, so not 6*N*T)
    over the GPU's bf16 dense peak (H100/H200 SXM: 989 TFLOP/s)."""
    anchor_params = sum(p.numel() for p in anchor.parameters())
    augment_params = sum(p.numel() for p in augment.parameters())
    useful = (4 * anchor_params + 2 * augment_params) * tokens  # fwd 2NT + activation-grad bwd 2NT
    peak = float(os.environ.get("COMM_PEAK_FLOPS", 989e12))
    return useful / step_seconds / peak


def table(result) -> str:
    rows = [
        ("calm_step / lower_bound", result["calm_step_over_lower_bound"], "<= 1.10"),
        ("calm_step / lora_step", result["calm_step_over_lora_step"], ""),
        ("cached_step / anchor fwd+bwd", result["cached_step_over_anchor_fwd_bwd"], "<= 1.10"),
        ("generation / (anchor + augment)", result["generation_over_anchor_plus_augment"], "<= 1.15"),
        ("peak memory calm / lora", result["peak_memory_over_lora"], "<= 1.2"),
    ]
    if "prompt_completion" in result:
        rows += [
            ("prompt case: calm / full-logit bound", result["calm_step_over_full_logits_bound"], "<= 0.90"),
            ("prompt case: peak mem / full logits", result["peak_memory_over_full_logits"], "<= 0.70"),
        ]
    aligned = result.get("aligned")
    if aligned:
        rows += [
            ("aligned tokens: step / shared step", aligned["aligned_step_over_shared_step"], "<= 1.10"),
            (
                "aligned tokens: decoding / shared",
                aligned["aligned_generation_over_shared_generation"],
                "",
            ),
            ("BPE + char augment: step / shared", aligned["cross_step_over_shared_step"], "info"),
            (
                "BPE + char augment: decoding / shared",
                aligned["cross_generation_over_shared_generation"],
                "info",
            ),
        ]
    lines = [f"{'ratio':38s} {'measured':>9s}  target"]
    for name, value, target in rows:
        lines.append(f"{name:38s} {value if value is None else round(value, 3)!s:>9s}  {target}")
    lines.append("")
    for name, seconds in result["seconds"].items():
        lines.append(f"  {name:18s} {seconds * 1000:9.1f} ms")
    for name, seconds in result["generation_seconds_per_token"].items():
        lines.append(f"  {name:18s} {seconds * 1000:9.2f} ms/token")
    for name, mib in result["peak_memory_mib"].items():
        lines.append(f"  peak {name:13s} {mib:9.0f} MiB")
    case = result.get("prompt_completion")
    if case:
        lines.append(
            f"  prompt/completion case: vocab {case['vocab']}, {case['loss_tokens_per_step']} of "
            f"{case['tokens_per_step']} tokens carry loss"
        )
        for name, seconds in case["seconds"].items():
            lines.append(f"  {name:22s} {seconds * 1000:9.1f} ms")
        for name, mib in case["peak_memory_mib"].items():
            lines.append(f"  peak {name:21s} {mib:9.0f} MiB")
    if aligned:
        tokens = aligned["tokens_per_row"]
        lines.append(
            f"  aligned case: vocab {aligned['vocab']}, tokens per row anchor/augment: "
            + ", ".join(f"{path} {t['anchor']:.0f}/{t['augment']:.0f}" for path, t in tokens.items())
            + " (char augment: more augment tokens, more augment compute)"
        )
        for name, seconds in aligned["seconds"].items():
            lines.append(f"  {name:22s} {seconds * 1000:9.1f} ms")
        for name, seconds in aligned["generation_seconds_per_token"].items():
            lines.append(f"  {name:22s} {seconds * 1000:9.2f} ms/token")
    lines.append(f"  device {result['device']}, {result['dtype']}, {result['threads']} threads")
    return "\n".join(lines)
