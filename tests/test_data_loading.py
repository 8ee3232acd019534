"""Dataset loading, tokenisation and collation on local files in tmp dirs (nothing is downloaded)."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
import torch

from comm_cli.compose import (
    AugmentSpec,
    BridgeConfig,
    ComposedModel,
    CompositionConfig,
    MappingSpec,
    ModelSpec,
)
from comm_cli.compose.encoding import CompletionCollator
from comm_cli.data.loading import DataConfig, load_splits
from comm_cli.data.tokenize import tokenize_split
from comm_cli.errors import DataError

ROWS = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(20)]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep the datasets cache of each test in its own tmp dir."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture(scope="module")
def tokenizer():
    """A character-level fast tokenizer with bos/eos/pad, built offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = sorted(set("0123456789+-=*/ abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,.:?!'\"()"))
    vocab = {token: index for index, token in enumerate(specials + chars)}
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_file(path, fmt, rows):
    """Write ``rows`` (list of dicts) to ``path`` in format ``fmt``."""
    if fmt == "jsonl":
        return write_jsonl(path, rows)
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif fmt == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif fmt == "txt":
        path.write_text("".join(row["text"] + "\n" for row in rows))
    return path


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_each_file_format_loads_with_the_builder_inferred(tmp_path, fmt):
    path = write_file(tmp_path / f"data.{fmt}", fmt, ROWS)
    splits = load_splits(DataConfig(data_files=str(path)))
    assert list(splits) == ["train"]
    assert splits["train"]["prompt"] == [row["prompt"] for row in ROWS]
    assert splits["train"]["completion"] == [row["completion"] for row in ROWS]


def test_text_file_loads_as_text_format(tmp_path):
    path = write_file(tmp_path / "data.txt", "txt", [{"text": "hello world"}, {"text": "abc"}])
    splits = load_splits(DataConfig(data_files=str(path), format="text"))
    assert splits["train"]["text"] == ["hello world", "abc"]


def test_builder_name_file_path_and_directory_are_equivalent(tmp_path):
    (tmp_path / "dir").mkdir()
    file = write_jsonl(tmp_path / "dir" / "train.jsonl", ROWS)
    expected = [row["prompt"] for row in ROWS]
    by_builder = load_splits(DataConfig(path="json", data_files=str(file)))
    by_file = load_splits(DataConfig(path=str(file)))
    by_dir = load_splits(DataConfig(path=str(tmp_path / "dir")))
    for splits in (by_builder, by_file, by_dir):
        assert splits["train"]["prompt"] == expected


def test_csv_cells_stay_text(tmp_path):
    """A completion like "007" or "NA" must reach the tokenizer as written, not as 7 or null."""
    path = tmp_path / "data.csv"
    path.write_text('prompt,completion\n"a, b",007\nNA,null\nx=,\n')
    splits = load_splits(DataConfig(data_files=str(path)))
    assert splits["train"]["prompt"] == ["a, b", "NA", "x="]
    assert splits["train"]["completion"] == ["007", "null", ""]


def test_json_numbers_become_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2=", "completion": 4}])
    splits = load_splits(DataConfig(data_files=str(path)))
    assert splits["train"]["completion"] == ["4"]


