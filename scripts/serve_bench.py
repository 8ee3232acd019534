"""Benchmark comm-serve: batched serving against one request at a time, in one run.

Builds a tiny composition (a Llama-style anchor, width 48, 4 layers, and a GPT-NeoX-style
augment, width 32, 2 layers, on comm's character tokenizer, random bridges), then for each mode
starts `comm-serve` on 127.0.0.1 (a free port; one torch thread, as on a shared CPU) and sends a
fixed number of streamed greedy completions from N concurrent clients (each sends its next
request when its last is answered):

  batched     batching=true max_batch_size=N (requests that arrive together share a batch)
  unbatched   batching=false (one request at a time)

Per mode: requests/s, generated tokens/s (from the usage the server reports), p50/p95 latency
and time to first token, failed requests. Prints a table and the ratio batched/unbatched of
tokens/s, and writes serve_bench.json (path printed). Ratios only: no timing is asserted.

    python scripts/serve_bench.py                      # 16 clients, 64 requests per mode
    python scripts/serve_bench.py --clients 32 --requests 128 --max-tokens 64
    make bench-serve BENCH_ARGS="--clients 8"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"batched": ["batching=true"], "unbatched": ["batching=false"]}


def build_composition(path: Path) -> Path:
    """A tiny saved composition with random, non-zero bridges (no training: the speed of serving
    does not depend on what the bridges learned)."""
    import torch
    import transformers as tf

    from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
    from comm_cli.data.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    ids = dict(
        vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512
    )
    torch.manual_seed(0)
    anchor = tf.LlamaForCausalLM(
        tf.LlamaConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            **ids,
        )
    )
    augment = tf.GPTNeoXForCausalLM(
        tf.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **ids
        )
    )
    for name, model in (("anchor", anchor), ("augment", augment)):
        model.save_pretrained(path / name)
        tokenizer.save_pretrained(path / name)
    anchor = tf.AutoModelForCausalLM.from_pretrained(path / "anchor")
    augment = tf.AutoModelForCausalLM.from_pretrained(path / "augment")
    composed = ComposedModel.from_models(
        anchor, augment, MappingSpec(every=2), BridgeConfig(num_heads=4, zero_init_output=False)
    )
    composed.save_pretrained(path / "bench" / "composition")
    return path / "bench" / "composition"


def start_server(checkpoint: Path, settings: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    """comm-serve on a free port of 127.0.0.1; (process, base URL) once it listens."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    command = [
        sys.executable,
        "-m",
        "comm_cli.serve",
        f"checkpoint={checkpoint}",
        "port=0",
        f"num_threads={threads}",
    ]
    process = subprocess.Popen(
        command + settings, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        found = re.search(r"serving \S+ at (http://\S+)", line)
        if found:
            return process, found.group(1)
    raise SystemExit("comm-serve did not start:\n" + "".join(lines))


async def one_request(client, url: str, body: dict) -> dict:
    """A streamed completion: latency, time to first token, tokens generated (or the failure)."""
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/completions", json=body) as response:
            if response.status_code != 200:
                return {
                    "ok": False,
                    "error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}",
                }
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "error": chunk["error"]["message"]}
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as err:  # a failed request is counted, not fatal
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}
    latency = time.perf_counter() - start
    return {"ok": True, "latency": latency, "ttft": first if first is not None else latency, "tokens": tokens}


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` concurrent clients share ``requests`` requests; each waits for its answer."""
    import httpx

    prompts = [f"{a}+{b}={'x' * (a % 5)}" for a in range(10) for b in range(10)]
    bodies = [
        {
            "model": model,
            "prompt": prompts[i % len(prompts)],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for i in range(requests)
    ]
    queue = list(reversed(bodies))
    results = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker():
            while queue:
                results.append(await one_request(client, url, queue.pop()))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    summary = {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "tokens": sum(r["tokens"] for r in ok),
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
    }
    for name in ("latency", "ttft"):
        values = sorted(r[name] for r in ok) or [float("nan")]
        summary[f"{name}_p50_s"] = statistics.median(values)
        summary[f"{name}_p95_s"] = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
    errors = [r["error"] for r in results if not r["ok"]]
    if errors:
        summary["first_error"] = errors[0]
    return summary


def run_mode(checkpoint: Path, settings: list[str], args) -> dict:
    import httpx

    process, url = start_server(checkpoint, settings, args.threads)
    try:
        model = httpx.get(f"{url}/models").json()["data"][0]["id"]
        asyncio.run(load(url, model, min(args.clients, 2), 2, args.max_tokens))  # warm up
        result = asyncio.run(load(url, model, args.clients, args.requests, args.max_tokens))
        result["server"] = httpx.get(f"{url.removesuffix('/v1')}/health").json()
        return result
    finally:
        process.terminate()
        process.wait(60)


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--requests", type=int, default=64, help="requests per mode (default 64)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="the server's batch_wait_ms")
    parser.add_argument("--checkpoint", type=Path, default=None, help="serve this composition instead")
    parser.add_argument("--output", type=Path, default=Path("serve_bench.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="comm_serve_bench_") as tmp:
        checkpoint = args.checkpoint or build_composition(Path(tmp))
        extra = [f"max_batch_size={args.clients}", "max_queue=1024"]
        if args.batch_wait_ms is not None:
            extra.append(f"batch_wait_ms={args.batch_wait_ms}")
        results = {mode: run_mode(checkpoint, settings + extra, args) for mode, settings in MODES.items()}

    ratio = results["batched"]["tokens_per_s"] / results["unbatched"]["tokens_per_s"]
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": vars(args) | {"checkpoint": str(args.checkpoint or "tiny (built in the run)")},
        "results": results,
        "batched_over_unbatched_tokens_per_s": ratio,
    }
    report["settings"]["output"] = str(args.output)
    columns = ("requests_per_s", "tokens_per_s", "latency_p50_s", "latency_p95_s", "ttft_p50_s", "ttft_p95_s")
    print(f"{'mode':<10} " + " ".join(f"{c:>14}" for c in columns) + f" {'failed':>7}")
    for mode, result in results.items():
        print(f"{mode:<10} " + " ".join(f"{result[c]:>14.3f}" for c in columns) + f" {result['failed']:>7}")
    print(
        f"batched / unbatched tokens/s: {ratio:.2f}x with {args.clients} clients "
        f"({report['machine']['cores']} cores, {args.threads} torch thread(s), {report['date']})"
    )
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output.resolve()}")


if __name__ == "__main__":
    main()
