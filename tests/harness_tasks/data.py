"""Loaders for the test tasks: lm-eval calls ``custom_dataset`` from the YAML (``!function``), and
the json files live next to this module, so the tasks work from any working directory."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def multiple_choice(**kwargs):
    return datasets.load_dataset("json", data_files={"test": str(HERE / "comm_mc.json")})


def generation(**kwargs):
    return datasets.load_dataset("json", data_files={"test": str(HERE / "comm_gen.json")})


def text(**kwargs):
    return datasets.load_dataset("json", data_files={"test": str(HERE / "text.jsonl")})
