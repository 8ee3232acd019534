"""The real-facts experiment's plumbing on tiny stand-ins (seconds; never the real anchor):
the world and its splits, the example formats and answer readers, the data generator's promise
that held-out people never appear in composition data, building the bases from a GGUF anchor,
and the attention pictures' arithmetic."""

from __future__ import annotations

import json
import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from comm_cli.compose import ComposedModel, MappingSpec
from comm_cli.compose.specs import AugmentSpec, BridgeConfig, CompositionConfig, ModelSpec
from comm_cli.errors import DataError
from comm_cli.evaluation import metrics as M
from comm_cli.experiments.real_facts import attention, tasks
from comm_cli.experiments.real_facts import data as facts_data
from comm_cli.experiments.real_facts.config import FactsSettings, FactsSpecialistSettings, FactsTaskConfig
from comm_cli.experiments.real_facts.specialists import ensure_bases, read_complete_manifest
from comm_cli.experiments.real_facts.world import CITIES, COUNTRY_OF, FactsWorld
from tests.conftest import tiny_model
from tests.gguf_writer import byte_level_vocabulary, tiny_llama, write_llama_gguf

CITY_NAMES = [c for c, _ in CITIES]


# ---------------------------------------------------------------------------------------------- world


def test_the_world_is_seeded_and_its_splits_partition_the_people():
    world = FactsWorld.create(seed=3, num_people=200, composition_fraction=0.3, validation_fraction=0.1)
    assert (
        world.to_dict()
        == FactsWorld.create(
            seed=3, num_people=200, composition_fraction=0.3, validation_fraction=0.1
        ).to_dict()
    )
    assert world.to_dict() != FactsWorld.create(seed=4, num_people=200).to_dict()
    parts = [set(world.composition), set(world.validation), set(world.heldout)]
    assert [len(p) for p in parts] == [60, 20, 120]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == set(world.home)


def test_names_are_invented_distinct_and_cities_evenly_spread():
    cities = ["Lyon", "Tokyo", "Cairo", "Boston"]
    world = FactsWorld.create(seed=0, num_people=102, cities=cities)
    assert len(set(world.people)) == 102
    for name in world.people:
        assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", name), name
        assert tasks.city(name) is None and tasks.country(name) is None  # a name never reads as an answer
    counts = Counter(world.home.values())
    assert set(counts) == set(cities) and max(counts.values()) - min(counts.values()) <= 1


def test_world_save_and_load_round_trip(tmp_path):
    world = FactsWorld.create(
        seed=1, num_people=50, city_skill={"Lyon": {"answer": "France.", "correct": True}}
    )
    world.save(tmp_path / "world.json")
    assert FactsWorld.load(tmp_path / "world.json").to_dict() == world.to_dict()


def test_impossible_worlds_are_refused_with_the_fix():
    with pytest.raises(DataError, match="choose fractions that sum below 1"):
        FactsWorld.create(num_people=10, composition_fraction=0.8, validation_fraction=0.3)
    with pytest.raises(DataError, match="use cities from world.CITIES"):
        FactsWorld.create(num_people=10, cities=["Atlantis"])
    with pytest.raises(DataError, match="unknown people split"):
        FactsWorld.create(num_people=10).split("training")


# ---------------------------------------------------------------------------------------------- formats


def test_example_formats():
    world = FactsWorld.create(seed=0, num_people=20, cities=["Lyon"])
    person = world.people[0]
    assert tasks.statement(world, person) == {"prompt": f"{person} lives in", "completion": " Lyon."}
    one = tasks.one_hop(world, person)
    assert one["prompt"] == f"<|im_start|>user\nWhere does {person} live?<|im_end|>\n<|im_start|>assistant\n"
    assert one["completion"] == f"{person} lives in Lyon."
    assert tasks.two_hop(world, person)["completion"] == f"{person} lives in Lyon, France."
    assert tasks.two_hop(world, person, style="direct")["completion"] == f"{person} lives in France."
    assert tasks.skill("Lyon") == {
        "prompt": "<|im_start|>user\nIn which country is Lyon?<|im_end|>\n<|im_start|>assistant\n",
        "completion": "Lyon is in France.",
    }
    statements = tasks.examples("statement", world, [person], paraphrases=True)
    assert len(statements) == len(tasks.STATEMENTS) and all("?" not in s["prompt"] for s in statements)


