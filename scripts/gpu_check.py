"""Checks of the composition's guarantees on a CUDA GPU, as one short script (the test suite never
needs one). ``--device cpu --dry`` runs the same checks on a CPU (the GPU suite's dry mode), all
but torch.compile, whose compile a CPU would spend minutes on.

- bridges off == anchor, cached == uncached generation, left-padding invariance, gradient
  checkpointing and torch.compile'd bridges against the eager gradients: in float32 and with
  bf16 bases + fp32 bridges;
- Accelerate's bf16 mixed precision as comm-train runs it (bf16 bases, fp32 bridges, AdamW): the
  bridges and their gradients stay float32 and finite, the bases do not move, the first loss
  matches a float32 run of the same weights and the loss falls;
- the anchor-prefix replay (what ``trainer.cache_anchor_prefix`` feeds the anchor) gives the
  computed loss and bridge gradients under bf16 autocast without running the replayed layers;
- comm-train itself, bf16 mixed precision and bf16 bases, with and without the anchor-prefix
  cache: the same loss curve.

Every check records its numbers and whether it passed; ``failures`` names those that did not,
against the tolerances in TOLERANCES.

    python scripts/gpu_check.py --out gpu_check.json
    python scripts/gpu_check.py --device cpu --dry --out gpu_check.json   # on a CPU, no compile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec  # noqa: E402
from comm_cli.compose.masks import positions_from_mask  # noqa: E402
from comm_cli.compose.prefix import AnchorPrefix, decoder_layers, prefix_states  # noqa: E402

# largest absolute differences that pass: logits, bridge gradients, losses
TOLERANCES = {
    "float32": {"logits": 1e-4, "grads": 1e-5, "loss": 1e-5},
    "bfloat16": {"logits": 5e-2, "grads": 1e-2, "loss": 2e-2},
}
VOCAB = 512


def tiny(kind, width, layers, dtype, seed, device):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    config = cls(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


def compose(dtype, device, mapping=None):
    """A Llama anchor (128 wide, 4 layers) and a Qwen2 augment (64 wide) in ``dtype``; the bridges
    are float32 (BridgeConfig's default) with a non-zero output, seeded."""
    anchor, augment = tiny("llama", 128, 4, dtype, 0, device), tiny("qwen2", 64, 4, dtype, 1, device)
    torch.manual_seed(2)
    model = ComposedModel.from_models(
        anchor, augment, mapping or MappingSpec(every=2), BridgeConfig(zero_init_output=False)
    )
    return model.to(device), anchor


def batch(device, rows=2, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g).to(device)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # prompt/completion rows: no loss on the prompt
    return ids, torch.ones_like(ids), labels


def autocast(device, dtype):
    """bf16 autocast for bf16 bases (as comm-train's mixed precision), nothing for float32."""
    if dtype == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def max_diff(a, b) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def bridge_grads(model):
    return [p.grad.detach().clone() for p in model.bridges.parameters()]


# ------------------------------------------------------------------ the composition's guarantees
def guarantees(dtype, device, dry: bool) -> dict:
    out = {}
    model, anchor = compose(dtype, device)
    ids, _, _ = batch(device)
    with model.bridges_disabled():
        out["bridges_off_equals_anchor"] = bool(torch.equal(model(ids).logits, anchor(ids).logits))
    prompt = ids[:, :8].clone()
    mask = torch.ones_like(prompt)
    prompt[1, :3], mask[1, :3] = 0, 0
    options = dict(max_new_tokens=12, eos_token_id=None, return_dict=True, output_scores=True)
    cached = model.generate(prompt, mask, **options)
    plain = model.generate(prompt, mask, use_cache=False, **options)
    out["cached_equals_uncached_tokens"] = bool(torch.equal(cached.sequences, plain.sequences))
    out["cached_vs_uncached_max_logit_diff"] = max_diff(cached.scores, plain.scores)
    row = ids[1:, 4:20]
    padded = torch.cat([torch.zeros(1, 8, dtype=row.dtype, device=device), row], 1)
    pmask = torch.cat([torch.zeros(1, 8, dtype=torch.long, device=device), torch.ones_like(row)], 1)
    out["left_padding_max_diff"] = max_diff([model(padded, pmask).logits[0, 8:]], [model(row).logits[0]])
    # gradients: eager vs checkpointed vs compiled bridges
    model.train()
    model(ids, labels=ids).loss.backward()
    eager = bridge_grads(model)
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(ids, labels=ids).loss.backward()
    out["checkpointing_max_grad_diff"] = max_diff(bridge_grads(model), eager)
    model.zero_grad()
    if dry or device.type != "cuda":
        out["compiled"] = {"status": "skipped", "reason": "needs CUDA (a CPU compiles for minutes)"}
        return out
    for bridge in model.bridges:
        bridge.compile()
    start = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    out["compile_seconds"] = time.perf_counter() - start
    out["compiled_max_grad_diff"] = max_diff(bridge_grads(model), eager)
    return out


def judge_guarantees(result: dict, tolerance: dict) -> list[str]:
    failures = [
        name for name in ("bridges_off_equals_anchor", "cached_equals_uncached_tokens") if not result[name]
    ]
    failures += [
        name
        for name, kind in (
            ("cached_vs_uncached_max_logit_diff", "logits"),
            ("left_padding_max_diff", "logits"),
            ("checkpointing_max_grad_diff", "grads"),
            ("compiled_max_grad_diff", "grads"),
        )
        if name in result and not result[name] <= tolerance[kind]
    ]
    return failures


# ------------------------------------------------------------------ Accelerate's mixed precision
def accelerate_mixed_precision(device, steps: int = 4) -> dict:
    """bf16 bases + fp32 bridges trained through ``Accelerator(mixed_precision="bf16")`` (prepare,
    accelerator.backward, AdamW over the bridges), against the same weights in float32."""
    from accelerate import Accelerator

    reference, _ = compose(torch.float32, device)
    model, _ = compose(torch.float32, device)
    for base in (model.anchor, *model.augments):
        base.to(torch.bfloat16)  # the same weights, rounded: bf16 bases, fp32 bridges
    ids, mask, labels = batch(device, rows=4)
    with torch.no_grad():
        reference_loss = float(reference(ids, mask, labels=labels, return_logits=False).loss)
    bases = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    accelerator = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    optimizer = torch.optim.AdamW(model.bridges.parameters(), lr=1e-3)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    losses, grad_dtypes, finite = [], set(), True
    for _ in range(steps):
        loss = prepared(ids, mask, labels=labels, return_logits=False).loss
        accelerator.backward(loss)
        for p in model.bridges.parameters():
            grad_dtypes.add(str(p.grad.dtype).removeprefix("torch."))
            finite = finite and bool(torch.isfinite(p.grad).all())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    moved = max(float((p.detach() - bases[n]).abs().max()) for n, p in model.named_parameters() if n in bases)
    return {
        "losses": losses,
        "float32_reference_loss": reference_loss,
        "first_loss_diff_from_float32": abs(losses[0] - reference_loss),
        "loss_falls": losses[-1] < losses[0],
        "bridge_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.bridges.parameters()}),
        "bridge_grad_dtypes": sorted(grad_dtypes),
        "bridge_grads_finite": finite,
        "bases_max_change": moved,
    }


def judge_accelerate(result: dict) -> list[str]:
    failures = []
    if result["first_loss_diff_from_float32"] > TOLERANCES["bfloat16"]["loss"] * max(
        1.0, result["float32_reference_loss"]
    ):
        failures.append("first_loss_diff_from_float32")
    if not result["loss_falls"]:
        failures.append("loss_falls")
    if result["bridge_dtypes"] != ["float32"] or result["bridge_grad_dtypes"] != ["float32"]:
        failures.append("bridge_dtypes")
    if not result["bridge_grads_finite"]:
        failures.append("bridge_grads_finite")
    if result["bases_max_change"] != 0.0:
        failures.append("bases_max_change")
    return failures


# ------------------------------------------------------------------ the anchor's frozen prefix
def anchor_prefix_replay(device, dtype) -> dict:
    """The states of the anchor's frozen prefix, computed once and handed back in, against the
    layers computing them: the same loss and bridge gradients, and no replayed layer runs."""
    model, _ = compose(dtype, device, MappingSpec(pairs=[[1, 1], [3, 3]]))
    length = 2  # the layers below the lowest bridge, and the one it reads (anchor layers 0-1)
    ids, mask, labels = batch(device, rows=3)
    mask[1, 18:] = 0
    labels[mask == 0] = -100

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = model(ids, mask, labels=labels, return_logits=False).loss
        loss.backward()
        return float(loss.detach()), bridge_grads(model)

    live_loss, live_grads = loss_and_grads()
    layers = decoder_layers(model.anchor)
    with torch.no_grad(), autocast(device, dtype):
        states = prefix_states(
            model.anchor,
            layers,
            length,
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions_from_mask(mask),
        )
    prefix = AnchorPrefix(layers, length)
    prefix.probe(model.anchor)
    ran = []
    for layer in list(layers)[:length]:
        layer.self_attn.register_forward_pre_hook(lambda m, a: ran.append(1))
    with prefix.given(states):
        replay_loss, replay_grads = loss_and_grads()
    return {
        "states_dtype": str(states.dtype).removeprefix("torch."),
        "loss_diff": abs(replay_loss - live_loss),
        "max_grad_diff": max_diff(replay_grads, live_grads),
        "replayed_layers_ran": len(ran),
    }


def judge_prefix(result: dict, tolerance: dict) -> list[str]:
    failures = [
        name
        for name, kind in (("loss_diff", "loss"), ("max_grad_diff", "grads"))
        if result[name] > tolerance[kind]
    ]
    return failures + (["replayed_layers_ran"] if result["replayed_layers_ran"] else [])


# ------------------------------------------------------------------ comm-train, with and without the cache
def workspace(root: Path) -> dict:
    """A tiny Llama anchor and Qwen2 augment sharing comm's character tokenizer, and
    prompt/completion rows (sums of two digits), saved as a user's files would be."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from comm_cli.data.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    paths = {"anchor": root / "anchor", "augment": root / "augment", "data": root / "train.jsonl"}
    for name, config_class, width in (("anchor", LlamaConfig, 64), ("augment", Qwen2Config, 32)):
        config = config_class(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
        )  # fmt: skip
        torch.manual_seed(len(name))
        AutoModelForCausalLM.from_config(config).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    rng = random.Random(0)
    rows = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(160)]
    paths["data"].write_text(
        "".join(json.dumps({"prompt": f"{x}+{y}=", "completion": str(x + y)}) + "\n" for x, y in rows)
    )
    return paths


def train_losses(run_dir: Path) -> list[float]:
    """The training losses comm-train logged, one a step."""
    return [
        float(line.rsplit(" ", 1)[-1])
        for line in (run_dir / "train.log").read_text().splitlines()
        if " loss " in line and "step " in line and "validation" not in line
    ]


def train_with_prefix_cache(device, root: Path, timeout: float = 300) -> dict:
    """Two comm-train runs, bf16 mixed precision with bf16 bases: computing the anchor's frozen
    prefix, and reading it from ``trainer.cache_anchor_prefix``'s cache."""
    paths = workspace(root)
    common = [
        f"output_root={root / 'runs'}", f"anchor.name_or_path={paths['anchor']}", "anchor.dtype=bfloat16",
        f"augment.name_or_path={paths['augment']}", "augment.dtype=bfloat16", "data=jsonl",
        f"data.data_files={paths['data']}", "data.validation_fraction=0.1", "data.max_length=32",
        "mapping=pairs", "mapping.every=null", "mapping.pairs=[[1,1],[3,3]]", "bridge.num_heads=4",
        "bridge.zero_init_output=false", "optimizer.lr=3e-3", "trainer.max_steps=8", "trainer.batch_size=8",
        "trainer.log_every=1", "trainer.eval_every=null", "trainer.save_every=null",
        "trainer.progress_bar=false", "trainer.mixed_precision=bf16", "logger=none",
    ]  # fmt: skip
    cached = ["trainer.cache_anchor_prefix=true", f"trainer.anchor_prefix_cache_dir={root / 'prefix_cache'}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    out = {}
    for name, extra in (("live", []), ("cached", cached)):
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "comm_cli.train", *common, f"name={name}", *extra],
            cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"comm-train ({name}) failed: {result.stderr.strip().splitlines()[-1:]}")
        out[f"{name}_seconds"] = time.perf_counter() - start
    live, cached_losses = train_losses(root / "runs" / "live"), train_losses(root / "runs" / "cached")
    log = (root / "runs" / "cached" / "train.log").read_text()
    out.update(
        {
            "steps": len(live),
            "live_losses": live,
            "cached_losses": cached_losses,
            "max_loss_diff": max((abs(a - b) for a, b in zip(live, cached_losses)), default=float("inf")),
            # the first run with the cache builds it, then reads it
            "cache_used": "cached the anchor's first" in log or "anchor's cached prefix states" in log,
        }
    )
    return out


