"""Benchmark comm's composition against its cost lower bound (DESIGN.md section 3).

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

Prints a table and writes bench.json (path printed). Ratios only: no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import os
import platform
import random
import statistics
import string
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec  # noqa: E402
from comm_cli.compose.blocks import find_blocks  # noqa: E402
from comm_cli.compose.bridge import bridge_parameter_count  # noqa: E402
from comm_cli.compose.mapping import resolve_connections  # noqa: E402
from comm_cli.compose.masks import positions_from_mask  # noqa: E402
from comm_cli.training.models import batch_loss  # noqa: E402

PRESETS = {
    # width, layers, heads, kv heads, intermediate
    "default": {"anchor": (512, 8, 8, 8, 1376), "augment": (256, 8, 4, 2, 688), "vocab": 32000},
    "1b": {"anchor": (2048, 16, 32, 8, 8192), "augment": (896, 24, 14, 2, 4864), "vocab": 128256},
}


def build_models(args, dtype, device):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    preset = PRESETS[args.preset]
    aw, al, ah, akv, ai = preset["anchor"]
    uw, ul, uh, ukv, ui = preset["augment"]
    vocab = args.vocab or preset["vocab"]
    anchor_cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.anchor_width or aw,
        num_hidden_layers=args.anchor_layers or al,
        num_attention_heads=ah,
        num_key_value_heads=akv,
        intermediate_size=ai,
        max_position_embeddings=4096,
    )
    augment_cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=args.augment_width or uw,
        num_hidden_layers=args.augment_layers or ul,
        num_attention_heads=uh,
        num_key_value_heads=ukv,
        intermediate_size=ui,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialise where the model will run (fast for ~1B on a GPU)
        anchor = AutoModelForCausalLM.from_config(anchor_cfg, dtype=dtype).eval()
        augment = AutoModelForCausalLM.from_config(augment_cfg, dtype=dtype).eval()
    return anchor, augment


def loss_of(logits, labels):
    """Mean float32 cross-entropy over every logit (labels -100 ignored): the unchunked path."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def prompt_labels(ids: torch.Tensor, prompt_fraction: float) -> torch.Tensor:
    """Labels of prompt/completion rows: the first ``prompt_fraction`` of each row carries no loss."""
    labels = ids.clone()
    labels[:, : int(round(ids.shape[1] * prompt_fraction))] = -100
    return labels