@pytest.mark.parametrize(
    "text, city, country",
    [
        ("Zorvik Tallan lives in Lyon.", "Lyon", None),
        ("Zorvik Tallan lives in Lyon, France.", "Lyon", "France"),
        ("He moved from Boston to Tokyo, Japan", "Boston", "Japan"),
        ("London is in England.", "London", "United Kingdom"),
        ("It is in the USA, near San Francisco.", "San Francisco", "United States"),
        ("Nicely done, Francesca.", None, None),  # whole words only
        ("I do not know.", None, None),
    ],
)
def test_answers_are_read_as_the_first_city_or_country_named(text, city, country):
    assert tasks.city(text) == city
    assert tasks.country(text) == country


def test_comm_eval_scores_with_the_experiments_readers():
    read_city = M.extractor("comm_cli.experiments.real_facts.tasks:city")
    read_country = M.extractor("comm_cli.experiments.real_facts.tasks:country")
    assert M.exact_match(
        ["Zorvik Tallan lives in Lyon.", "Zorvik Tallan lives in Paris.", "in Lyon, I think"],
        ["Zorvik Tallan lives in Lyon."] * 3,
        read_city,
    ) == [True, False, True]
    assert M.exact_match(["X lives in Lyon, France."], ["X lives in Lyon, France."], read_country) == [True]
    assert M.exact_match(["X lives in Lyon."], ["X lives in Lyon, France."], read_country) == [False]


def test_every_city_has_a_country_the_reader_knows():
    for city, country in CITIES:
        assert tasks.city(f"in {city}.") == city
        assert tasks.country(f"{city} is in {country}.") == country


# ---------------------------------------------------------------------------------------------- data


def _cfg(tmp_path, world: FactsWorld, **facts):
    world.save(tmp_path / "world.json")
    data = SimpleNamespace(synthetic="real_facts", facts=FactsTaskConfig(**facts))
    return data, SimpleNamespace(facts=SimpleNamespace(dir=str(tmp_path)))


def _people_named(rows, world: FactsWorld) -> set[str]:
    return {p for row in rows for p in world.people if p in row["prompt"] + row["completion"]}


def test_training_rows_never_name_a_held_out_or_validation_person(tmp_path):
    world = FactsWorld.create(seed=2, num_people=120)
    data, cfg = _cfg(tmp_path, world, train_examples=3000, validation_examples=300)
    splits = facts_data.raw_splits(data, cfg, seed=0)
    train = list(splits["train"])
    named = _people_named(train, world)
    assert named and named <= set(world.composition)
    tasks_seen = Counter(
        "skill" if "In which country is" in r["prompt"] else "two" if "country" in r["prompt"] else "one"
        for r in train
    )
    assert set(tasks_seen) == {"skill", "one", "two"}
    assert _people_named(list(splits["validation"]), world) <= set(world.validation)


def test_a_fixed_question_draw_is_the_same_for_every_training_seed(tmp_path):
    world = FactsWorld.create(seed=2, num_people=60)
    data, cfg = _cfg(tmp_path, world, train_examples=50, validation_examples=20)
    drawn = [list(facts_data.raw_splits(data, cfg, seed=s)["train"]) for s in (0, 1)]
    assert drawn[0] != drawn[1]  # by default the training seed draws the questions
    data.facts.seed = 0
    fixed = [facts_data.raw_splits(data, cfg, seed=s) for s in (0, 1)]
    assert list(fixed[0]["train"]) == list(fixed[1]["train"]) == drawn[0]
    assert list(fixed[0]["validation"]) == list(fixed[1]["validation"])


