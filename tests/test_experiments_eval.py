"""The paper's code and low-resource-language settings as shipped configs: `comm-train
experiment=X --cfg job` composes, and each trains and evaluates end to end on tiny local
stand-ins (the workspace's models in place of the hub ids, a few lines of data)."""

from __future__ import annotations

import json

import pytest

from comm_cli.eval import main as eval_main
from tests.helpers import build_workspace, run_in_process, run_train

EXPERIMENTS = {
    "code_qwen": ("Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-Coder-0.5B", "suite=code"),
    "low_resource": ("google/gemma-2-9b", "google/gemma-2-2b", "suite=low_resource"),
}


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_composes_with_cfg_job(experiment, capsys):
    assert run_train([f"experiment={experiment}", "--cfg", "job"]) == 0
    printed = capsys.readouterr().out
    anchor, augment, _ = EXPERIMENTS[experiment]
    assert f"name_or_path: {anchor}" in printed and f"name_or_path: {augment}" in printed
    assert "every: 4" in printed


def _stand_ins(root):
    """Tiny local data in each experiment's documented formats (the char tokenizer's alphabet)."""
    code = [{"prompt": f"def f{i}(x)\n", "completion": f"    return x + {i}\n"} for i in range(12)]
    (root / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in code))
    humaneval = [
        {
            "task_id": "t/0",
            "prompt": "def inc(x):\n    return x + 1\n# ",
            "canonical_solution": "",
            "test": "def check(candidate):\n    assert candidate(1) == 2\n",
            "entry_point": "inc",
        }
    ]
    (root / "he.jsonl").write_text("".join(json.dumps(r) + "\n" for r in humaneval))
    mbpp = [{"task_id": 1, "text": "add one", "code": "", "test_list": ["assert 1 + 1 == 2"]}]
    (root / "mbpp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mbpp))
    flores = root / "flores"
    flores.mkdir()
    (flores / "eng_Latn.dev").write_text("".join(f"one plus {i}\n" for i in range(12)))
    (flores / "swh_Latn.dev").write_text("".join(f"moja na {i}\n" for i in range(12)))
    (flores / "eng_Latn.devtest").write_text("two\nthree\n")
    (flores / "swh_Latn.devtest").write_text("mbili\ntatu\n")
    math = [
        {"question": "2 plus 3", "answer": "2 plus 3 is 5\n#### 5"},
        {"question": "1 plus 1", "answer": "#### 2"},
    ]
    (root / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in math))


def _train_args(ws, root, experiment):
    args = [
        f"experiment={experiment}",
        f"output_root={root}",
        f"anchor.name_or_path={ws['anchor']}",
        f"augment.name_or_path={ws['augment']}",
        "anchor.dtype=float32",
        "augment.dtype=float32",
        "mapping.every=2",  # the tiny augment has 2 layers
        "bridge.num_heads=4",
        "trainer.max_steps=2",
        "trainer.batch_size=2",
        "trainer.gradient_accumulation_steps=1",
        "trainer.eval_every=null",
        "trainer.save_every=null",
        "trainer.progress_bar=false",
        "data.max_length=128",
        "logger=none",
    ]
    if experiment == "code_qwen":
        return [*args, f"data.data_files={root / 'code.jsonl'}"]
    return [
        *args,
        f"data.data_files.source={root / 'flores' / 'eng_Latn.dev'}",
        f"data.data_files.target={root / 'flores' / 'swh_Latn.dev'}",
    ]


