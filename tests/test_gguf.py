"""GGUF checkpoints as base models (``anchor.gguf_file=NAME``): a tiny Llama written to GGUF in
the test loads as the model it was written from, brings its own tokenizer, composes, is recorded
in a saved composition, trains through comm-train, and fails with one clear line when the file
is missing, is not GGUF, or holds an architecture transformers cannot read."""

from __future__ import annotations

import json

import pytest
import torch

from comm_cli.compose import ComposedModel
from comm_cli.compose.loading import load_causal_lm, load_model_config
from comm_cli.compose.specs import AugmentSpec, CompositionConfig, MappingSpec, ModelSpec
from comm_cli.errors import ModelLoadError
from comm_cli.training.models import load_tokenizer
from tests.conftest import tiny_model
from tests.gguf_writer import byte_level_vocabulary, tiny_llama, write_llama_gguf, write_unreadable_gguf
from tests.helpers import run_train

pytest.importorskip("gguf")

FILE = "tiny.gguf"


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    """(directory holding tiny.gguf, the model it was written from)."""
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_llama(len(byte_level_vocabulary()))
    write_llama_gguf(model, root / FILE)
    return root, model


def _ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))


def test_a_gguf_llama_loads_as_the_model_it_was_written_from(gguf_dir):
    root, source = gguf_dir
    spec = ModelSpec(str(root), gguf_file=FILE)
    config = load_model_config(spec, "anchor model")
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 2, 32)
    loaded = load_causal_lm(spec, "anchor model")
    ids = _ids(source.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, source(ids).logits)  # F32 tensors: de-quantising is exact
    assert not loaded.training