def test_custom_field_names(tmp_path, tokenizer):
    rows = [{"question": "1+1=", "answer": "2", "other": 0}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(data_files=str(path), prompt_field="question", completion_field="answer")
    train, _ = tokenize_split(load_splits(cfg)["train"], tokenizer, cfg)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert train[0]["input_ids"] == [bos] + ids(tokenizer, "1+1=2") + [eos]


def test_max_examples_keep_the_first_rows(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    val = write_jsonl(tmp_path / "val.jsonl", ROWS[:10])
    cfg = DataConfig(
        data_files={"train": str(train), "validation": str(val)},
        validation_split="validation",
        max_train_examples=3,
        max_eval_examples=4,
    )
    splits = load_splits(cfg)
    assert splits["train"]["prompt"] == [row["prompt"] for row in ROWS[:3]]
    assert len(splits["validation"]) == 4


# --- validation splits -----------------------------------------------------------------------


def test_validation_split_by_name(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS[:15])
    test = write_jsonl(tmp_path / "test.jsonl", ROWS[15:])
    splits = load_splits(
        DataConfig(data_files={"train": str(train), "test": str(test)}, validation_split="test")
    )
    assert len(splits["train"]) == 15
    assert splits["validation"]["prompt"] == [row["prompt"] for row in ROWS[15:]]


def test_validation_by_fraction_is_seeded_and_disjoint(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", ROWS))

    def split(seed):
        splits = load_splits(DataConfig(data_files=path, validation_fraction=0.25, seed=seed))
        return list(splits["train"]["prompt"]), list(splits["validation"]["prompt"])

    train, val = split(0)
    assert (len(train), len(val)) == (15, 5)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(row["prompt"] for row in ROWS)
    assert split(0) == (train, val)
    assert split(1)[1] != val


def test_validation_fraction_ignores_max_train_examples(tmp_path):
    """Changing the train budget must not change which examples are held out."""
    path = str(write_jsonl(tmp_path / "d.jsonl", ROWS))
    full = load_splits(DataConfig(data_files=path, validation_fraction=0.25))
    small = load_splits(DataConfig(data_files=path, validation_fraction=0.25, max_train_examples=2))
    assert full["validation"]["prompt"] == small["validation"]["prompt"]
    assert len(small["train"]) == 2


# --- tokenisation ----------------------------------------------------------------------------


def test_loss_only_on_completion_tokens(tokenizer):
    data = datasets.Dataset.from_list(
        [{"prompt": "12+3=", "completion": "15"}, {"prompt": "a", "completion": "bcd"}]
    )
    train, stats = tokenize_split(data, tokenizer, DataConfig())
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for row, example in zip(data, train):
        prompt, completion = ids(tokenizer, row["prompt"]), ids(tokenizer, row["completion"])
        assert example["input_ids"] == [bos] + prompt + completion + [eos]
        assert example["labels"] == [-100] * (1 + len(prompt)) + completion + [eos]
        assert example["prompt_mask"] == [1] * (1 + len(prompt)) + [0] * (len(completion) + 1)
    assert set(train.column_names) == {"input_ids", "labels", "prompt_mask"}
    assert (stats.num_examples, stats.num_kept, stats.num_truncated, stats.num_dropped) == (2, 2, 0, 0)


def test_bos_and_eos_are_optional(tokenizer):
    data = datasets.Dataset.from_list([{"prompt": "1+1=", "completion": "2"}])
    train, _ = tokenize_split(data, tokenizer, DataConfig(add_bos=False, add_eos=False))
    assert train[0]["input_ids"] == ids(tokenizer, "1+1=2")
    assert train[0]["labels"] == [-100] * 4 + ids(tokenizer, "2")


def test_text_format_labels_equal_input_ids(tokenizer):
    data = datasets.Dataset.from_list([{"body": "hello"}, {"body": "ab cd"}])
    train, _ = tokenize_split(data, tokenizer, DataConfig(format="text", text_field="body"))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for row, example in zip(data, train):
        assert example["input_ids"] == [bos] + ids(tokenizer, row["body"]) + [eos]
        assert example["labels"] == example["input_ids"]
        assert example["prompt_mask"] == [1] * len(example["input_ids"])


def test_truncation_is_counted_and_warned(tokenizer, caplog):
    data = datasets.Dataset.from_list(
        [
            {"prompt": "1+1=", "completion": "2"},  # 7 tokens: fits
            {"prompt": "12+34=", "completion": "46"},  # 10 tokens: completion partly cut
            {"prompt": "123456789+1=", "completion": "123456790"},  # prompt alone fills max_length
        ]
    )
    with caplog.at_level(logging.WARNING, logger="comm_cli.data.tokenize"):
        train, stats = tokenize_split(data, tokenizer, DataConfig(max_length=8))
    assert (stats.num_truncated, stats.num_dropped, stats.num_kept) == (2, 1, 2)
    assert all(len(example["input_ids"]) <= 8 for example in train)
    cut = train[1]
    assert cut["input_ids"] == [tokenizer.bos_token_id] + ids(tokenizer, "12+34=4")
    assert cut["labels"] == [-100] * 7 + ids(tokenizer, "4")
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "2 of 3 examples" in messages and "max_length=8" in messages
    assert "dropped 1 of 3" in messages


def test_empty_text_lines_are_dropped_and_counted(tmp_path, tokenizer):
    path = tmp_path / "d.txt"
    path.write_text("hello\n\nworld\n")
    cfg = DataConfig(data_files=str(path), format="text")
    train, stats = tokenize_split(load_splits(cfg)["train"], tokenizer, cfg)
    assert stats.num_dropped == 1
    assert len(train) == 2


def test_everything_truncated_away_is_an_error(tokenizer):
    data = datasets.Dataset.from_list([{"prompt": "123456789", "completion": "1"}])
    with pytest.raises(DataError, match="max_length"):
        tokenize_split(data, tokenizer, DataConfig(max_length=4))


def test_null_value_names_the_row(tokenizer):
    data = datasets.Dataset.from_list(
        [{"prompt": "a", "completion": "b"}, {"prompt": None, "completion": "c"}]
    )
    with pytest.raises(DataError, match=r"row 1: field 'prompt' is missing"):
        tokenize_split(data, tokenizer, DataConfig())


# --- errors ----------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl.*does not exist"):
        load_splits(DataConfig(data_files=str(missing)))
    with pytest.raises(DataError, match=r"nope\.jsonl.*does not exist"):
        load_splits(DataConfig(path=str(missing)))
    with pytest.raises(DataError, match=r"no file matches"):
        load_splits(DataConfig(data_files=str(tmp_path / "*.jsonl")))


def test_unknown_extension_and_builder(tmp_path):
    path = tmp_path / "data.xyz"
    path.write_text("hi\n")
    with pytest.raises(DataError, match=r"cannot tell the format of .*data\.xyz"):
        load_splits(DataConfig(data_files=str(path)))
    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match=r"unknown builder 'jsonl'"):
        load_splits(DataConfig(path="jsonl", data_files=str(jsonl)))


def test_missing_field_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        DataError, match=r"field 'prompt' is not a column.*available columns: question, answer"
    ):
        load_splits(DataConfig(data_files=str(path)))


def test_missing_field_in_tokenize_split(tokenizer):
    data = datasets.Dataset.from_list([{"prompt": "a"}])
    with pytest.raises(DataError, match=r"field 'completion' is not a column.*available columns: prompt"):
        tokenize_split(data, tokenizer, DataConfig())


@pytest.mark.parametrize("content", ["", "[]", "prompt,completion\n"])
def test_empty_dataset(tmp_path, content):
    name = "d.csv" if content.startswith("prompt") else "d.json"
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty|no examples"):
        load_splits(DataConfig(data_files=str(path)))


def test_bad_validation_split_lists_the_available_ones(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    test = write_jsonl(tmp_path / "test.jsonl", ROWS)
    cfg = DataConfig(data_files={"train": str(train), "test": str(test)}, validation_split="validation")
    with pytest.raises(DataError, match=r"split 'validation' is not in .*available splits: train, test"):
        load_splits(cfg)


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_validation_fraction_out_of_range(tmp_path, fraction):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match=r"validation_fraction.*outside \[0, 1\)"):
        load_splits(DataConfig(data_files=str(path), validation_fraction=fraction))


def test_unknown_format(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match=r"unknown data.format 'chat'"):
        load_splits(DataConfig(data_files=str(path), format="chat"))


def test_error_messages_are_one_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": \n')
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(data_files=str(path)))
    assert "\n" not in str(info.value)
    assert "bad.jsonl" in str(info.value)