class Variants:
    """Everything measured, built once and sharing the same frozen weights. On a GPU every
    variant runs under bf16 autocast, as comm-train's mixed precision does (the fp32 bridge
    weights are then used in bf16 matmuls, their gradients and optimizer state stay fp32)."""

    def __init__(self, args, device, only: str | None = None, lean: bool = False):
        """``only``: build just what that variant needs (a peak-memory child process); ``lean``:
        no LoRA or generation copies (the prompt/completion case and the sweep)."""
        self.args, self.device = args, device
        base_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        anchor, augment = build_models(args, base_dtype, device)
        self.anchor = anchor.to(device)
        self.vocab = anchor.config.vocab_size
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, self.vocab, (args.batch, args.seq), generator=g).to(device)
        self.mask = torch.ones_like(self.ids)
        self.labels = prompt_labels(self.ids, args.prompt_fraction)
        self.positions = positions_from_mask(self.mask)
        mapping, bridge = (
            MappingSpec(count=args.connections) if args.connections else MappingSpec(every=args.every),
            BridgeConfig(num_heads=args.bridge_heads, zero_init_output=False),
        )
        self.budget = len(
            resolve_connections(mapping, augment.config.num_hidden_layers, anchor.config.num_hidden_layers)
        ) * (bridge_parameter_count(augment.config.hidden_size, anchor.config.hidden_size, bridge))
        self._lora = None
        # copies taken before composing, so the LoRA anchor carries no bridge hooks
        if only is None and not lean:
            self._lora_anchor = copy.deepcopy(self.anchor)
        else:  # a memory child: the LoRA one wraps the anchor itself, the others need no LoRA
            self._lora_anchor = self.anchor if only == "lora_step" else None
        if only == "lora_step":
            return
        copies = only is None and not lean
        self.full_augment = augment if copies else None
        self.augment_config = augment.config
        self.composed = ComposedModel.from_models(
            self.anchor, copy.deepcopy(augment) if copies else augment, mapping, bridge
        )
        for p in self.composed.bridges.parameters():
            p.data.normal_(0, 0.02)
        self.optimizer = torch.optim.AdamW(self.composed.bridges.parameters(), lr=1e-4)
        self.lowest = min(b for _, _, b in self.composed.bridge_connections)
        self.augment_base = self.composed.augments[0]
        if only in (None, "cached_step") and not lean:
            with torch.no_grad():
                self.states = [self.composed.augment_states(0, self.ids, self.mask, self.positions)]
        assert self.budget == self.composed.parameter_counts()["trainable"]

    # -------------------------------------------------------------- the lower bound
    def anchor_fwd_bwd(self):
        """Frozen anchor forward + backward of activation gradients down to the lowest connected
        layer: the layer's output is made a leaf that requires grad, so autograd stops there."""
        layers = find_blocks(self.anchor).layers
        handle = layers[self.lowest].register_forward_hook(lambda m, a, out: out.detach().requires_grad_())
        try:
            logits = self.anchor(input_ids=self.ids, attention_mask=self.mask).logits
            loss_of(logits, self.labels).backward()
        finally:
            handle.remove()

    @torch.no_grad()
    def augment_forward(self):
        self.composed.augment_states(0, self.ids, self.mask, self.positions)

    def lower_bound(self):
        self.augment_forward()
        self.anchor_fwd_bwd()

    # -------------------------------------------------------------- comm
    def _step(self, **kwargs):
        """One comm training step: the loss as comm-train computes it (the anchor's head only at
        loss positions, in chunks), backward, AdamW over the bridges."""
        out = self.composed(self.ids, self.mask, labels=self.labels, return_logits=False, **kwargs)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def calm_step(self):
        self._step()

    def cached_step(self):
        self._step(augment_states=self.states)

    def calm_step_full_logits(self):
        """The same step computing every logit (comm before the chunked loss)."""
        out = self.composed(self.ids, self.mask)
        loss_of(out.logits, self.labels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -------------------------------------------------------------- LoRA with the same budget
    def lora(self):
        if self._lora is None:
            from peft import LoraConfig, get_peft_model

            anchor = self._lora_anchor
            probe = get_peft_model(anchor, LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
            per_rank = sum(p.numel() for p in probe.parameters() if p.requires_grad)
            anchor = probe.unload()
            r = max(1, round(self.budget / per_rank))
            model = get_peft_model(
                anchor, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"])
            )
            model.eval()  # no dropout, as the composition
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            self._lora = (model, opt, r, sum(p.numel() for p in model.parameters() if p.requires_grad))
        return self._lora

    def lora_step(self):
        model, opt, _, _ = self.lora()
        batch = {"input_ids": self.ids, "attention_mask": self.mask, "labels": self.labels}
        batch_loss(model, batch, composed=False, reduction="mean").backward()  # as comm-train does
        opt.step()
        opt.zero_grad(set_to_none=True)

    # -------------------------------------------------------------- generation
    @torch.no_grad()
    def _greedy(self, model, tokens):
        """A plain KV-cached greedy loop over a HF model (no composition)."""
        from transformers import DynamicCache

        from comm_cli.compose.composed import _cache_kwarg

        ids = self.ids[:1, : self.args.prompt]
        cache = {_cache_kwarg(model): DynamicCache(config=model.config)}
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache)
        for _ in range(tokens - 1):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **cache)

    def anchor_generate(self):
        self._greedy(self.anchor, self.args.new_tokens)

    def augment_generate(self):
        self._greedy(self.full_augment, self.args.new_tokens)

    @torch.no_grad()
    def composed_generate(self):
        ids = self.ids[:1, : self.args.prompt]
        self.composed.generate(ids, max_new_tokens=self.args.new_tokens, eos_token_id=None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def precision(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib

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


def peak_memory_cuda(variants: Variants, names: list[str]) -> dict[str, float]:
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
        [sys.executable, __file__, *argv, "--memory-child", name], capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip().splitlines()[-1])


def sampled_peak_rss(fn) -> float:
    """Peak resident memory (MiB) of this process while ``fn`` runs."""
    import threading

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
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.memory_child:
        variants = Variants(args, device, only=args.memory_child)
        print(sampled_peak_rss(lambda: [getattr(variants, args.memory_child)() for _ in range(3)]))
        return
    if args.sweep:
        from bench_sweep import run_sweep

        run_sweep(args, device)
        return
    result = text_case(args, device)
    if not args.no_prompt_case:
        result["prompt_completion"] = prompt_case(args, device)
        result["calm_step_over_full_logits_bound"] = result["prompt_completion"]["calm_step_over_lower_bound"]
        result["peak_memory_over_full_logits"] = result["prompt_completion"]["peak_memory_over_full_logits"]
    if not args.no_aligned_case:
        result["aligned"] = aligned_case(args, device)
        result["aligned_step_over_shared_step"] = result["aligned"]["aligned_step_over_shared_step"]
    out = Path(args.out).resolve()
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(_table(result))
    print(f"wrote {out}")


def peak_memory(variants: Variants, names: list[str], overrides: list[str]) -> dict[str, float]:
    """Peak memory (MiB) of each variant; on the CPU in child processes given ``overrides`` after
    this process's own arguments (argparse keeps the last value of a repeated option)."""
    if variants.args.no_memory:
        return {}
    if variants.device.type == "cuda":
        return peak_memory_cuda(variants, names)
    return {name: peak_rss_child(name, [*sys.argv[1:], *overrides]) for name in names}


def case_overrides(**values) -> list[str]:
    """Command-line options that rebuild a case: case_overrides(seq=512) -> ['--seq', '512']."""
    return [item for key, value in values.items() for item in (f"--{key.replace('_', '-')}", str(value))]


def build_case(args, overrides: list[str], device) -> tuple[argparse.Namespace, Variants]:
    case = parse_args([*sys.argv[1:], *overrides])
    return case, Variants(case, device, lean=True)


def prompt_case(args, device) -> dict:
    """Prompt/completion rows (70% prompt) at vocab 128256: comm's step against the bound that
    computes every logit, and its peak memory against the same step computing every logit."""
    overrides = case_overrides(vocab=args.case_vocab, prompt_fraction=args.case_prompt_fraction)
    case, variants = build_case(args, overrides, device)
    steps = {
        "lower_bound": variants.lower_bound,
        "calm_step": variants.calm_step,
        "calm_step_full_logits": variants.calm_step_full_logits,
    }
    times = time_interleaved(steps, device, args.warmup, args.repeats)
    memory = peak_memory(variants, ["calm_step", "calm_step_full_logits"], overrides)
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


# ---------------------------------------------------------------------------- the aligned case
# Llama 3 / Qwen2's pre-tokenizer split (contractions, letter runs, 1-3 digit groups, lookaheads).
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


class BenchText:
    """Random text over the character tokenizer's alphabet (a-z, digits, ``+-=;``, space,
    newline): words of a random lexicon drawn with Zipf frequencies, some numbers, operators and
    newlines, so that a byte-level BPE trained on it merges letters into multi-character tokens."""

    def __init__(self, size: int, seed: int = 0):
        self.rng = random.Random(seed)
        letters = string.ascii_lowercase
        self.words = ["".join(self.rng.choices(letters, k=self.rng.randint(1, 8))) for _ in range(size)]
        self.cumulative = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(size)))

    def text(self, chars: int) -> str:
        pieces, length = [], 0
        while length < chars:
            draw = self.rng.random()
            if draw < 0.05:
                piece = str(self.rng.randint(0, 9999))
            elif draw < 0.08:
                piece = self.rng.choice("+-=;")
            else:
                piece = self.rng.choices(self.words, cum_weights=self.cumulative)[0]
            piece += "\n" if self.rng.random() < 0.03 else " "
            pieces.append(piece)
            length += len(piece)
        return "".join(pieces)

    def corpus(self) -> list[str]:
        """Every lexicon word once, then running text: what the bench's tokenizer is trained on."""
        rows = [" ".join(self.words[i : i + 100]) for i in range(0, len(self.words), 100)]
        return rows + [self.text(2000) for _ in range(50)]