def judge_train(result: dict) -> list[str]:
    failures = [] if result["cache_used"] else ["cache_used"]
    if result["steps"] == 0 or len(result["cached_losses"]) != result["steps"]:
        failures.append("steps")
    # bf16 rounding: the cache's states come from a forward over other batches (other kernels)
    if result["max_loss_diff"] > TOLERANCES["bfloat16"]["loss"]:
        failures.append("max_loss_diff")
    return failures


# ------------------------------------------------------------------ the run
def run_checks(device, dry: bool) -> dict:
    result: dict = {}
    failures: list[str] = []
    for name, dtype in (("float32", torch.float32), ("bfloat16_bases_fp32_bridges", torch.bfloat16)):
        result[name] = guarantees(dtype, device, dry)
        tolerance = TOLERANCES["bfloat16" if dtype == torch.bfloat16 else "float32"]
        failures += [f"{name}.{f}" for f in judge_guarantees(result[name], tolerance)]
    result["accelerate_bf16_mixed_precision"] = accelerate_mixed_precision(device)
    failures += [
        f"accelerate_bf16_mixed_precision.{f}"
        for f in judge_accelerate(result["accelerate_bf16_mixed_precision"])
    ]
    result["anchor_prefix_replay_bf16"] = anchor_prefix_replay(device, torch.bfloat16)
    failures += [
        f"anchor_prefix_replay_bf16.{f}"
        for f in judge_prefix(result["anchor_prefix_replay_bf16"], TOLERANCES["bfloat16"])
    ]
    with tempfile.TemporaryDirectory() as root:
        result["comm_train_anchor_prefix_cache_bf16"] = train_with_prefix_cache(device, Path(root))
    failures += [
        f"comm_train_anchor_prefix_cache_bf16.{f}"
        for f in judge_train(result["comm_train_anchor_prefix_cache_bf16"])
    ]
    result["tolerances"] = TOLERANCES
    result["failures"] = failures
    result["passed"] = not failures
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry", action="store_true", help="no torch.compile (the GPU suite's dry mode)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import transformers

    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **run_checks(device, args.dry),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