def test_gguf_is_dequantised_to_the_configured_dtype(gguf_dir):
    root, _ = gguf_dir
    model = load_causal_lm(ModelSpec(str(root), gguf_file=FILE, dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_gguf_base_is_a_plain_dense_model_that_saves_as_safetensors(gguf_dir, tmp_path):
    """What a conversion (GGUF -> safetensors, once, then cached) relies on."""
    root, source = gguf_dir
    model = load_causal_lm(ModelSpec(str(root), gguf_file=FILE))
    assert not getattr(model, "is_quantized", False)
    assert {type(m).__name__ for m in model.modules()} >= {"Linear", "Embedding"}
    model.save_pretrained(tmp_path / "converted")
    again = load_causal_lm(ModelSpec(str(tmp_path / "converted")))
    ids = _ids(source.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, source(ids).logits)


def test_the_tokenizer_comes_from_the_gguf_file(gguf_dir):
    root, _ = gguf_dir
    tokenizer = load_tokenizer(str(root), ModelSpec(str(root), gguf_file=FILE))
    vocab = byte_level_vocabulary()
    assert len(tokenizer) == len(vocab)
    ids = tokenizer("abc the<|im_end|>", add_special_tokens=False)["input_ids"]
    assert [vocab[i] for i in ids] == ["abc", "Ġt", "he", "<|im_end|>"]  # merges and a control token
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None


def test_name_or_path_may_name_the_file_itself(gguf_dir):
    root, _ = gguf_dir
    spec = ModelSpec(str(root / FILE))
    assert (spec.name_or_path, spec.gguf_file) == (str(root), FILE)


def test_a_composition_over_a_gguf_anchor_records_the_file_and_loads_back(gguf_dir, tmp_path):
    root, source = gguf_dir
    augment_dir = tmp_path / "augment"
    tiny_model("gpt_neox", seed=3, width=16, layers=2, vocab=source.config.vocab_size).save_pretrained(
        augment_dir
    )
    config = CompositionConfig(
        anchor=ModelSpec(str(root), gguf_file=FILE),
        augments=[AugmentSpec(model=ModelSpec(str(augment_dir)), mapping=MappingSpec(every=1))],
    )
    model = ComposedModel.from_config(config)
    with torch.no_grad():
        for p in model.bridges.parameters():
            p.normal_(0, 0.05)  # so the bridges change the logits
    ids = _ids(source.config.vocab_size)
    with torch.no_grad():
        before = model(ids).logits
        with model.bridges_disabled():
            assert torch.equal(model(ids).logits, source(ids).logits)
    model.save_pretrained(tmp_path / "composition")
    saved = json.loads((tmp_path / "composition" / "composition_config.json").read_text())
    assert saved["anchor"]["gguf_file"] == FILE and saved["anchor"]["name_or_path"] == str(root)
    again = ComposedModel.from_pretrained(tmp_path / "composition")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, before)


def _one_line(err: ModelLoadError) -> str:
    message = str(err)
    assert "\n" not in message
    return message


def test_a_missing_gguf_file_is_one_clear_error(gguf_dir):
    root, _ = gguf_dir
    with pytest.raises(ModelLoadError) as err:
        load_causal_lm(ModelSpec(str(root), gguf_file="nope.gguf"), "anchor model")
    message = _one_line(err.value)
    assert f"{root / 'nope.gguf'}' does not exist" in message and "gguf_file" in message


def test_an_architecture_transformers_cannot_read_from_gguf_is_one_clear_error(tmp_path):
    write_unreadable_gguf(tmp_path / "odd.gguf", "rwkv7")
    with pytest.raises(ModelLoadError) as err:
        load_model_config(ModelSpec(str(tmp_path), gguf_file="odd.gguf"), "augmenting model 0")
    message = _one_line(err.value)
    assert "holds a 'rwkv7' model, which transformers cannot read from GGUF" in message
    assert "llama" in message  # what it can read


def test_a_file_that_is_not_gguf_is_one_clear_error(tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError) as err:
        load_causal_lm(ModelSpec(str(tmp_path), gguf_file="fake.gguf"))
    assert "is not a GGUF file" in _one_line(err.value)


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def gguf_workspace(gguf_dir, tmp_path_factory):
    """An augment that shares the GGUF file's tokenizer, and prompt/completion data."""
    root, source = gguf_dir
    ws = tmp_path_factory.mktemp("gguf_ws")
    tokenizer = load_tokenizer(str(root), ModelSpec(str(root), gguf_file=FILE))
    tiny_model("qwen2", seed=4, width=16, layers=2, vocab=source.config.vocab_size).save_pretrained(
        ws / "augment"
    )
    tokenizer.save_pretrained(ws / "augment")
    rows = [{"prompt": f"{x} plus {y} is", "completion": f" {x + y}"} for x in range(6) for y in range(6)]
    (ws / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ws


def _train_args(root, ws, out, gguf_file=FILE) -> list[str]:
    return [
        "name=gguf_run",
        f"output_root={out}",
        f"anchor.name_or_path={root}",
        f"anchor.gguf_file={gguf_file}",
        f"augment.name_or_path={ws / 'augment'}",
        "data=jsonl",
        f"data.data_files={ws / 'train.jsonl'}",
        "data.max_length=32",
        "mapping=every4",
        "mapping.every=1",
        "bridge.num_heads=4",
        "trainer.max_steps=2",
        "trainer.batch_size=4",
        "trainer.eval_every=null",
        "trainer.save_every=null",
        "trainer.progress_bar=false",
        "logger=none",
    ]


def test_comm_train_composes_a_gguf_anchor(gguf_dir, gguf_workspace, tmp_path):
    root, _ = gguf_dir
    assert run_train(_train_args(root, gguf_workspace, tmp_path)) == 0
    saved = json.loads((tmp_path / "gguf_run" / "composition" / "composition_config.json").read_text())
    assert saved["anchor"]["gguf_file"] == FILE


def test_comm_train_reports_a_missing_gguf_file_in_one_line(gguf_dir, gguf_workspace, tmp_path, capsys):
    root, _ = gguf_dir
    status = run_train(_train_args(root, gguf_workspace, tmp_path, gguf_file="missing.gguf"))
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("comm-train: error:")]
    assert status == 2 and len(lines) == 1, err
    assert "missing.gguf' does not exist" in lines[0]