# --- collation -------------------------------------------------------------------------------


def _examples():
    return [
        {"input_ids": [1, 5, 6, 7, 2], "labels": [-100, -100, 6, 7, 2], "prompt_mask": [1, 1, 0, 0, 0]},
        {"input_ids": [1, 8, 2], "labels": [-100, 8, 2], "prompt_mask": [1, 0, 0]},
    ]


def test_collator_right_padding():
    batch = CompletionCollator(pad_token_id=0)(_examples())
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7, 2], [-100, 8, 2, -100, -100]]
    assert batch["augment_attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_collator_left_padding_and_multiple():
    batch = CompletionCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)(_examples())
    assert batch["input_ids"].tolist() == [[0, 0, 0, 1, 5, 6, 7, 2], [0, 0, 0, 0, 0, 1, 8, 2]]
    assert batch["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100] * 5 + [6, 7, 2], [-100] * 6 + [8, 2]]
    assert batch["augment_attention_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1, 0, 0]]


def test_collator_reads_tokenize_split_output(tokenizer):
    data = datasets.Dataset.from_list(ROWS[:4])
    train, _ = tokenize_split(data, tokenizer, DataConfig())
    batch = CompletionCollator(tokenizer.pad_token_id)(list(train))
    real = batch["attention_mask"].bool()
    assert (batch["labels"][~real] == -100).all()
    assert (batch["augment_attention_mask"][~real] == 0).all()
    assert batch["attention_mask"].sum().item() == sum(len(example["input_ids"]) for example in train)


def test_collator_rejects_bad_settings():
    with pytest.raises(DataError, match="pad token"):
        CompletionCollator(pad_token_id=None)
    with pytest.raises(DataError, match="padding_side"):
        CompletionCollator(pad_token_id=0, padding_side="middle")


@pytest.mark.parametrize("mask_mode", ["causal", "prompt"])
def test_padding_side_does_not_change_the_composition_loss(tokenizer, make_model, mask_mode):
    """Collated batches drive a real composition (bridges non-zero): left and right padding give the
    same loss, in prompt mode through ``augment_attention_mask`` too."""
    vocab = len(tokenizer)
    config = CompositionConfig(
        anchor=ModelSpec("anchor"),
        augments=[AugmentSpec(model=ModelSpec("augment"), mapping=MappingSpec(every=2))],
        bridge=BridgeConfig(num_heads=4, zero_init_output=False),
        mask_mode=mask_mode,
    )
    torch.manual_seed(0)
    model = ComposedModel(make_model("llama", vocab=vocab), [make_model("gpt2", seed=1, vocab=vocab)], config)
    data = datasets.Dataset.from_list(ROWS[:6] + [{"prompt": "123456+1=", "completion": "123457"}])
    train, _ = tokenize_split(data, tokenizer, DataConfig())
    examples = list(train)
    with torch.no_grad():
        losses = []
        for side in ("left", "right"):
            batch = CompletionCollator(tokenizer.pad_token_id, padding_side=side)(examples)
            losses.append(model(**batch).loss)
        with model.bridges_disabled():
            anchor_only = model(**batch).loss
    torch.testing.assert_close(losses[0], losses[1])
    assert not torch.isclose(losses[0], anchor_only)  # the bridges take part


def test_data_config_is_a_valid_structured_config(tmp_path):
    """Hydra builds its data group from DataConfig; data_files may be a string, list or dict there."""
    from omegaconf import OmegaConf

    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    base = OmegaConf.structured(DataConfig)
    override = {"data_files": {"train": [str(train)]}, "max_train_examples": 2}
    cfg = OmegaConf.to_object(OmegaConf.merge(base, override))
    assert isinstance(cfg, DataConfig)
    assert len(load_splits(cfg)["train"]) == 2
    # An OmegaConf container passed as is (not converted to an object) works too.
    cfg.data_files = OmegaConf.create({"train": [str(train)]})
    assert len(load_splits(cfg)["train"]) == 2
