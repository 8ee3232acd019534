"""How the benchmarks measure: wall time interleaved across variants (median of the repeats after
the warm-up rounds), and peak memory per variant: ``torch.cuda.max_memory_allocated`` on a GPU; on
the CPU the peak RSS of a fresh child process that runs only that variant (RSS cannot be reset
within one process)."""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

# the entry whose --memory-child NAME builds one variant in a fresh process and prints its peak
BENCH = Path(__file__).resolve().parents[1] / "bench.py"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def precision(device):
    """bf16 autocast on a GPU, as comm-train's mixed precision; nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_interleaved(fns: dict, device, warmup: int, repeats: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            with precision(device):
                fn()
            sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory(variants, names: list[str], values: dict) -> dict[str, float]:
    """Peak memory (MiB) of each named method of ``variants``; on the CPU in child processes run
    with this process's arguments followed by ``values`` as options (argparse keeps the last value
    of a repeated option, so the child builds the same case)."""
    if variants.args.no_memory:
        return {}
    if variants.device.type == "cuda":
        return peak_memory_cuda(variants, names)
    overrides = as_options(values)
    return {name: peak_rss_child(name, [*sys.argv[1:], *overrides]) for name in names}


def as_options(values: dict) -> list[str]:
    """Command-line options that rebuild a case: as_options({"seq": 512}) -> ['--seq', '512']."""
    return [item for key, value in values.items() for item in (f"--{key.replace('_', '-')}", str(value))]


def peak_memory_cuda(variants, names: list[str]) -> dict[str, float]:
    out = {}
    for name in names:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with precision(variants.device):
            getattr(variants, name)()
        sync(variants.device)
        out[name] = torch.cuda.max_memory_allocated() / 2**20
    return out


def peak_rss_child(name: str, argv: list[str]) -> float:
    """Peak RSS (MiB) of a fresh process that builds only the models one variant needs and runs it
    3 times (RSS sampled every millisecond while it runs)."""
    result = subprocess.run(
        [sys.executable, str(BENCH), *argv, "--memory-child", name],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def sampled_peak_rss(fn) -> float:
    """Peak resident memory (MiB) of this process while ``fn`` runs."""
    import psutil

    process, peak, running = psutil.Process(), [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        running[0] = False
        thread.join()
    return max(peak[0], process.memory_info().rss) / 2**20
