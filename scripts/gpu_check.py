"""Checks that need a CUDA GPU, as one short script (the test suite never needs one).

- the composition's guarantees on CUDA: bridges off == anchor, cached == uncached generation,
  padding invariance, in float32 and with bf16 bases + fp32 bridges;
- gradient checkpointing and torch.compile of the bridges on CUDA give the eager gradients.

    python scripts/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec  # noqa: E402


def tiny(kind, width, layers, dtype, seed):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    config = cls(
        vocab_size=512,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).cuda().eval()


def compose(dtype):
    anchor, augment = tiny("llama", 128, 4, dtype, 0), tiny("qwen2", 64, 4, dtype, 1)
    return ComposedModel.from_models(
        anchor, augment, MappingSpec(every=2), BridgeConfig(zero_init_output=False)
    ), anchor


def check(dtype) -> dict:
    out = {}
    model, anchor = compose(dtype)
    ids = torch.randint(3, 512, (2, 24), device="cuda")
    with model.bridges_disabled():
        out["bridges_off_equals_anchor"] = bool(torch.equal(model(ids).logits, anchor(ids).logits))
    prompt = ids[:, :8].clone()
    mask = torch.ones_like(prompt)
    prompt[1, :3], mask[1, :3] = 0, 0
    cached = model.generate(
        prompt, mask, max_new_tokens=12, eos_token_id=None, return_dict=True, output_scores=True
    )
    plain = model.generate(
        prompt,
        mask,
        max_new_tokens=12,
        eos_token_id=None,
        use_cache=False,
        return_dict=True,
        output_scores=True,
    )
    out["cached_equals_uncached_tokens"] = bool(torch.equal(cached.sequences, plain.sequences))
    out["cached_vs_uncached_max_logit_diff"] = max(
        float((a - b).abs().max()) for a, b in zip(cached.scores, plain.scores)
    )
    row = ids[1:, 4:20]
    padded = torch.cat([torch.zeros(1, 8, dtype=row.dtype, device="cuda"), row], 1)
    pmask = torch.cat([torch.zeros(1, 8, dtype=torch.long, device="cuda"), torch.ones_like(row)], 1)
    out["left_padding_max_diff"] = float(
        (model(padded, pmask).logits[0, 8:].float() - model(row).logits[0].float()).abs().max()
    )
    # gradients: eager vs checkpointed vs compiled bridges
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    eager = [p.grad.clone() for p in model.bridges.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(ids, labels=ids).loss.backward()
    out["checkpointing_max_grad_diff"] = max(
        float((p.grad - g).abs().max()) for p, g in zip(model.bridges.parameters(), eager)
    )
    model.zero_grad()
    for bridge in model.bridges:
        bridge.compile()
    start = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    out["compile_seconds"] = time.perf_counter() - start
    out["compiled_max_grad_diff"] = max(
        float((p.grad - g).abs().max()) for p, g in zip(model.bridges.parameters(), eager)
    )
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers

    result["transformers"] = transformers.__version__
    result["float32"] = check(torch.float32)
    result["bfloat16_bases_fp32_bridges"] = check(torch.bfloat16)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
