"""``comm-eval ... attention_maps=true``: where each bridge's heads look in the augment.

For the first ``attention_map_examples`` rows of the first task that has rows (your own data
file, or a suite's task), the composition runs teacher-forced on them as the loss does;
``BridgeProbe`` records every bridge's call and ``Bridge.attention_weights`` recomputes the
probabilities its forward used. One PNG per bridge, ``attention_bridge<i>.png`` next to
results.json: a row of panels per example, one panel per head, the anchor's tokens down (the
queries), the augment's tokens across (the keys it reads, in its own tokens when it has its own
tokenizer). The same pictures go to the tracker as ``attention/bridge<i>``.

Any composition and any data: nothing here knows an experiment.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate.utils import send_to_device

from comm_cli.compose import ComposedModel
from comm_cli.compose.diagnostics import BridgeProbe
from comm_cli.compose.encoding import CompletionCollator, augment_pad_ids
from comm_cli.data.build import eval_rows
from comm_cli.data.tokenize import tokenize_split
from comm_cli.errors import ConfigError
from comm_cli.training.models import batch_loss

logger = logging.getLogger(__name__)

MAX_LABELLED_TOKENS = 48  # longer axes carry no token labels (they would not be readable)
HEADS_PER_ROW = 8


def check_available(cfg) -> None:
    """Before any model loads: the pictures need a composition and matplotlib."""
    if not cfg.attention_maps:
        return
    if cfg.model != "calm":
        raise ConfigError(
            f"attention_maps=true draws a composition's bridges, but model={cfg.model} has none: "
            "use model=calm checkpoint=DIR"
        )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(
            "attention_maps=true draws with matplotlib, which is not installed: pip install 'comm-cli[plots]' "
            "(or pip install matplotlib)"
        ) from None


def first_task_with_rows(tasks: dict):
    """(name, task) of the first task scored on data rows (code benchmarks run programs instead)."""
    for name, task in tasks.items():
        if "pass_at_k" not in task.metrics:
            return name, task
    raise ConfigError(
        "attention_maps=true needs examples to read: give data.data_files=FILE or a task with data "
        "(lm-evaluation-harness and code tasks are not drawn)"
    )


@torch.no_grad()
def bridge_attention(model, tokenizer, cfg, name: str, task) -> dict:
    """Per bridge, each example's attention (heads, anchor tokens, augment tokens) with both
    token lists, from one teacher-forced forward over the first examples of ``task``."""
    composition: ComposedModel = model.model
    rows = eval_rows(task.data, cfg, cfg.seed, cfg.attention_map_examples)
    plan = model.read_plan
    tokenized, _ = tokenize_split(rows, tokenizer, task.data, plan=plan)
    collate = CompletionCollator(tokenizer.pad_token_id, augment_pad_ids=augment_pad_ids(plan))
    batch = send_to_device(collate([tokenized[i] for i in range(len(tokenized))]), model.device)
    with BridgeProbe(composition) as probe:
        batch_loss(composition, batch, composed=True)
    anchor_ids, anchor_mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
    augment_inputs = batch.get("augment_inputs") or [None] * len(composition.augments)
    maps = []
    for bridge, call, (augment, augment_layer, anchor_layer) in zip(
        composition.bridges, probe.calls, composition.bridge_connections
    ):
        weights = bridge.attention_weights(
            call["anchor_states"], call["keys"], call["positions"], call["attn_mask"], call["is_causal"]
        ).float()
        if call["query_valid"] is not None:  # a query with no key yet reads nothing (forward zeroes it)
            weights = weights * call["query_valid"][:, None, :, None].to(weights)
        own = augment_inputs[augment]
        key_ids = anchor_ids if own is None else own["input_ids"].cpu()
        key_mask = anchor_mask if own is None else own["attention_mask"].cpu().bool()
        key_tokenizer = tokenizer if own is None else composition.augment_readers[augment].tokenizer
        examples = []
        for i in range(anchor_ids.shape[0]):
            queries, keys = anchor_mask[i].nonzero()[:, 0], key_mask[i].nonzero()[:, 0]
            examples.append(
                {
                    "weights": weights[i][:, queries][:, :, keys].cpu(),
                    "queries": _tokens(tokenizer, anchor_ids[i, queries]),
                    "keys": _tokens(key_tokenizer, key_ids[i, keys]),
                }
            )
        maps.append({"augment_layer": augment_layer, "anchor_layer": anchor_layer, "examples": examples})
    return {"task": name, "bridges": maps}


def _tokens(tokenizer, ids: torch.Tensor) -> list[str]:
    return [tokenizer.decode([int(i)]).replace("\n", "\\n").replace(" ", "␣") or "∅" for i in ids]


def draw(attention: dict, out_dir: Path) -> list[Path]:
    """One PNG per bridge (``attention_bridge<i>.png``); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for index, bridge in enumerate(attention["bridges"]):
        figure = _bridge_figure(plt, bridge["examples"])
        figure.suptitle(
            f"{attention['task']}: bridge {index} (augment layer {bridge['augment_layer']} -> anchor layer "
            f"{bridge['anchor_layer']}); rows: anchor tokens, columns: augment tokens",
            fontsize=9,
        )
        figure.tight_layout()
        paths.append(out_dir / f"attention_bridge{index}.png")
        figure.savefig(paths[-1], dpi=100)
        plt.close(figure)
    return paths


def _bridge_figure(plt, examples: list[dict]):
    """A row of panels per example (more rows past HEADS_PER_ROW heads), one panel per head."""
    heads = examples[0]["weights"].shape[0]
    columns = min(heads, HEADS_PER_ROW)
    rows_per_example = -(-heads // columns)
    figure, axes = plt.subplots(
        len(examples) * rows_per_example,
        columns,
        figsize=(2.6 * columns, 2.6 * len(examples) * rows_per_example + 0.6),
        squeeze=False,
    )
    for ax in axes.flat:
        ax.axis("off")
    for e, example in enumerate(examples):
        for head in range(heads):
            ax = axes[e * rows_per_example + head // columns, head % columns]
            ax.axis("on")
            ax.imshow(example["weights"][head].numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"example {e} · head {head}", fontsize=7)
            _label(ax.set_xticks, ax.set_xticklabels, example["keys"], rotation=90)
            _label(ax.set_yticks, ax.set_yticklabels, example["queries"], rotation=0)
    return figure


def _label(set_ticks, set_labels, tokens: list[str], rotation: int) -> None:
    if len(tokens) > MAX_LABELLED_TOKENS:
        set_ticks([])
        return
    set_ticks(range(len(tokens)))
    set_labels(tokens, rotation=rotation, fontsize=5)


def write_attention_maps(model, tokenizer, cfg, tasks: dict, out_dir: Path) -> list[Path]:
    """Draw the pictures of the first task with rows into ``out_dir``; returns the PNG paths."""
    name, task = first_task_with_rows(tasks)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = draw(bridge_attention(model, tokenizer, cfg, name, task), out_dir)
    logger.info("attention maps of %d bridges on %s: %s", len(paths), name, out_dir)
    return paths
