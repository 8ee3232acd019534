"""The key-value arithmetic task: the world, its split, the example formats, reading answers,
and the shared character tokenizer."""

from __future__ import annotations

import random
import re
import string

import pytest

from comm_cli.data.char_tokenizer import CHARACTERS, build_char_tokenizer
from comm_cli.errors import DataError
from comm_cli.experiments.kv_arithmetic import tasks as kv


@pytest.fixture(scope="module")
def world():
    return kv.KVWorld.create(seed=0)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_partitions_keys_and_never_shares_one(seed):
    world = kv.KVWorld.create(seed=seed)
    composition, heldout = set(world.composition_keys), set(world.heldout_keys)
    assert not composition & heldout
    assert composition | heldout == set(world.keys)
    assert (len(world.keys), len(composition), len(heldout)) == (500, 100, 400)


def test_world_keys_and_values(world):
    assert len(set(world.keys)) == 500
    assert all(len(k) == 3 and set(k) <= set(string.ascii_lowercase) for k in world.keys)
    assert set(world.values.values()) == set(range(10))


def test_world_is_deterministic_for_a_seed(world):
    assert kv.KVWorld.create(seed=0) == world
    assert kv.KVWorld.create(seed=1).values != world.values


def test_world_save_load_round_trip(world, tmp_path):
    world.save(tmp_path / "world.json")
    assert kv.KVWorld.load(tmp_path / "world.json") == world


def test_world_rejects_impossible_settings():
    with pytest.raises(DataError, match="distinct keys"):
        kv.KVWorld.create(num_keys=700, key_length=2)
    with pytest.raises(DataError, match="fraction"):
        kv.KVWorld.create(num_keys=10, composition_fraction=1.0)
    with pytest.raises(DataError, match="unknown key split"):
        kv.KVWorld.create().split_keys("train")


@pytest.mark.parametrize("task", kv.TASKS)
def test_generators_are_deterministic_for_a_seed(world, task):
    first = kv.sample_examples(task, 50, seed=3, world=world, split="heldout")
    assert first == kv.sample_examples(task, 50, seed=3, world=world, split="heldout")
    assert first != kv.sample_examples(task, 50, seed=4, world=world, split="heldout")


def _keys_of(prompt: str) -> list[str]:
    return re.findall(r"[a-z]+", prompt)


@pytest.mark.parametrize("split", ["composition", "heldout"])
def test_examples_use_only_keys_of_their_split(world, split):
    allowed = set(world.split_keys(split))
    for task in kv.KEY_TASKS:
        for example in kv.sample_examples(task, 200, seed=0, world=world, split=split):
            assert set(_keys_of(example["prompt"])) <= allowed


def test_arithmetic_format_and_results():
    examples = kv.sample_examples("arithmetic", 500, seed=0)
    for e in examples:
        assert re.fullmatch(r"\d([+-]\d){1,2}=", e["prompt"])
        assert int(e["completion"]) == eval(e["prompt"][:-1])  # noqa: S307 - digits and +- only
    assert any(e["completion"].startswith("-") for e in examples)
    assert {len(e["prompt"]) for e in examples} == {4, 6}  # 2 and 3 operands


def test_kv_formats_substitute_the_worlds_values(world):
    rng = random.Random(0)
    keys = world.heldout_keys
    for _ in range(200):
        e = kv.kv_arithmetic_example(world, rng, keys)
        assert re.fullmatch(r"[a-z]{3}([+-][a-z]{3}){1,2}=", e["prompt"])
        expr = kv.substitution(e["completion"])
        expected = e["prompt"][:-1]
        for key in _keys_of(e["prompt"]):
            expected = expected.replace(key, str(world.values[key]))
        assert expr == expected
        assert e["completion"] == f"{expr}={eval(expr)}"  # noqa: S307

        s = kv.kv_substitution_example(world, rng, keys)
        assert re.fullmatch(r"\d([+-]\d){1,2}", s["completion"])

        p = kv.kv_prefixed_example(world, rng, keys)
        key_expr, value_expr, rest = p["prompt"].split("=")
        assert rest == "" and int(p["completion"]) == eval(value_expr)  # noqa: S307