def test_validation_on_the_training_people_is_refused(tmp_path):
    world = FactsWorld.create(seed=2, num_people=40)
    data, cfg = _cfg(tmp_path, world, validation_people="all")
    with pytest.raises(DataError, match="validate on people the composition does not train on"):
        facts_data.raw_splits(data, cfg, seed=0)


def test_evaluation_asks_once_per_person_of_the_split(tmp_path):
    world = FactsWorld.create(seed=2, num_people=40)
    data, cfg = _cfg(tmp_path, world, eval_task="two_hop", people="heldout")
    rows = list(facts_data.eval_rows(data, cfg))
    assert [r["prompt"] for r in rows] == [tasks.chat(tasks.TWO_HOP.format(name=p)) for p in world.heldout]
    assert all(tasks.country(r["completion"]) == world.country(p) for r, p in zip(rows, world.heldout))
    data.facts.eval_task, data.facts.people = "skill", "all"
    assert len(facts_data.eval_rows(data, cfg)) == len(world.cities)


def test_a_missing_world_names_the_fix(tmp_path):
    data = SimpleNamespace(synthetic="real_facts", facts=FactsTaskConfig())
    with pytest.raises(DataError, match="facts.build=true"):
        facts_data.raw_splits(data, SimpleNamespace(facts=SimpleNamespace(dir=str(tmp_path))))


# ---------------------------------------------------------------------------------------------- bases


TINY = FactsSettings(
    num_people=24,
    filter_cities=False,
    min_cities=1,
    specialist=FactsSpecialistSettings(layers=1, steps=3, batch_size=4, warmup_steps=1),
    num_threads=1,
)


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    """The experiment's bases built over a tiny GGUF anchor: (anchor dir, facts dir, gguf source)."""
    from comm_cli.experiments.real_facts.anchor import ensure_anchor

    root = tmp_path_factory.mktemp("facts")
    write_llama_gguf(tiny_llama(len(byte_level_vocabulary())), root / "tiny.gguf")
    anchor_dir = ensure_anchor(root / "anchor", ModelSpec(str(root / "tiny.gguf")))
    ensure_bases(root / "bases", anchor_dir, TINY)
    return anchor_dir, root / "bases"


def test_the_bases_are_built_from_a_gguf_anchor_and_reused(tiny_bases):
    from comm_cli.experiments.real_facts.anchor import ensure_anchor, read_manifest

    anchor_dir, bases = tiny_bases
    assert read_manifest(anchor_dir)["source"].endswith("tiny.gguf")
    manifest = read_complete_manifest(bases, TINY)
    assert manifest is not None and manifest["settings_hash"] == TINY.hash()
    world = FactsWorld.load(bases / "world.json")
    assert len(world.people) == 24 and set(world.city_skill) == set(CITY_NAMES)
    stamp = (bases / "specialist" / "model.safetensors").stat().st_mtime_ns
    assert ensure_bases(bases, anchor_dir, TINY) == manifest  # reused, not rebuilt
    assert (bases / "specialist" / "model.safetensors").stat().st_mtime_ns == stamp
    assert ensure_anchor(anchor_dir) == anchor_dir  # a complete conversion is never redone


def test_generic_is_the_anchors_truncated_copy_and_the_specialist_only_its_layers_trained(tiny_bases):
    from transformers import AutoModelForCausalLM

    anchor_dir, bases = tiny_bases
    anchor = AutoModelForCausalLM.from_pretrained(anchor_dir).state_dict()
    generic = AutoModelForCausalLM.from_pretrained(bases / "generic")
    specialist = AutoModelForCausalLM.from_pretrained(bases / "specialist").state_dict()
    assert generic.config.num_hidden_layers == 1
    for name, tensor in generic.state_dict().items():
        assert torch.equal(tensor, anchor[name]), name
    for frozen in ("model.embed_tokens.weight", "lm_head.weight"):  # the anchor's vocabulary, in and out
        assert torch.equal(specialist[frozen], anchor[frozen])
    changed = [n for n, t in generic.state_dict().items() if not torch.equal(t, specialist[n])]
    assert changed and all(n.startswith(("model.layers.0.", "model.norm.")) for n in changed)


