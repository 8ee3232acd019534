"""Writing tiny GGUF files for the tests, with the `gguf` package, the way llama.cpp's
convert_hf_to_gguf.py writes a Llama: its metadata keys, its tensor names, and the q/k rows
permuted into GGML's rotary layout (transformers permutes them back when it reads the file).

The tokenizer is a byte-level BPE ("gpt2" in GGUF terms) over the 256 byte symbols plus a few
merges and three control tokens, so any text tokenises and the file is self-contained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # as SmolLM2 numbers them
MERGES = ("a b", "ab c", "Ġ t", "h e")


def byte_level_vocabulary() -> list[str]:
    """Control tokens, the 256 byte symbols of GPT-2's byte-to-unicode map, then one token per merge."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = [bytes_to_unicode()[b] for b in range(256)]
    return [*SPECIALS, *symbols, *("".join(m.split(" ")) for m in MERGES)]


def tiny_llama(vocab_size: int, seed: int = 0, width: int = 32, layers: int = 2):
    """A tiny random Llama with non-trivial norms (so a norm that is lost on the way shows)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _ggml_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation of q/k rows (the inverse of what transformers undoes on load)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_llama_gguf(model, path: Path, tokens: list[str] | None = None) -> Path:
    """Write ``model`` (a LlamaForCausalLM) and a byte-level tokenizer to the GGUF file ``path``."""
    import gguf

    cfg = model.config
    tokens = tokens or byte_level_vocabulary()
    assert len(tokens) == cfg.vocab_size, (len(tokens), cfg.vocab_size)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        q = _ggml_rotary_rows(state[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        k = _ggml_rotary_rows(state[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        writer.add_tensor(f"blk.{i}.attn_q.weight", q)
        writer.add_tensor(f"blk.{i}.attn_k.weight", k)
        writer.add_tensor(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def write_unreadable_gguf(path: Path, architecture: str = "rwkv7") -> Path:
    """A valid GGUF file of an architecture transformers does not read."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("unreadable")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
