"""Building the key-value specialists: determinism, the saved layout, caching, and partial builds.

Every build here is the tiny one (``KVSpecialistSettings.tiny``): seconds, not accuracy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comm_cli.data.char_tokenizer import build_char_tokenizer
from comm_cli.errors import OutputDirError
from comm_cli.experiments.kv_arithmetic import config as kv_config
from comm_cli.experiments.kv_arithmetic import scoring as kv_scoring
from comm_cli.experiments.kv_arithmetic import specialists as ks
from comm_cli.experiments.kv_arithmetic import tasks as kv
from comm_cli.experiments.kv_arithmetic import training as kv_training


def tiny(seed: int = 0) -> kv_config.KVSpecialistSettings:
    return kv_config.KVSpecialistSettings.tiny(seed)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One complete tiny build (seed 0), shared read-only by the tests; copy it to change it."""
    root = tmp_path_factory.mktemp("specialists") / "seed0"
    paths = ks.ensure_specialists(root, tiny(0))
    assert paths.built
    return root


@pytest.fixture
def copy_of(built, tmp_path):
    def copy(name: str = "copy") -> Path:
        return Path(shutil.copytree(built, tmp_path / name))

    return copy


def _weights(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(root / name / "model.safetensors") for name in ("augment", "anchor")}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_gives_bit_identical_weights_and_world(built, tmp_path):
    again = ks.build_specialists(tmp_path / "again", tiny(0))
    first, second = _weights(built), _weights(again.root)
    assert _same(first["augment"], second["augment"])
    assert _same(first["anchor"], second["anchor"])
    assert (built / "world.json").read_text() == (again.root / "world.json").read_text()

    other = _weights(ks.build_specialists(tmp_path / "other", tiny(1)).root)
    assert not _same(first["augment"], other["augment"])
    assert not _same(first["anchor"], other["anchor"])


def test_the_anchor_never_sees_a_value():
    """The anchor's weights do not depend on the world: it is trained on digits alone."""
    settings, tokenizer = tiny(0), build_char_tokenizer()
    world = kv.KVWorld.create(seed=0, num_keys=settings.num_keys)
    shifted = kv.KVWorld(
        seed=0,
        values={k: (v + 1) % 10 for k, v in world.values.items()},
        composition_keys=world.composition_keys,
        heldout_keys=world.heldout_keys,
    )
    a, _ = kv_training.train_anchor(world, tokenizer, settings)
    b, _ = kv_training.train_anchor(shifted, tokenizer, settings)
    assert _same(a.state_dict(), b.state_dict())


