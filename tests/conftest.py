"""Shared fixtures: tiny random causal LMs of every supported family, built from configs.

Nothing is downloaded; models that must load from disk are saved with save_pretrained first.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# COMM_TEST_THREADS=1 keeps tests quick on a machine that other jobs keep busy (OpenMP threads
# that wait for a busy core spin). Under pytest-xdist (`make test` runs one worker per core) each
# worker takes one thread, so the workers do not fight over the cores.
_DEFAULT_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1))
torch.set_num_threads(int(os.environ.get("COMM_TEST_THREADS", _DEFAULT_THREADS)))

VOCAB = 64


def tiny_config(family: str, width: int = 32, layers: int = 4, heads: int = 4, vocab: int = VOCAB):
    """A tiny transformers config of the given family (random weights when instantiated)."""
    import transformers as tf

    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    llama_like = dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
        **common,
    )
    if family == "llama":
        return tf.LlamaConfig(**llama_like)
    if family == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if family == "qwen3":
        return tf.Qwen3Config(**llama_like, head_dim=width // heads)
    if family == "gemma":
        return tf.GemmaConfig(**llama_like, head_dim=width // heads)
    if family == "gemma2":
        return tf.Gemma2Config(
            **llama_like, head_dim=width // heads, sliding_window=8, query_pre_attn_scalar=width // heads
        )
    if family == "phi3":
        return tf.Phi3Config(**llama_like)
    if family == "phi":  # a head with a bias
        return tf.PhiConfig(**llama_like)
    if family == "cohere":  # logits * logit_scale, tied embeddings
        return tf.CohereConfig(**llama_like, logit_scale=0.5)
    if family == "granite":  # logits / logits_scaling
        return tf.GraniteConfig(**llama_like, logits_scaling=4.0)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=width, n_layer=layers, n_head=heads, n_positions=256, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=256,
            **common,
        )
    if family == "opt":
        return tf.OPTConfig(
            hidden_size=width,
            ffn_dim=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            word_embed_proj_dim=width,
            max_position_embeddings=256,
            **common,
        )
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "opt"]


def tiny_model(family: str, seed: int = 0, **kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs), dtype=torch.float32)
    return model.eval()


@pytest.fixture
def make_model():
    return tiny_model


@pytest.fixture
def saved_model(tmp_path):
    """Save a tiny model to a local directory and return the path."""

    def save(family: str, name: str, seed: int = 0, **kwargs):
        path = tmp_path / name
        tiny_model(family, seed=seed, **kwargs).save_pretrained(path)
        return path

    return save