def bench_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE with Llama 3's split regex trained on ``corpus`` (built in-process,
    nothing downloaded), ``<s>`` prepended by its template; ``<pad>``, ``<s>``, ``</s>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )


def cut_to_tokens(tokenizer, text: str, count: int) -> str:
    """The start of ``text`` that holds its first ``count`` tokens."""
    if count <= 0:
        return ""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) < count:
        raise ValueError(f"text of {len(offsets)} tokens, {count} needed")
    return text[: offsets[count - 1][1]]


def to_device(batch: dict, device) -> dict:
    """A collated batch (tensors, and ``augment_inputs``: a list of dicts of tensors or None)."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device)
        elif isinstance(value, list):
            out[key] = [None if v is None else {k: t.to(device) for k, t in v.items()} for v in value]
        else:
            out[key] = value
    return out


class AlignedVariants:
    """One composition (the default preset's models, vocab = the bench tokenizer's) read three
    ways over the SAME frozen weights and bridges, with batches built by comm-train's own data
    pipeline (``tokenize_split`` with the composition's ReadPlan, then ``CompletionCollator``):

    - shared:  the augment reads the anchor's ids (the plain path, masks by column);
    - aligned: the augment has the same tokenizer but reads its own tokens through the character
      alignment (``AugmentSpec.tokens="aligned"``): masks from settle points and token ends,
      positions on the character scale. The only difference from shared is the alignment;
    - cross:   the augment reads characters (comm's character tokenizer) while the anchor reads
      BPE: several augment tokens per anchor token, so more augment compute (information only).
    """

    PATHS = ("shared", "aligned", "cross")

    def __init__(self, args, device):
        import datasets

        from comm_cli.compose.alignment import check_settle_rule
        from comm_cli.data.char_tokenizer import build_char_tokenizer
        from comm_cli.data.collate import CompletionCollator
        from comm_cli.data.loading import DataConfig
        from comm_cli.data.tokenize import tokenize_split
        from comm_cli.training.models import augment_pad_ids

        self.args, self.device = args, device
        target_vocab = args.vocab or PRESETS[args.preset]["vocab"]
        source = BenchText(target_vocab)
        self.tokenizer = tokenizer = bench_tokenizer(source.corpus(), target_vocab)
        chars = build_char_tokenizer()
        # rows of about --seq anchor tokens: bos + (seq - 2) text tokens + eos
        texts = [
            cut_to_tokens(tokenizer, source.text(12 * args.seq), args.seq - 2) for _ in range(args.batch)
        ]
        self.prompt = cut_to_tokens(tokenizer, source.text(12 * args.prompt), args.prompt - 1)

        case = parse_args([*sys.argv[1:], *case_overrides(vocab=len(tokenizer))])
        base_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        anchor, augment = build_models(case, base_dtype, device)
        mapping = MappingSpec(count=args.connections) if args.connections else MappingSpec(every=args.every)
        self.composed = ComposedModel.from_models(
            anchor, augment, mapping, BridgeConfig(num_heads=args.bridge_heads, zero_init_output=False)
        )
        for p in self.composed.bridges.parameters():
            p.data.normal_(0, 0.02)
        self.optimizer = torch.optim.AdamW(self.composed.bridges.parameters(), lr=1e-4)

        # how comm decides the readers: use_tokenizers (tokens="aligned" forces the aligned path)
        self.plans = {"shared": None}
        spec = self.composed.config.augments[0]
        for path, augment_tokenizer, tokens in (("aligned", tokenizer, "aligned"), ("cross", chars, "auto")):
            spec.tokens = tokens
            self.composed.use_tokenizers(tokenizer, [augment_tokenizer], texts)
            self.plans[path] = plan = self.composed.read_plan()
            assert plan is not None, path
            check_settle_rule(plan.augment_readers[0], texts[:2])  # the rule holds on the bench's texts

        # comm-train's pipeline: tokenize_split (with the plan) -> CompletionCollator
        datasets.disable_progress_bars()
        dataset = datasets.Dataset.from_dict({"text": texts})
        data = DataConfig(format="text", max_length=args.seq)
        self.batches = {}
        for path, plan in self.plans.items():
            split, _ = tokenize_split(dataset, tokenizer, data, split_name=f"bench {path}", plan=plan)
            collate = CompletionCollator(
                tokenizer.pad_token_id, padding_side="right", augment_pad_ids=augment_pad_ids(plan)
            )
            self.batches[path] = to_device(collate([split[i] for i in range(len(split))]), device)
        for path in ("aligned", "cross"):  # the anchor reads the same ids on every path
            assert torch.equal(self.batches[path]["input_ids"], self.batches["shared"]["input_ids"])
        self.prompt_ids = torch.tensor([tokenizer(self.prompt)["input_ids"]], device=device)
        self.generated: dict[str, torch.Tensor] = {}

    def tokens_per_row(self, path: str) -> dict[str, float]:
        batch = self.batches[path]
        anchor = batch["attention_mask"].sum(1).float().mean().item()
        inputs = batch.get("augment_inputs")
        augment = inputs[0]["attention_mask"].sum(1).float().mean().item() if inputs else anchor
        return {"anchor": anchor, "augment": augment}

    def _use(self, path: str) -> None:
        """Attach the path's readers (generation reads them; a training forward reads its batch)."""
        plan = self.plans[path]
        if plan is None:
            self.composed.set_readers(self.tokenizer, None, [None])
        else:
            self.composed.set_readers(self.tokenizer, plan.anchor_reader, plan.augment_readers)

    def _step(self, path: str):
        """One comm-train step on the path's batch: batch_loss, backward, AdamW over the bridges."""
        batch_loss(self.composed, self.batches[path], composed=True, reduction="mean").backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _generate(self, path: str):
        """Greedy KV-cached decoding of --new-tokens after the prompt (no eos: every token is
        generated); the aligned paths feed the augment its settled tokens as the text grows."""
        self._use(path)
        prompts = None if path == "shared" else [self.prompt]
        out = self.composed.generate(
            self.prompt_ids, max_new_tokens=self.args.new_tokens, eos_token_id=[], prompts=prompts
        )
        self.generated[path] = out[0, self.prompt_ids.shape[1] :]

    def generated_characters(self) -> dict[str, int]:
        """How much text each path's last generation spelled (random weights may spell little)."""
        return {
            path: len(self.tokenizer.decode(ids, skip_special_tokens=True))
            for path, ids in self.generated.items()
        }

    def steps(self) -> dict:
        return {f"{path}_step": functools.partial(self._step, path) for path in self.PATHS}

    def generations(self) -> dict:
        return {f"{path}_generate": functools.partial(self._generate, path) for path in self.PATHS}


def aligned_case(args, device) -> dict:
    """The character alignment's cost: a composition whose augment reads its own tokens (same
    tokenizer, tokens="aligned") against the same models reading the anchor's ids, for a training
    step and per generated token; and, as information, an augment that reads characters."""
    variants = AlignedVariants(args, device)
    times = time_interleaved(variants.steps(), device, args.warmup, args.repeats)
    generation = time_interleaved(variants.generations(), device, 1, max(5, args.repeats // 2))
    per_token = {name: seconds / args.new_tokens for name, seconds in generation.items()}
    return {
        "aligned_step_over_shared_step": times["aligned_step"] / times["shared_step"],
        "aligned_generation_over_shared_generation": per_token["aligned_generate"]
        / per_token["shared_generate"],
        "cross_step_over_shared_step": times["cross_step"] / times["shared_step"],
        "cross_generation_over_shared_generation": per_token["cross_generate"] / per_token["shared_generate"],
        "cross_note": "cross: anchor byte-level BPE, augment characters (information, no target): the augment "
        "reads several tokens per anchor token, so it computes more; the ratio is not the alignment's overhead",
        "seconds": times,
        "generation_seconds_per_token": per_token,
        "tokens_per_row": {path: variants.tokens_per_row(path) for path in variants.PATHS},
        "generated_characters": variants.generated_characters(),
        "new_tokens": args.new_tokens,
        "prompt_tokens": int(variants.prompt_ids.shape[1]),
        "vocab": len(variants.tokenizer),
        "batch": args.batch,
        "seq": args.seq,
    }


def text_case(args, device) -> dict:
    """The default case (every token carries loss): the keys bench.json has always had."""
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
    memory = peak_memory(variants, ["calm_step", "lora_step", "cached_step", "lower_bound"], [])

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
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "dtype": "bfloat16 bases, float32 bridges, bf16 autocast" if device.type == "cuda" else "float32",
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        result["mfu"] = _mfu(variants, step_times["calm_step"], tokens)
    return result


def _mfu(variants, step_seconds, tokens) -> float:
    """Model FLOPs utilisation of a calm step: 2*N*T (augment forward) + 6*N*T (anchor forward and
    backward; weight-gradient FLOPs are not computed for frozen weights, so this is an upper count)
    over the GPU's bf16 dense peak (H100/H200 SXM: 989 TFLOP/s)."""
    anchor_params = sum(p.numel() for p in variants.anchor.parameters())
    augment_params = sum(p.numel() for p in variants.augment_base.parameters())
    useful = (4 * anchor_params + 2 * augment_params) * tokens  # fwd 2NT + activation-grad bwd 2NT
    peak = float(os.environ.get("COMM_PEAK_FLOPS", 989e12))
    return useful / step_seconds / peak


def _table(result) -> str:
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


if __name__ == "__main__":
    main()
