"""comm-train end to end on tiny local models: configs, training, checkpoints, resume after
SIGKILL, two processes, logging, baselines and every user error."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    base_args,
    build_workspace,
    cli_env,
    max_abs_diff,
    run_module,
    run_train,
    trainable_weights,
    wandb_history,
)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("workspace"))


def final_bridges(run_dir: Path) -> dict[str, torch.Tensor]:
    return trainable_weights(run_dir / "composition" / "composition_model.safetensors")


# ---------------------------------------------------------------------------------------------- a run


def test_training_writes_checkpoints_composition_and_wandb_offline(ws, tmp_path):
    args = base_args(ws, tmp_path) + ["logger=wandb", "logger.mode=auto"]
    assert run_train(args) == 0
    run = tmp_path / "run"
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step_00000008", "step_00000012"]  # keep_last=2 pruned step 4
    ckpt = run / "checkpoints" / "step_00000012"
    saved = trainable_weights(ckpt / "trainable.safetensors")
    assert all(name.startswith("bridges.") for name in saved)  # never the frozen bases
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["wandb_run_id"]
    assert (run / "composition" / "composition_config.json").is_file()
    assert (run / "run_config.yaml").is_file() and (run / "train.log").is_file()

    # the composition saved at the end is the last checkpoint's bridges and loads back
    from comm_cli.compose import ComposedModel

    loaded = ComposedModel.from_pretrained(run / "composition")
    assert max_abs_diff(loaded.bridge_state_dict(), saved) == 0.0

    rows, config, run_id = wandb_history(run)
    assert run_id == state["wandb_run_id"]
    logged = {key for row in rows for key in row}
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "val/loss",
        "params/trainable",
        "params/frozen",
    ):
        assert key in logged, key
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
    trainable = next(row["params/trainable"] for row in rows if "params/trainable" in row)
    assert trainable == sum(t.numel() for t in saved.values())
    assert config["optimizer"]["lr"] == 3e-3 and config["mapping"]["every"] == 2


def test_learning_happens(ws, tmp_path):
    """Not a smoke test: the bridges reduce the validation loss of the frozen anchor."""
    args = base_args(ws, tmp_path) + [
        "trainer.max_steps=40",
        "trainer.save_every=null",
        "trainer.eval_every=null",
        "optimizer.lr=1e-2",
    ]
    assert run_train(args) == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    first_loss = None
    for line in (tmp_path / "run" / "train.log").read_text().splitlines():
        if "step 2/40 loss" in line:
            first_loss = float(line.rsplit(" ", 1)[-1])
    assert first_loss is not None
    assert summary["metrics"]["val/loss"] < first_loss - 0.2


def test_tensorboard_and_no_logger(ws, tmp_path):
    assert run_train(base_args(ws, tmp_path, "tb") + ["logger=tensorboard", "trainer.max_steps=2"]) == 0
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert run_train(base_args(ws, tmp_path, "quiet") + ["logger=none", "trainer.max_steps=2"]) == 0
    assert not (tmp_path / "quiet" / "wandb").exists()


def test_gradient_accumulation_equals_a_bigger_batch(ws, tmp_path):
    common = ["trainer.max_steps=3", "trainer.save_every=null", "trainer.eval_every=null"]
    assert run_train(base_args(ws, tmp_path, "big") + common + ["trainer.batch_size=4"]) == 0
    assert (
        run_train(
            base_args(ws, tmp_path, "acc")
            + common
            + ["trainer.batch_size=2", "trainer.gradient_accumulation_steps=2"]
        )
        == 0
    )
    # sampler order is the same; 2 x 2 micro-batches hold the same examples as one batch of 4
    assert max_abs_diff(final_bridges(tmp_path / "big"), final_bridges(tmp_path / "acc")) < 1e-6


# ---------------------------------------------------------------------------------------------- crash safety


def test_sigkill_then_resume_equals_an_uninterrupted_run(ws, tmp_path):
    env = cli_env()
    whole = run_module("comm_cli.train", base_args(ws, tmp_path, "whole") + ["logger=wandb"], tmp_path, env)
    assert whole.returncode == 0, whole.stderr[-3000:]

    # killed right after step 6: the newest complete checkpoint is step 4
    killed = run_module(
        "comm_cli.train",
        base_args(ws, tmp_path, "killed") + ["logger=wandb"],
        tmp_path,
        {**env, "COMM_FAULT_KILL_AT_STEP": "6"},
    )
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "killed"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004"]
    first_id = json.loads((run / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())[
        "wandb_run_id"
    ]

    # rerunning without resume refuses to touch the run
    again = run_module("comm_cli.train", base_args(ws, tmp_path, "killed"), tmp_path, env)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert "resume=auto" in again.stderr

    resumed = run_module(
        "comm_cli.train", base_args(ws, tmp_path, "killed") + ["logger=wandb", "resume=auto"], tmp_path, env
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_abs_diff(final_bridges(run), final_bridges(tmp_path / "whole")) <= 1e-6
    # the resumed run continues the same W&B run
    _, _, resumed_id = wandb_history(run)
    assert resumed_id == first_id
    assert {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")} == {first_id}

    # a kill while step 8's checkpoint is being written leaves step 4 as the newest complete one
    torn = run_module(
        "comm_cli.train", base_args(ws, tmp_path, "torn"), tmp_path, {**env, "COMM_FAULT_KILL_IN_SAVE": "8"}
    )
    assert torn.returncode == -signal.SIGKILL
    names = sorted(p.name for p in (tmp_path / "torn" / "checkpoints").iterdir())
    assert names == [".tmp-step_00000008", "step_00000004"]
    from comm_cli.training.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path / "torn").name == "step_00000004"
    resumed = run_module("comm_cli.train", base_args(ws, tmp_path, "torn") + ["resume=auto"], tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (tmp_path / "torn" / "checkpoints" / ".tmp-step_00000008").exists()
    assert max_abs_diff(final_bridges(tmp_path / "torn"), final_bridges(tmp_path / "whole")) <= 1e-6


def test_resume_from_an_explicit_checkpoint_path(ws, tmp_path):
    assert run_train(base_args(ws, tmp_path, "src")) == 0
    step4 = tmp_path / "src" / "checkpoints" / "step_00000008"
    assert run_train(base_args(ws, tmp_path, "branch") + [f"resume={step4}"]) == 0
    assert max_abs_diff(final_bridges(tmp_path / "branch"), final_bridges(tmp_path / "src")) <= 1e-6


def test_resume_of_a_finished_run_changes_nothing(ws, tmp_path):
    assert run_train(base_args(ws, tmp_path, "done")) == 0
    before = final_bridges(tmp_path / "done")
    assert run_train(base_args(ws, tmp_path, "done") + ["resume=auto"]) == 0
    assert max_abs_diff(final_bridges(tmp_path / "done"), before) == 0.0


# ---------------------------------------------------------------------------------------------- distribution


def test_two_processes_equal_one_process_with_the_same_global_batch(ws, tmp_path):
    common = ["trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_every=2"]
    one = run_module(
        "comm_cli.train", base_args(ws, tmp_path, "one") + common + ["trainer.batch_size=4"], tmp_path
    )
    assert one.returncode == 0, one.stderr[-3000:]
    # conf/accelerate/cpu_2proc.yaml: two gloo processes through torchrun on a machine without GPUs
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(Path(__file__).parents[1] / "conf" / "accelerate" / "cpu_2proc.yaml"),
        "--main_process_port",
        "29533",
        "-m",
        "comm_cli.train",
        *base_args(ws, tmp_path, "two"),
        *common,
        "trainer.batch_size=2",
    ]
    env = {**cli_env(), "CUDA_VISIBLE_DEVICES": ""}
    two = subprocess.run(launch, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    # one run directory, written once
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == [
        "step_00000002",
        "step_00000004",
    ]
    assert (
        sorted((tmp_path / "two" / "checkpoints" / "step_00000004").glob("random_states_*.pkl"))[-1].name
        == "random_states_1.pkl"
    )
    assert max_abs_diff(final_bridges(tmp_path / "two"), final_bridges(tmp_path / "one")) < 1e-5


# ---------------------------------------------------------------------------------------------- sweeps, baselines


def test_multirun_sweep(ws, tmp_path):
    args = base_args(ws, tmp_path, "sweep") + ["trainer.max_steps=2", "trainer.save_every=null"]
    result = run_module("comm_cli.train", ["-m", *args, "optimizer.lr=1e-3,2e-3"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep-multirun"
    assert (sweep / "0" / "composition").is_dir() and (sweep / "1" / "composition").is_dir()
    lrs = [
        json.loads((sweep / str(i) / "composition" / "composition_config.json").read_text()) for i in (0, 1)
    ]
    assert all(cfg["bridge"]["num_heads"] == 4 for cfg in lrs)
    assert "lr: 0.001" in (sweep / "0" / "run_config.yaml").read_text()
    assert "lr: 0.002" in (sweep / "1" / "run_config.yaml").read_text()


def test_lora_baseline_matches_the_bridge_budget_and_saves_a_peft_adapter(ws, tmp_path):
    assert run_train(base_args(ws, tmp_path, "calm") + ["trainer.max_steps=1"]) == 0
    calm_params = sum(t.numel() for t in final_bridges(tmp_path / "calm").values())
    assert run_train(base_args(ws, tmp_path, "lora") + ["method=lora", "trainer.max_steps=4"]) == 0
    adapter = tmp_path / "lora" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    lora_params = sum(t.numel() for t in trainable_weights(adapter / "adapter_model.safetensors").values())
    per_rank = lora_params / config["r"]
    assert abs(lora_params - calm_params) <= per_rank / 2 + 1  # the closest rank
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws["anchor"]), adapter)
    assert model.peft_config["default"].r == config["r"]


@pytest.mark.parametrize("targets, modules", [("null", {"q_proj", "v_proj"}), ("[all-linear]", None)])
def test_lora_on_chosen_layers_adapts_only_those_and_still_matches_the_budget(ws, tmp_path, targets, modules):
    assert run_train(base_args(ws, tmp_path, "calm") + ["trainer.max_steps=1"]) == 0
    calm_params = sum(t.numel() for t in final_bridges(tmp_path / "calm").values())
    args = [
        "method=lora",
        "method.lora.layers=[2,3]",
        f"method.lora.target_modules={targets}",
        "trainer.max_steps=2",
    ]
    assert run_train(base_args(ws, tmp_path, "lora") + args) == 0
    adapter = tmp_path / "lora" / "adapter"
    weights = trainable_weights(adapter / "adapter_model.safetensors")
    layers = {int(name.split("layers.")[1].split(".")[0]) for name in weights}
    assert layers == {2, 3}
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in weights}
    assert adapted == (
        modules or {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    per_rank = sum(t.numel() for t in weights.values()) / config["r"]
    assert abs(sum(t.numel() for t in weights.values()) - calm_params) <= per_rank / 2 + 1


def test_lora_on_a_layer_the_anchor_lacks_is_one_clear_error(ws, tmp_path, capsys):
    args = base_args(ws, tmp_path, "lora") + ["method=lora", "method.lora.layers=[3,9]"]
    assert run_train(args) != 0
    err = capsys.readouterr().err
    assert "method.lora.layers=[3, 9]: the anchor has decoder layers 0..3" in err
    assert not (tmp_path / "lora" / "adapter").exists()


def test_full_finetuning_baseline(ws, tmp_path):
    assert run_train(base_args(ws, tmp_path, "full") + ["method=full", "trainer.max_steps=2"]) == 0
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model")
    base = AutoModelForCausalLM.from_pretrained(ws["anchor"])
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


# ---------------------------------------------------------------------------------------------- errors


def _error(capsys, args) -> str:
    status = run_train(args)
    captured = capsys.readouterr()
    assert status != 0
    return captured.err


@pytest.mark.parametrize(
    "override, message",
    [
        ("anchor.name_or_path=/no/such/model", "anchor model '/no/such/model' does not exist"),
        ("mapping.every=9", "mapping.every=9 selects no layer"),
        ("mapping=pairs", None),  # filled in below: an out-of-range pair
        ("data.data_files=/no/such/train.jsonl", "/no/such/train.jsonl"),
        ("data.prompt_field=question", "question"),
    ],
)
def test_user_errors_are_one_clear_line(ws, tmp_path, capsys, override, message):
    args = base_args(ws, tmp_path, "err") + [override]
    if override == "mapping=pairs":
        args = [a for a in args if a != "mapping.every=2"] + ["mapping.pairs=[[0,7]]"]
        message = "anchor layer 7 in pair [0, 7] is out of range: the model has 4 layers"
    err = _error(capsys, args)
    lines = [line for line in err.strip().splitlines() if line.startswith("comm-train: error:")]
    assert len(lines) == 1, err
    assert message in lines[0]
    assert not (tmp_path / "err" / "checkpoints").exists()


def test_an_augment_with_its_own_tokenizer_trains_and_evaluates(ws, tmp_path):
    """A byte-level BPE augment beside the anchor's character tokenizer: the pair is aligned
    through characters (logged), trains, saves which tokenizer each model reads, and comm-eval
    scores the saved composition by loss and by generation."""
    import json

    from tests import tokenizer_zoo as zoo
    from tests.conftest import tiny_model
    from tests.helpers import run_in_process

    bpe_dir = tmp_path / "bpe_augment"
    tokenizer = zoo.gpt2_bpe()
    tiny_model("qwen2", seed=4, width=32, layers=2, vocab=len(tokenizer)).save_pretrained(bpe_dir)
    tokenizer.save_pretrained(bpe_dir)
    assert run_train(base_args(ws, tmp_path, "aligned") + [f"augment.name_or_path={bpe_dir}"]) == 0
    assert "has its own tokenizer" in (tmp_path / "aligned" / "train.log").read_text()
    saved = json.loads((tmp_path / "aligned" / "composition" / "composition_config.json").read_text())
    assert saved["augments"][0]["tokens"] == "aligned"
    assert saved["augments"][0]["model"]["tokenizer"] == str(bpe_dir)
    assert saved["anchor"]["tokenizer"] == str(ws["anchor"])

    from comm_cli.eval import main as eval_main

    args = [
        "name=eval_aligned",
        f"output_root={tmp_path}",
        f"checkpoint={tmp_path / 'aligned' / 'composition'}",
        f"anchor.name_or_path={ws['anchor']}",
        f"augment.name_or_path={bpe_dir}",
        "+task@tasks.qa=jsonl_qa",
        f"tasks.qa.data.data_files={ws['data']}",
        "tasks.qa.max_examples=6",
        "tasks.qa.max_new_tokens=3",
        "tasks.qa.metrics=[loss,exact_match]",
        "logger=none",
    ]
    assert run_in_process(eval_main, "comm-eval", args) == 0
    rows = json.loads((tmp_path / "eval_aligned" / "results.json").read_text())["results"]
    assert {r["metric"] for r in rows} >= {"loss", "exact_match"}


def test_augment_tokens_forces_a_path(ws, tmp_path, capsys):
    """augment_tokens=aligned makes a same-tokenizer augment read its own tokens (recorded in the
    saved composition); augment_tokens=shared with a tokenizer that reads differently is one line."""
    import json

    from tests import tokenizer_zoo as zoo
    from tests.conftest import tiny_model

    args = base_args(ws, tmp_path, "forced") + ["augment_tokens=aligned", "trainer.max_steps=2"]
    assert run_train(args) == 0
    saved = json.loads((tmp_path / "forced" / "composition" / "composition_config.json").read_text())
    assert saved["augments"][0]["tokens"] == "aligned"

    bpe_dir = tmp_path / "bpe_augment"
    tokenizer = zoo.gpt2_bpe()
    tiny_model("qwen2", seed=4, width=32, layers=2, vocab=len(tokenizer)).save_pretrained(bpe_dir)
    tokenizer.save_pretrained(bpe_dir)
    args = base_args(ws, tmp_path, "shared") + [f"augment.name_or_path={bpe_dir}", "augment_tokens=shared"]
    err = _error(capsys, args)
    assert "tokens=shared" in err and "reads text differently" in err


def test_config_typos_and_wrong_types_fail_before_any_model_loads(ws, tmp_path):
    typo = run_module("comm_cli.train", base_args(ws, tmp_path) + ["optimizer.lrr=1e-3"], tmp_path)
    assert typo.returncode == 2
    assert "unknown config key 'optimizer.lrr' (did you mean 'optimizer.lr'?)" in typo.stderr
    wrong = run_module("comm_cli.train", base_args(ws, tmp_path) + ["trainer.batch_size=many"], tmp_path)
    assert wrong.returncode != 0 and "trainer.batch_size" in wrong.stderr
    # a typo inside a user's own experiment file is caught by the schema too
    user_conf = tmp_path / "my_conf" / "experiment"
    user_conf.mkdir(parents=True)
    (user_conf / "mine.yaml").write_text("# @package _global_\ntrainer:\n  max_stepz: 3\n")
    custom = run_module(
        "comm_cli.train",
        ["--config-dir", str(tmp_path / "my_conf"), "experiment=mine", *base_args(ws, tmp_path)],
        tmp_path,
    )
    assert custom.returncode != 0 and "max_stepz" in custom.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_directory_is_never_overwritten_by_another_run(ws, tmp_path, capsys):
    assert run_train(base_args(ws, tmp_path, "mine") + ["trainer.max_steps=2"]) == 0
    config_before = (tmp_path / "mine" / "run_config.yaml").read_bytes()
    weights_before = (tmp_path / "mine" / "composition" / "composition_model.safetensors").read_bytes()
    err = _error(capsys, base_args(ws, tmp_path, "mine") + ["optimizer.lr=1e-2"])
    assert "already holds a run" in err and "overwrite=true" in err
    assert (tmp_path / "mine" / "run_config.yaml").read_bytes() == config_before
    assert (
        tmp_path / "mine" / "composition" / "composition_model.safetensors"
    ).read_bytes() == weights_before
    assert (
        run_train(
            base_args(ws, tmp_path, "mine") + ["trainer.max_steps=2", "overwrite=true", "optimizer.lr=1e-2"]
        )
        == 0
    )
    assert (tmp_path / "mine" / "run_config.yaml").read_bytes() != config_before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(ws, tmp_path, capsys):
    args = base_args(ws, tmp_path, "nan") + [
        "optimizer.lr=1e35",
        "trainer.max_grad_norm=null",
        "trainer.save_every=1",
        "trainer.max_steps=30",
    ]
    err = _error(capsys, args)
    line = next(line for line in err.splitlines() if line.startswith("comm-train: error:"))
    assert "the loss became" in line and "lower optimizer.lr" in line
    from comm_cli.training.checkpoint import latest_checkpoint

    latest = latest_checkpoint(tmp_path / "nan")
    assert latest is not None and str(latest) in line
    weights = trainable_weights(latest / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "nan" / "composition").exists()


# ---------------------------------------------------------------------------------------------- packaging


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = run_module("comm_cli.train", ["--cfg", "job", "optimizer.lr=0.5"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lr: 0.5" in result.stdout and "every: 1" in result.stdout


@pytest.mark.slow
def test_installed_console_script_runs_from_another_directory(tmp_path):
    """A regular (non-editable) install, used from outside the checkout, finds its configs."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(Path(__file__).parents[1]),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheel_dir.glob("comm_cli-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "comm_cli/conf/train.yaml" in names and "comm_cli/conf/experiment/kv_arithmetic.yaml" in names
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**cli_env(), "PYTHONPATH": str(target)}
    for command in (
        [str(target / "bin" / "comm-train"), "--cfg", "job"],
        [str(target / "bin" / "comm-eval"), "--cfg", "job"],
    ):
        result = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "name_or_path" in result.stdout
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import comm_cli, comm_cli.cli as c; print(comm_cli.__file__); print(c.config_dir())",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert str(target) in probe.stdout.splitlines()[0] and str(target) in probe.stdout.splitlines()[1]
    shutil.rmtree(target)