def test_saved_layout_loads_with_auto_classes(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    augment = AutoModelForCausalLM.from_pretrained(built / "augment")
    anchor = AutoModelForCausalLM.from_pretrained(built / "anchor")
    assert (augment.config.model_type, anchor.config.model_type) == ("qwen2", "llama")
    assert augment.config.hidden_size != anchor.config.hidden_size
    tokenizers = [AutoTokenizer.from_pretrained(built / name) for name in ("augment", "anchor")]
    assert tokenizers[0].get_vocab() == tokenizers[1].get_vocab() == build_char_tokenizer().get_vocab()
    assert augment.config.vocab_size == anchor.config.vocab_size == len(tokenizers[0])

    world = kv.KVWorld.load(built / "world.json")
    assert world == kv.KVWorld.create(seed=0, num_keys=tiny().num_keys)

    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["complete"] and manifest["settings_hash"] == tiny(0).hash()
    for name in ("augment", "anchor"):
        model_manifest = json.loads((built / name / "manifest.json").read_text())
        assert model_manifest["steps"] == getattr(tiny(), name).steps
        assert model_manifest["train_seconds"] > 0
        assert set(model_manifest["accuracy"]) == set(manifest[name]["accuracy"])
    assert set(manifest["anchor"]["accuracy"]) == {
        "arithmetic",
        "arithmetic_after_kv_prefix",
        "kv_arithmetic_heldout_alone",
    }


def test_a_second_call_reuses_the_build(copy_of):
    root = copy_of()
    weights = root / "anchor" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    paths = ks.ensure_specialists(root, tiny(0))
    assert not paths.built and paths.anchor == root / "anchor"
    assert weights.stat().st_mtime_ns == before

    # How many processes build it is not part of what is built.
    settings = tiny(0)
    settings.processes = 1
    assert not ks.ensure_specialists(root, settings).built


def test_the_weights_do_not_depend_on_threads_or_processes(built, tmp_path):
    """Each specialist trains with one torch thread, in a process of its own or not: the same
    weights whatever the caller's thread setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        settings = tiny(0)
        settings.processes = 1
        serial = _weights(ks.build_specialists(tmp_path / "serial", settings).root)
    finally:
        torch.set_num_threads(previous)
    parallel = _weights(built)
    assert _same(serial["augment"], parallel["augment"]) and _same(serial["anchor"], parallel["anchor"])


def test_changed_settings_rebuild(copy_of):
    root = copy_of()
    settings = tiny(0)
    settings.anchor.steps += 1
    paths = ks.ensure_specialists(root, settings)
    assert paths.built
    assert ks.read_complete_manifest(root, settings) is not None
    assert ks.read_complete_manifest(root, tiny(0)) is None
    assert json.loads((root / "anchor" / "manifest.json").read_text())["steps"] == settings.anchor.steps


def test_the_default_causal_hashes_stay_those_of_the_published_tables():
    """The tables of docs/experiments/key_value.md and the cached builds are under these hashes: a recipe change for one
    kind of build must not rebuild the others."""
    assert kv_config.KVSpecialistSettings().hash() == "daf63f2833f78ce9"
    assert kv_config.KVSpecialistSettings(anchor_tokenizer="bpe").hash() == "eaffa2a31c8e15ff"


def test_the_encoder_recipe_has_its_own_version(monkeypatch):
    encoder = tiny(0)
    encoder.augment.kind = "encoder"
    before = encoder.hash(), tiny(0).hash()
    monkeypatch.setattr(kv_config, "ENCODER_RECIPE_VERSION", kv_config.ENCODER_RECIPE_VERSION + 1)
    assert encoder.hash() != before[0] and tiny(0).hash() == before[1]


def test_the_encoder_augment_builds_as_a_modernbert_composable_in_prompt_mode(tmp_path):
    from transformers import AutoModelForMaskedLM

    from comm_cli.compose.blocks import is_encoder

    settings = tiny(0)
    settings.augment.kind = "encoder"
    settings.processes = 1
    paths = ks.build_specialists(tmp_path / "encoder", settings)
    model = AutoModelForMaskedLM.from_pretrained(paths.augment)
    assert model.config.model_type == "modernbert" and is_encoder(model.config)
    assert model.config.initializer_range == settings.augment.width**-0.5
    assert paths.manifest["encoder_recipe_version"] == kv_config.ENCODER_RECIPE_VERSION
    assert set(paths.manifest["augment"]["accuracy"]) == {"lookup_all_keys", "lookup_in_heldout_expression"}


@pytest.mark.parametrize(
    "damage",
    ["manifest.json", "anchor/model.safetensors", "augment/tokenizer.json", "world.json", "incomplete-flag"],
)
def test_a_partial_build_is_never_taken_as_complete(copy_of, damage):
    root = copy_of()
    if damage == "incomplete-flag":
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["complete"] = False
        (root / "manifest.json").write_text(json.dumps(manifest))
    else:
        (root / damage).unlink()
    assert ks.read_complete_manifest(root, tiny(0)) is None
    paths = ks.ensure_specialists(root, tiny(0))
    assert paths.built
    assert ks.read_complete_manifest(root, tiny(0)) is not None


def test_a_build_killed_midway_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    root = tmp_path / "specialists"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for a kill while the anchor trains

    monkeypatch.setattr(kv_training, "train_anchor", killed)
    in_process = tiny(0)
    in_process.processes = 1  # the patch reaches this process only
    with pytest.raises(KeyboardInterrupt):
        ks.ensure_specialists(root, in_process)
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []

    # What a SIGKILL leaves behind (no cleanup ran): a partial sibling of a dead process.
    from comm_cli.atomic import HOST

    leftover = tmp_path / f".tmp-specialists-{HOST}-999999999"
    (leftover / "augment").mkdir(parents=True)
    (leftover / "world.json").write_text("{}")
    monkeypatch.undo()
    assert ks.read_complete_manifest(root, tiny(0)) is None
    assert ks.ensure_specialists(root, tiny(0)).built
    assert not leftover.exists()


def test_stale_partials_are_removed_also_when_the_cached_build_is_reused(copy_of):
    """A killed build's temporary directory goes the next time the cache is used, even when
    nothing is built; a running build (this process) and another host's build stay."""
    import os
    from types import SimpleNamespace

    from comm_cli.experiments.kv_arithmetic import setup

    root = copy_of()
    from comm_cli.atomic import HOST

    leftovers = {
        "dead, this host": f".tmp-{root.name}-{HOST}-999999999",
        "dead, on its way out": f".old-{root.name}-{HOST}-999999998",
        "running, this host": f".tmp-{root.name}-{HOST}-{os.getpid()}",
        "another host": f".tmp-{root.name}-elsewhere-999999997",
    }
    for name in leftovers.values():
        (root.parent / name / "augment").mkdir(parents=True)
    paths = ks.ensure_specialists(root, tiny(0))
    assert not paths.built  # reused
    left = {label for label, name in leftovers.items() if (root.parent / name).exists()}
    assert left == {"running, this host", "another host"}

    # comm-train / comm-eval reach a cached build through setup.prepare, which returns early
    dead = root.parent / leftovers["dead, this host"]
    dead.mkdir()
    spec = SimpleNamespace(name_or_path=str(root / "anchor"))
    cfg = SimpleNamespace(
        kv=SimpleNamespace(dir=str(root), specialists=tiny(0), build=False), anchor=spec, augment=spec
    )
    setup.prepare(cfg)
    assert not dead.exists()


def test_a_directory_with_other_files_is_not_replaced(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(OutputDirError, match="other files"):
        ks.ensure_specialists(root, tiny(0))
    assert (root / "notes.txt").read_text() == "keep me"


def test_greedy_generate_matches_transformers_generate(built):
    from transformers import AutoModelForCausalLM

    tokenizer = build_char_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(built / "anchor").eval()
    prompts = ["4+7-3=", "qz+a;=1+2=", "abc+xyz="]
    ours = kv_scoring.greedy_generate(model, tokenizer, prompts, max_new_tokens=5)
    for prompt, text in zip(prompts, ours):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=tokenizer.eos_token_id)
        assert text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_script_prints_the_table_and_reuses(built, copy_of, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_specialists", Path(__file__).resolve().parents[1] / "scripts" / "build_specialists.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root = copy_of()
    assert script.main(["--out-dir", str(root), "--fast", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "lookup_all_keys" in out and "arithmetic_after_kv_prefix" in out
    assert "reused" in out

    (root / "notes.txt").write_text("x")
    (root / "manifest.json").unlink()
    assert script.main(["--out-dir", str(root), "--fast", "--quiet"]) == 1
    assert "other files" in capsys.readouterr().err


def test_build_workers_die_with_the_build(tmp_path):
    """SIGKILL to a build leaves no worker training on, orphaned."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys; sys.path.insert(0, {!r})\n"
        "from comm_cli.experiments.kv_arithmetic import specialists as ks\n"
        "from comm_cli.experiments.kv_arithmetic.config import KVSpecialistSettings\n"
        "s = KVSpecialistSettings.tiny(0); s.augment.steps = s.anchor.steps = 100000\n"
        "ks.build_specialists({!r}, s)\n"
    ).format(str(Path(__file__).resolve().parents[1]), str(tmp_path / "build"))
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    children: list[int] = []
    while time.time() < deadline and len(children) < 2:
        time.sleep(1)
        out = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True).stdout.split()
        children = [int(p) for p in out if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(children) == 2, "the build did not start its two workers"
    time.sleep(3)  # let the workers set their parent-death signal
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()

    def running(pid: int) -> bool:  # gone, or a zombie nobody reaped yet, counts as ended
        try:
            state = next(
                x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("State")
            )
        except (FileNotFoundError, StopIteration):
            return False
        return "Z" not in state.split()[1]

    deadline = time.time() + 30
    while time.time() < deadline and any(running(c) for c in children):
        time.sleep(0.5)
    assert not any(running(c) for c in children)
