"""The picture of ``bench.py --sweep`` (matplotlib, an optional extra: pip install 'comm-cli[bench]')."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

LINES = {
    "lower_bound": ("bound (every logit)", "k", "--"),
    "calm_step": ("comm step (loss positions, chunked)", "tab:blue", "-"),
    "calm_step_full_logits": ("comm step, every logit", "tab:orange", ":"),
}


def plot_sweep(result: dict, path: str | Path) -> Path:
    """Four panels: step time and peak memory against sequence length, and the ratio of each step
    to the bound against sequence length and against the number of connections."""
    seq = [r for r in result["rows"] if r["axis"] == "seq"]
    conn = [r for r in result["rows"] if r["axis"] == "connections"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (time_ax, memory_ax), (ratio_seq_ax, ratio_conn_ax) = axes
    lengths = [r["value"] for r in seq]
    for name, (label, color, style) in LINES.items():
        time_ax.plot(lengths, [r["seconds"][name] for r in seq], style, color=color, marker="o", label=label)
        if name != "lower_bound" and seq and seq[0]["peak_memory_mib"]:
            memory_ax.plot(
                lengths,
                [r["peak_memory_mib"][name] / 1024 for r in seq],
                style,
                color=color,
                marker="o",
                label=label,
            )
    for ax, rows, xlabel in ((ratio_seq_ax, seq, "sequence length"), (ratio_conn_ax, conn, "connections")):
        xs = [r["value"] for r in rows]
        ax.plot(
            xs,
            [r["calm_over_bound"] for r in rows],
            "-",
            color="tab:blue",
            marker="o",
            label=LINES["calm_step"][0],
        )
        ax.plot(
            xs,
            [r["full_logits_over_bound"] for r in rows],
            ":",
            color="tab:orange",
            marker="o",
            label=LINES["calm_step_full_logits"][0],
        )
        ax.axhline(1.0, color="k", linestyle="--", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("step time / bound")
        ratios = [r[k] for r in rows for k in ("calm_over_bound", "full_logits_over_bound")]
        ax.set_ylim(0, max(1.3, *ratios) + 0.1)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.legend(fontsize=8)
    for ax in (time_ax, memory_ax, ratio_seq_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(x) for x in lengths])
    time_ax.set_yscale("log")
    time_ax.set(xlabel="sequence length", ylabel="step time (s)")
    memory_ax.set(xlabel="sequence length", ylabel="peak memory (GiB)")
    time_ax.legend(fontsize=8)
    if memory_ax.lines:
        memory_ax.legend(fontsize=8)
    seq_len = conn[0]["seq"] if conn else ""
    fig.suptitle(
        f"comm step vs its lower bound: vocab {result['vocab']}, {result['prompt_fraction']:.0%} prompt, "
        f"batch {seq[0]['batch'] if seq else ''}; connections sweep at {seq_len} tokens\n"
        f"{result['device']}, threads: {result['threads']}, median of {result['repeats']}"
    )
    fig.tight_layout()
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