def test_a_worked_example():
    world = kv.KVWorld(
        seed=0, values={"abc": 4, "xyz": 7, "def": 3}, composition_keys=["abc"], heldout_keys=["xyz", "def"]
    )

    class Fixed(random.Random):
        """Draws: 3 operands, keys abc xyz def, ops + -."""

        def randint(self, a, b):
            return 3

        def sample(self, population, k):
            return ["abc", "xyz", "def"]

        def choice(self, seq):
            self.calls = getattr(self, "calls", 0) + 1
            return "+" if self.calls == 1 else "-"

    e = kv.kv_arithmetic_example(world, Fixed(), world.keys)
    assert e == {"prompt": "abc+xyz-def=", "completion": "4+7-3=8"}
    assert kv.kv_substitution_example(world, Fixed(), world.keys) == {
        "prompt": "abc+xyz-def=",
        "completion": "4+7-3",
    }
    assert kv.kv_prefixed_example(world, Fixed(), world.keys) == {
        "prompt": "abc+xyz-def=4+7-3=",
        "completion": "8",
    }
    assert kv.lookup_all(world, "heldout") == [
        {"prompt": "xyz", "completion": "7"},
        {"prompt": "def", "completion": "3"},
    ]


def test_lookup_line_puts_each_value_right_after_its_key(world):
    line = kv.lookup_line(world, random.Random(0), world.keys, num_pairs=8)
    pairs = re.findall(r"([a-z]{3})(\d)", line)
    assert len(pairs) == 8
    assert all(world.values[key] == int(value) for key, value in pairs)
    assert re.fullmatch(r"[a-z]{3}\d([; +-][a-z]{3}\d){7}", line)


def test_random_prefix_has_no_digits():
    rng = random.Random(0)
    prefixes = [kv.random_prefix(rng, 1, 15) for _ in range(300)]
    assert all(1 <= len(p) <= 15 and set(p) <= set(kv.PREFIX_CHARS) for p in prefixes)
    assert not any(c.isdigit() for p in prefixes for c in p)


@pytest.mark.parametrize(
    "generation, expected",
    [
        ("4+7-3=8", "8"),
        ("8", "8"),
        ("-9", "-9"),
        ("4-9=-5<x", "-5"),
        ("4+7-3=12;abc", "12"),
        ("4+7=", None),
        ("4+7=-", None),
        ("", None),
        ("a=b=3", "3"),
    ],
)
def test_answer_takes_the_number_after_the_last_equals(generation, expected):
    assert kv.answer(generation) == expected


def test_substitution_and_scoring():
    assert kv.substitution("4+7-3=8") == "4+7-3"
    assert kv.substitution("4+7-3") == "4+7-3"
    assert kv.is_correct("kv_arithmetic", "4+7-3=8", "4+7-3=8")
    assert kv.is_correct("kv_arithmetic", "1+1+6=8", "4+7-3=8")  # judged on the final number
    assert not kv.is_correct("kv_arithmetic", "4+7-3=08", "4+7-3=8")
    assert kv.is_correct("kv_substitution", "4+7-3=9", "4+7-3")
    assert not kv.is_correct("kv_substitution", "4+7-2=8", "4+7-3")
    assert kv.is_correct("arithmetic", "-9", "-9") and not kv.is_correct("arithmetic", "9", "-9")


def test_unknown_task_and_missing_world_are_clear_errors():
    with pytest.raises(DataError, match="unknown key-value task"):
        kv.sample_examples("sorting", 1, seed=0)
    with pytest.raises(DataError, match="needs a KVWorld"):
        kv.sample_examples("lookup", 1, seed=0)


# ---------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_tokenizer_round_trips_every_character_one_token_each(tokenizer):
    rng = random.Random(0)
    samples = ["", " ", "  a  ", "abc+xyz-def=4+7-3=8", "x;y z\n1", CHARACTERS]
    samples += ["".join(rng.choices(CHARACTERS, k=rng.randint(1, 40))) for _ in range(200)]
    for text in samples:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert len(ids) == len(text) + 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_ids_are_fixed(tokenizer):
    again = build_char_tokenizer()
    assert again.get_vocab() == tokenizer.get_vocab()
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) == 4 + len(CHARACTERS)
    assert tokenizer("a0 ", add_special_tokens=False)["input_ids"] == [4, 30, 44]


def test_tokenizer_survives_save_and_auto_load(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "qz+a; =4+7-3=8"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)


def test_a_balanced_split_gives_every_value_the_same_share_of_composition_keys():
    import collections

    for seed in range(3):
        plain, balanced = kv.KVWorld.create(seed=seed), kv.KVWorld.create(seed=seed, balanced=True)
        assert plain.values == balanced.values  # the same keys and values, another split
        counts = collections.Counter(balanced.values[k] for k in balanced.composition_keys)
        assert set(counts.values()) == {10} and len(balanced.composition_keys) == 100
        assert not set(balanced.composition_keys) & set(balanced.heldout_keys)
        assert sorted(balanced.composition_keys + balanced.heldout_keys) == sorted(balanced.keys)
    # a small world whose values cannot all be served keeps the requested size
    tiny = kv.KVWorld.create(seed=0, num_keys=40, balanced=True)
    assert len(tiny.composition_keys) == 8
