"""Benchmark comm's composition against its cost lower bound (docs/performance.md, "The cost model").

Builds random models locally (default: a Llama-style anchor of width 512, 8 layers, vocab 32000
and a Qwen2-style augment of width 256, 8 layers) and measures in ONE process, interleaved and
repeated (median of --repeats after --warmup rounds):

  lower_bound   anchor forward + backward with frozen weights (activation gradients only, from
                the loss down to the lowest connected anchor layer) + augment forward (no grad)
                up to its last connected layer
  calm_step     a full comm training step (forward, backward, AdamW step over the bridges)
  cached_step   the same step reading precomputed augment states (trainer.cache_augment_states)
  anchor_fwd_bwd  the anchor part of the lower bound alone
  lora_step     a PEFT LoRA step on the anchor with the bridges' trainable-parameter budget
  generation    composed KV-cached greedy decoding per token vs anchor-only + augment-only

Every token carries loss there (text). A second case is prompt/completion data at vocab 128256
(Llama 3), where the first 70% of each row is prompt and carries no loss:

  calm_step             comm's step: the anchor's head runs only at the loss positions, in chunks
  calm_step_full_logits the same step computing every logit (comm before the chunked loss)
  lower_bound           the same bound as above, which computes every logit

and reports calm_step / lower_bound (calm_step_over_full_logits_bound) and the peak memory of
calm_step against calm_step_full_logits (peak_memory_over_full_logits).

A third case measures the character alignment (comm_cli/compose/alignment.py) on the same
models (vocab = a byte-level BPE trained in-process on random text; batches from comm-train's
own tokenize_split + CompletionCollator), over one set of frozen weights and bridges:

  shared_step / _generate   the augment reads the anchor's ids (the plain path)
  aligned_step / _generate  the augment reads its own tokens through the alignment, with the
                            same tokenizer (tokens="aligned"): only the alignment differs
  cross_step / _generate    the augment reads characters (information: more augment tokens)

and reports aligned_step / shared_step (aligned_step_over_shared_step) and decoding per token.

Peak memory per variant: torch.cuda.max_memory_allocated on a GPU; on the CPU the peak RSS of a
fresh child process that runs only that variant (RSS cannot be reset within one process).

    python scripts/bench.py                      # CPU, float32
    python scripts/bench.py --device cuda        # bf16 bases, fp32 bridges
    python scripts/bench.py --preset 1b          # ~1B anchor + ~0.5B augment (for a GPU)
    python scripts/bench.py --sweep              # step time and memory against sequence length
                                                 # and connections -> bench_sweep.json (+ .png)
    python scripts/bench.py --decoding --preset 1b --device cuda     # per token, batch 1 and 16
    python scripts/bench.py --throughput --preset 1b --device cuda   # MFU per loss backend

(--decoding and --throughput are the GPU suite's cases: scripts/gpu_suite.py, docs/gpu.md.)

Prints a table and writes bench.json (path printed). Ratios only: no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.aligned_case import aligned_case  # noqa: E402
from benchmarks.decoding_case import decoding_case  # noqa: E402
from benchmarks.measure import sampled_peak_rss  # noqa: E402
from benchmarks.models import PRESETS  # noqa: E402
from benchmarks.prompt_case import prompt_case  # noqa: E402
from benchmarks.report import table, write_json  # noqa: E402
from benchmarks.sweep import run_sweep  # noqa: E402
from benchmarks.text_case import text_case  # noqa: E402
from benchmarks.throughput_case import throughput_case  # noqa: E402
from benchmarks.variants import Variants  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--anchor-width", type=int)
    parser.add_argument("--anchor-layers", type=int)
    parser.add_argument("--augment-width", type=int)
    parser.add_argument("--augment-layers", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--every", type=int, default=4, help="mapping.every (the paper's default: 4)")
    parser.add_argument("--connections", type=int, help="mapping.count (spread evenly) instead of --every")
    parser.add_argument("--bridge-heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--prompt-fraction", type=float, default=0.0, help="share of each row that is prompt (no loss)"
    )
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--case-vocab", type=int, default=128256, help="vocab of the prompt/completion case")
    parser.add_argument("--case-prompt-fraction", type=float, default=0.7)
    parser.add_argument("--no-prompt-case", action="store_true", help="skip the prompt/completion case")
    parser.add_argument(
        "--no-aligned-case", action="store_true", help="skip the aligned-tokens (character alignment) case"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="step time and memory against length and connections"
    )
    parser.add_argument("--sweep-seqs", default="256,512,1024,2048,4096")
    parser.add_argument("--sweep-connections", default="1,2,4,8")
    parser.add_argument(
        "--sweep-seq", type=int, default=1024, help="sequence length of the connections sweep"
    )
    parser.add_argument("--sweep-batch", type=int, default=1)
    parser.add_argument("--sweep-vocab", type=int, default=32000)
    parser.add_argument("--sweep-repeats", type=int, default=3)
    parser.add_argument("--sweep-out", default="bench_sweep.json")
    parser.add_argument("--plot", default="bench_sweep.png", help="the sweep's picture (needs matplotlib)")
    parser.add_argument(
        "--decoding", action="store_true", help="decoding per token only, at every --decode-batches"
    )
    parser.add_argument("--decode-batches", default="1,16")
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="with --decoding: time comm's compiled / CUDA-graph decoding step (when comm has one)",
    )
    parser.add_argument(
        "--throughput",
        action="store_true",
        help="training throughput only: each COMM_LINEAR_CE backend, MFU, memory against every logit",
    )
    parser.add_argument("--throughput-seqs", default="1024,2048")
    parser.add_argument(
        "--throughput-tokens", type=int, default=8192, help="tokens a step (batch = this / sequence length)"
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.memory_child:  # one variant in a fresh process: print its peak RSS (measure.py)
        variants = Variants(args, device, only=args.memory_child)
        print(sampled_peak_rss(lambda: [getattr(variants, args.memory_child)() for _ in range(3)]))
        return
    if args.sweep:
        run_sweep(args, device)
        return
    if args.decoding or args.throughput:  # the GPU suite's cases (scripts/gpu_suite.py)
        result = decoding_case(args, device) if args.decoding else throughput_case(args, device)
        print(json.dumps(result, indent=2))
        print(f"wrote {write_json(result, args.out)}")
        return
    result = text_case(args, device)
    if not args.no_prompt_case:
        result["prompt_completion"] = prompt_case(args, device)
        result["calm_step_over_full_logits_bound"] = result["prompt_completion"]["calm_step_over_lower_bound"]
        result["peak_memory_over_full_logits"] = result["prompt_completion"]["peak_memory_over_full_logits"]
    if not args.no_aligned_case:
        result["aligned"] = aligned_case(args, device)
        result["aligned_step_over_shared_step"] = result["aligned"]["aligned_step_over_shared_step"]
    out = write_json(result, args.out)
    print(table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
