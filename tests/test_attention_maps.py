"""comm-eval attention_maps=true: a picture per bridge of where each head looks in the augment,
next to results.json and in the tracker; one clear line when it cannot be drawn."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from comm_cli.compose import ComposedModel
from comm_cli.eval import main as eval_main
from comm_cli.evaluation.attention_maps import bridge_attention
from tests.helpers import build_composition, build_workspace, run_in_process, wandb_history


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    root = tmp_path_factory.mktemp("maps")
    ws = build_workspace(root / "ws")
    return ws, root, build_composition(ws, root / "composition")


def _args(ws, root, checkpoint, name, *extra):
    return [
        f"name={name}",
        f"output_root={root}",
        f"checkpoint={checkpoint}",
        "+task@tasks.qa=jsonl_qa",
        f"tasks.qa.data.data_files={ws['data']}",
        "tasks.qa.max_examples=4",
        "tasks.qa.max_new_tokens=2",
        "logger=none",
        *extra,
    ]


def test_a_png_per_bridge_next_to_the_results_and_in_the_tracker(composed):
    ws, root, checkpoint = composed
    args = _args(
        ws, root, checkpoint, "maps", "attention_maps=true", "attention_map_examples=2", "logger=wandb"
    )
    assert run_in_process(eval_main, "comm-eval", args) == 0
    out = root / "maps"
    bridges = len(ComposedModel.from_pretrained(checkpoint).bridges)
    pngs = sorted(p.name for p in out.glob("attention_bridge*.png"))
    assert pngs == [f"attention_bridge{i}.png" for i in range(bridges)]
    assert (out / "results.json").is_file()
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in pngs)
    rows, _, _ = wandb_history(out)
    logged = {key: value for row in rows for key, value in row.items() if key.startswith("attention/")}
    images = {key.removesuffix("/_type") for key, kind in logged.items() if key.endswith("/_type")}
    assert images == {f"attention/bridge{i}" for i in range(bridges)}
    assert len(list((out / "wandb").glob("offline-run-*/files/media/images/attention/*.png"))) == bridges


def test_the_drawn_attention_is_the_bridges_own(composed):
    """Each example's panel is (heads, its anchor tokens, the augment tokens it may read), a
    distribution over the keys at every query, in causal mode nothing after the query."""
    from comm_cli.schema import DataSchema, EvalTask
    from comm_cli.training.models import load_tokenizer

    ws, _, checkpoint = composed
    model = ComposedModel.from_pretrained(checkpoint)
    tokenizer = load_tokenizer(str(ws["anchor"]))
    data = DataSchema(data_files=str(ws["data"]), format="prompt_completion")
    task = EvalTask(data=data, metrics=["loss"])
    cfg = SimpleNamespace(seed=0, attention_map_examples=3)
    under_test = SimpleNamespace(model=model, read_plan=None, device=torch.device("cpu"))
    drawn = bridge_attention(under_test, tokenizer, cfg, "qa", task)
    assert len(drawn["bridges"]) == len(model.bridges)
    for bridge in drawn["bridges"]:
        assert len(bridge["examples"]) == 3
        for example in bridge["examples"]:
            weights = example["weights"]
            assert weights.shape == (4, len(example["queries"]), len(example["keys"]))
            assert (
                example["queries"] == example["keys"]
            )  # one tokenizer: the augment reads the anchor's tokens
            torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]))
            assert float(weights.triu(1).abs().max()) == 0.0


def test_an_augment_with_its_own_tokenizer_is_drawn_over_its_own_tokens(composed, tmp_path):
    """A byte-level BPE augment beside the anchor's character tokenizer: the keys are the BPE
    tokens (fewer than the anchor's characters), and every query that can see one reads a
    distribution over them."""
    from transformers import AutoModelForCausalLM

    from comm_cli.compose import BridgeConfig, MappingSpec
    from comm_cli.schema import DataSchema, EvalTask
    from comm_cli.training.models import load_tokenizer
    from tests import tokenizer_zoo as zoo
    from tests.conftest import tiny_model

    ws, _, _ = composed
    bpe = zoo.gpt2_bpe()
    augment = tiny_model("qwen2", seed=4, width=32, layers=2, vocab=len(bpe))
    anchor = AutoModelForCausalLM.from_pretrained(ws["anchor"], dtype=torch.float32)
    config = BridgeConfig(num_heads=4, zero_init_output=False)
    model = ComposedModel.from_models(anchor, augment, MappingSpec(every=2), config)
    tokenizer = load_tokenizer(str(ws["anchor"]))
    model.use_tokenizers(tokenizer, [bpe])
    assert model.aligned
    task = EvalTask(data=DataSchema(data_files=str(ws["data"]), format="prompt_completion"), metrics=["loss"])
    under_test = SimpleNamespace(model=model, read_plan=model.read_plan(), device=torch.device("cpu"))
    drawn = bridge_attention(
        under_test, tokenizer, SimpleNamespace(seed=0, attention_map_examples=2), "qa", task
    )
    for bridge in drawn["bridges"]:
        for example in bridge["examples"]:
            weights = example["weights"]
            assert weights.shape == (4, len(example["queries"]), len(example["keys"]))
            assert 0 < len(example["keys"]) < len(example["queries"])  # BPE merges characters
            sums = weights.sum(-1)
            assert bool(((sums - 1).abs() < 1e-5).logical_or(sums == 0).all())
            assert bool((sums[:, -1] > 0.99).all())  # the last anchor token sees the whole text


def _error(capsys, args) -> str:
    assert run_in_process(eval_main, "comm-eval", args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_maps_without_bridges_or_matplotlib_are_one_clear_line(composed, capsys, monkeypatch):
    ws, root, checkpoint = composed
    line = _error(capsys, _args(ws, root, checkpoint, "anchor_maps", "model=anchor", "attention_maps=true")
                  + [f"anchor.name_or_path={ws['anchor']}"])  # fmt: skip
    assert "attention_maps=true" in line and "model=anchor" in line and "model=calm" in line
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    line = _error(capsys, _args(ws, root, checkpoint, "no_mpl", "attention_maps=true"))
    assert "matplotlib" in line and "pip install" in line
    assert not (root / "no_mpl" / "results.json").exists()