def test_a_directory_holding_something_else_is_never_replaced(tiny_bases, tmp_path):
    from comm_cli.errors import OutputDirError

    anchor_dir, _ = tiny_bases
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="holds other files"):
        ensure_bases(tmp_path, anchor_dir, TINY)


def test_the_settings_hash_follows_what_is_built():
    assert FactsSettings().hash() == FactsSettings(num_threads=7).hash()
    assert FactsSettings().hash() != FactsSettings(num_people=401).hash()
    assert FactsSettings.from_dict(TINY.to_dict()) == TINY


# ---------------------------------------------------------------------------------------------- attention


def test_the_recomputed_attention_reproduces_each_bridges_output():
    model = ComposedModel.from_models(
        tiny_model("llama"),
        tiny_model("qwen2", seed=1, width=16),
        MappingSpec(every=2),
        BridgeConfig(num_heads=4, norm=True),
    )
    calls = []

    def capture(module, args, kwargs, output):
        calls.append((module, args, kwargs, output))

    handles = [b.register_forward_hook(capture, with_kwargs=True) for b in model.bridges]
    for bridge in model.bridges:
        torch.nn.init.normal_(bridge.o_proj.weight, std=0.1)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    assert len(calls) == 2
    for bridge, args, kwargs, output in calls:
        anchor_states, keys, values, positions = args[:4]
        weights = attention.bridge_attention(
            bridge, anchor_states, keys, positions, kwargs.get("attn_mask"), kwargs.get("is_causal", False)
        )
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
        mixed = (weights @ values).transpose(1, 2).reshape(*anchor_states.shape[:2], -1)
        torch.testing.assert_close(bridge.o_proj(mixed), output, atol=1e-5, rtol=1e-4)


def test_answer_attention_looks_from_the_token_before_the_city(tiny_bases, tmp_path):
    from comm_cli.training.models import load_tokenizer

    anchor_dir, bases = tiny_bases
    model = ComposedModel.from_config(
        CompositionConfig(
            anchor=ModelSpec(str(anchor_dir)),
            augments=[
                AugmentSpec(model=ModelSpec(str(bases / "specialist")), mapping=MappingSpec(pairs=[[0, 1]]))
            ],
            bridge=BridgeConfig(num_heads=4),
        )
    )
    tokenizer = load_tokenizer(str(anchor_dir))
    world = FactsWorld.load(bases / "world.json")
    person = world.heldout[0]
    example = tasks.one_hop(world, person)
    result = attention.answer_attention(
        model, tokenizer, example["prompt"], example["completion"], world.home[person]
    )
    assert "".join(result["tokens"]).endswith(f"{person} lives in")
    assert world.home[person].startswith(result["predicts"].strip()[:1])
    assert result["weights"][0].shape == (4, len(result["tokens"]))
    paths = attention.plot([result], model.bridge_connections, tmp_path)
    assert [p.name for p in paths] == ["attention_bridge0_augment0_anchor1.png"] and paths[
        0
    ].stat().st_size > 0


def test_the_experiment_is_found_from_the_config():
    from comm_cli import registry
    from comm_cli.data.build import synthetic_source
    from comm_cli.experiments import builtin_names, load

    load()
    assert "real_facts" in builtin_names() and registry.get("real_facts").section == "facts"
    assert synthetic_source("real_facts").__name__ == "comm_cli.experiments.real_facts.data"
    assert json.loads(json.dumps(COUNTRY_OF))["Lyon"] == "France"
