"""How a comm training step's cost grows: step time and peak memory against sequence length and
number of connections, each beside its lower bound (docs/performance.md, "The cost model"; every logit computed).

Run through ``python scripts/bench.py --sweep`` (same model options). Each point is the
prompt/completion case (``--case-prompt-fraction``, default 70% prompt) at ``--sweep-vocab``
(default 32000, so the full-logit variants fit in memory at 4096 tokens), batch
``--sweep-batch``; the length sweep uses the default connections (every 4th layer), the
connections sweep ``--sweep-seq`` tokens. For each point it measures, interleaved (median of
``--sweep-repeats`` after one warm-up round):

  lower_bound            anchor fwd + bwd with every logit, + augment forward
  calm_step              comm's step (the head only at the loss positions, chunked)
  calm_step_full_logits  the same step computing every logit

and the peak memory of the two steps (child processes on the CPU). Writes ``--sweep-out`` (JSON),
prints a Markdown table and draws ``--plot`` (plot.py; needs matplotlib: pip install 'comm-cli[bench]').
"""

from __future__ import annotations

import time

import torch

from benchmarks.prompt_case import measure_steps
from benchmarks.report import device_name, write_json


def _points(args) -> list[tuple[str, int, dict]]:
    common = dict(batch=args.sweep_batch, vocab=args.sweep_vocab, prompt_fraction=args.case_prompt_fraction)
    points = [("seq", seq, dict(seq=seq, **common)) for seq in _ints(args.sweep_seqs)]
    points += [
        ("connections", n, dict(seq=args.sweep_seq, connections=n, **common))
        for n in _ints(args.sweep_connections)
    ]
    return points


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def measure_point(args, device, values: dict) -> dict:
    case, variants, times, memory = measure_steps(args, device, values, 1, args.sweep_repeats)
    return {
        "seq": case.seq,
        "batch": case.batch,
        "connections": len(variants.composed.bridge_connections),
        "seconds": times,
        "peak_memory_mib": memory,
        "calm_over_bound": times["calm_step"] / times["lower_bound"],
        "full_logits_over_bound": times["calm_step_full_logits"] / times["lower_bound"],
        "memory_calm_over_full_logits": memory["calm_step"] / memory["calm_step_full_logits"]
        if memory
        else None,
    }


def run_sweep(args, device) -> dict:
    rows = []
    for axis, value, values in _points(args):
        started = time.perf_counter()
        row = {"axis": axis, "value": value, **measure_point(args, device, values)}
        rows.append(row)
        ms = {name: round(seconds * 1000) for name, seconds in row["seconds"].items()}
        print(
            f"{axis}={value}: {ms} ms, calm/bound {row['calm_over_bound']:.3f}, peak "
            f"{row['peak_memory_mib']} MiB ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    result = {
        "rows": rows,
        "vocab": args.sweep_vocab,
        "prompt_fraction": args.case_prompt_fraction,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "repeats": args.sweep_repeats,
        "torch": torch.__version__,
    }
    out = write_json(result, args.sweep_out)
    print(markdown_table(rows))
    print(f"wrote {out}")
    try:
        from benchmarks.plot import plot_sweep
    except ImportError as err:  # matplotlib is an optional extra
        print(f"no plot ({err}): pip install 'comm-cli[bench]'")
    else:
        print(f"wrote {plot_sweep(result, args.plot)}")
    return result


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| sweep | value | bound ms | calm ms | full-logit step ms | calm / bound | full-logit / bound "
        "| peak calm MiB | peak full-logit MiB | memory ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s, m = r["seconds"], r["peak_memory_mib"]
        memory = (
            f"{m['calm_step']:.0f} | {m['calm_step_full_logits']:.0f} | {r['memory_calm_over_full_logits']:.2f}"
            if m
            else "- | - | -"
        )
        label = "sequence length" if r["axis"] == "seq" else f"connections (seq {r['seq']})"
        lines.append(
            f"| {label} | {r['value']} | {s['lower_bound'] * 1e3:.0f} | {s['calm_step'] * 1e3:.0f} "
            f"| {s['calm_step_full_logits'] * 1e3:.0f} | {r['calm_over_bound']:.2f} "
            f"| {r['full_logits_over_bound']:.2f} | {memory} |"
        )
    return "\n".join(lines)