def _eval_args(ws, root, experiment):
    args = [
        EXPERIMENTS[experiment][2],
        f"output_root={root}",
        f"checkpoint={root / experiment / 'composition'}",
        f"anchor.name_or_path={ws['anchor']}",
        f"augment.name_or_path={ws['augment']}",
        "logger=none",
    ]
    if experiment == "code_qwen":
        return [
            *args,
            f"tasks.humaneval.data.data_files={root / 'he.jsonl'}",
            "tasks.humaneval.code.stop=['\\n']",
            "tasks.humaneval.max_new_tokens=4",
            f"tasks.mbpp.data.data_files={root / 'mbpp.jsonl'}",
            "tasks.mbpp.max_new_tokens=0",
            "execute_untrusted_code=true",
        ]
    return [
        *args,
        f"tasks.translation.data.data_files.source={root / 'flores' / 'eng_Latn.devtest'}",
        f"tasks.translation.data.data_files.target={root / 'flores' / 'swh_Latn.devtest'}",
        "tasks.translation.max_new_tokens=4",
        f"tasks.math.data.data_files={root / 'math.jsonl'}",
        "tasks.math.max_new_tokens=4",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_runs_end_to_end_on_stand_ins(experiment, tmp_path):
    ws = build_workspace(tmp_path / "ws")
    _stand_ins(tmp_path)
    assert run_train(_train_args(ws, tmp_path, experiment)) == 0
    assert (tmp_path / experiment / "composition" / "composition_config.json").is_file()
    assert run_in_process(eval_main, "comm-eval", _eval_args(ws, tmp_path, experiment)) == 0
    # comm-eval names its output after the run it scores (eval_<run name>)
    (results,) = tmp_path.glob("eval_*/results.json")
    data = json.loads(results.read_text())
    got = {(r["task"], r["metric"]) for r in data["results"]}
    if experiment == "code_qwen":
        # the prompts hold the solutions (see tests/test_code_execution.py): both pass
        assert {(r["task"], r["value"]) for r in data["results"]} == {("humaneval", 1.0), ("mbpp", 1.0)}
    else:
        assert got == {("translation", "chrf"), ("translation", "bleu"), ("math", "exact_match")}
        predictions = [
            json.loads(line) for line in (results.parent / "predictions.jsonl").read_text().splitlines()
        ]
        prompts = [p["prompt"] for p in predictions if p["task"] == "translation"]
        assert prompts[0] == "Translate from eng_Latn to swh_Latn.\neng_Latn: two\nswh_Latn:"
        assert [p["reference"] for p in predictions if p["task"] == "math"] == [
            "2 plus 3 is 5\n#### 5",
            "#### 2",
        ]


@pytest.mark.parametrize("suite", ["code", "low_resource", "harness"])
def test_every_suite_composes_for_comm_eval(suite):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from comm_cli.cli import config_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"suite={suite}", "output_dir=x"])
    expected = {"code": {"humaneval", "mbpp"}, "low_resource": {"translation", "math"}, "harness": set()}[
        suite
    ]
    assert set(cfg.tasks) == expected  # a suite's tasks only
    typed = OmegaConf.to_object(cfg) if suite == "harness" else None
    assert typed is None or typed.tasks == {}


def test_evaluating_other_models_does_not_build_the_key_value_specialists(tmp_path):
    """The key-value specialists are built only for a job that loads them: the experiment's augment
    preset alone (unused by model=anchor) or a composition of other bases does not count."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from comm_cli.cli import config_dir, register_configs
    from comm_cli.experiments.kv_arithmetic.setup import uses_kv_specialists
    from tests.helpers import build_composition

    register_configs()
    ws = build_workspace(tmp_path / "ws")
    composition = build_composition(ws, tmp_path / "composition")

    def typed(*overrides):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return OmegaConf.to_object(compose(config_name="eval", overrides=["output_dir=x", *overrides]))

    assert uses_kv_specialists(typed("suite=kv_arithmetic", "checkpoint=x"))  # its tasks and bases
    assert not uses_kv_specialists(typed())  # no experiment section: nothing of it is read
    assert not uses_kv_specialists(
        typed("suite=kv_arithmetic", "~task@tasks.kv_arithmetic_heldout", "~task@tasks.kv_substitution_heldout",
              "~task@tasks.numeric_arithmetic", "~task@tasks.key_lookup", "+task@tasks.qa=jsonl_qa",
              "model=anchor", f"anchor.name_or_path={ws['anchor']}")
    )  # fmt: skip
    assert not uses_kv_specialists(typed("suite=code", f"checkpoint={composition}"))


def test_flores_files_must_be_aligned(tmp_path):
    from comm_cli.data.parallel_text import read_pairs
    from comm_cli.errors import DataError

    (tmp_path / "eng_Latn.dev").write_text("one\ntwo\n")
    (tmp_path / "swh_Latn.dev").write_text("moja\n")
    files = {"source": str(tmp_path / "eng_Latn.dev"), "target": str(tmp_path / "swh_Latn.dev")}
    with pytest.raises(DataError, match="has 2 lines and .* 1: parallel files must be aligned line by line"):
        read_pairs(files)
    with pytest.raises(DataError, match=r"data.data_files=\{source: FILE, target: FILE\}"):
        read_pairs(str(tmp_path / "eng_Latn.dev"))
    (tmp_path / "swh_Latn.dev").write_text("moja\nmbili\n")
    rows, source, target = read_pairs(files)
    assert (source, target) == ("eng_Latn", "swh_Latn")
    assert rows[1] == {
        "prompt": "Translate from eng_Latn to swh_Latn.\neng_Latn: two\nswh_Latn:",
        "completion": " mbili",
    }
