"""What the bridges read: each bridge's attention, at the position where the answer's city is
predicted, over the augment's tokens, for a few held-out questions.

The composition is run teacher-forced on prompt + reference answer; a forward pre-hook on every
bridge records its inputs, from which the attention probabilities are recomputed with the
bridge's own projections, norm and rotary positions (``bridge_attention``; a test checks that
they reproduce the bridge's output). One PNG per bridge (rows: questions, heads; columns: the
augment's tokens), written next to the table and logged to the tracker.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from comm_cli.compose import ComposedModel


def bridge_attention(bridge, anchor_states, keys, positions, attn_mask=None, is_causal=False) -> torch.Tensor:
    """Attention probabilities (batch, heads, queries, keys) of one bridge call, from its inputs
    (``Bridge.attention_weights``: the bridge's own logit scale included)."""
    return bridge.attention_weights(anchor_states, keys, positions, attn_mask=attn_mask, is_causal=is_causal)


@torch.no_grad()
def answer_attention(model: ComposedModel, tokenizer, prompt: str, completion: str, answer: str) -> dict:
    """Each bridge's attention from the position that predicts ``answer`` (its first token, inside
    the teacher-forced ``completion``) over the augment's tokens of prompt + completion."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + completion_ids
    query = _answer_position(tokenizer, prompt_ids, completion_ids, completion, answer)
    records: list[dict] = []
    handles = [
        bridge.register_forward_pre_hook(_recorder(records, index), with_kwargs=True)
        for index, bridge in enumerate(model.bridges)
    ]
    try:
        model(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    tokens = [tokenizer.decode([t]) for t in ids]
    per_bridge = {}
    for record in records:
        bridge = model.bridges[record["index"]]
        weights = bridge_attention(bridge, **record["inputs"])
        per_bridge[record["index"]] = weights[0, :, query, : query + 1].float()  # (heads, keys <= query)
    return {
        "tokens": tokens[: query + 1],
        "query": query,
        "predicts": tokens[query + 1],
        "weights": per_bridge,
    }


def _answer_position(tokenizer, prompt_ids, completion_ids, completion: str, answer: str) -> int:
    """The index (in prompt + completion) of the token after which ``answer`` starts."""
    cut = completion.index(answer)
    before = len(tokenizer(completion[:cut].rstrip(" "), add_special_tokens=False)["input_ids"])
    return len(prompt_ids) + before - 1


def _recorder(records: list, index: int):
    def hook(module, args, kwargs):
        anchor_states, keys, _values, positions = args[:4]
        records.append(
            {
                "index": index,
                "inputs": {
                    "anchor_states": anchor_states,
                    "keys": keys,
                    "positions": positions,
                    "attn_mask": kwargs.get("attn_mask"),
                    "is_causal": kwargs.get("is_causal", False),
                },
            }
        )

    return hook


def plot(results: Sequence[dict], connections: Sequence[tuple[int, int, int]], out_dir: Path) -> list[Path]:
    """One PNG per bridge: for every question, its heads' attention over the augment's tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (_, augment_layer, anchor_layer) in enumerate(connections):
        fig, axes = plt.subplots(len(results), 1, figsize=(12, 1.6 + 1.1 * len(results) * 1.6), squeeze=False)
        for ax, result in zip(axes[:, 0], results):
            weights = result["weights"][index].numpy()
            ax.imshow(weights, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-6, float(weights.max())))
            ax.set_xticks(range(len(result["tokens"])))
            ax.set_xticklabels([t.replace("\n", "\\n") for t in result["tokens"]], rotation=90, fontsize=7)
            ax.set_ylabel("head", fontsize=7)
            ax.set_yticks([])
            ax.set_title(f"predicting {result['predicts']!r}", fontsize=8)
        fig.suptitle(
            f"bridge {index}: augment layer {augment_layer} -> anchor layer {anchor_layer}", fontsize=10
        )
        fig.tight_layout()
        path = out_dir / f"attention_bridge{index}_augment{augment_layer}_anchor{anchor_layer}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
