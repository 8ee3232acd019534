"""Faults a user meets and what comm does about them: a failed start, a stop signal, a damaged
or unwritable checkpoint, a config value that cannot work, a mistyped path, and the console
during checkpoints. Real processes and real signals where the behaviour depends on them."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comm_cli.training.checkpoint import complete_checkpoints, latest_checkpoint, verify_checkpoint
from tests.helpers import (
    REPO,
    base_args,
    build_workspace,
    cli_env,
    finished_wandb_records,
    max_abs_diff,
    run_in_process,
    run_module,
    run_train,
    start_module,
    trainable_weights,
    wait_for_text,
    wandb_history,
)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="module")
def whole(ws, tmp_path_factory):
    """An uninterrupted run (12 steps, checkpoints at 4, 8, 12, all kept): the reference."""
    root = tmp_path_factory.mktemp("whole")
    assert run_train(base_args(ws, root, "whole") + ["trainer.keep_last=0"]) == 0
    return root / "whole"


def final_bridges(run_dir: Path):
    return trainable_weights(run_dir / "composition" / "composition_model.safetensors")


def nothing_written(run_dir: Path) -> bool:
    """Hydra makes the (empty) run directory of every job; comm must put nothing in it but the
    run directory's lock file (held while it checks, empty of meaning once released)."""
    return not run_dir.exists() or not [p for p in run_dir.iterdir() if p.name != ".lock"]


def error_lines(err: str, program: str = "comm-train") -> list[str]:
    return [line for line in err.strip().splitlines() if line.startswith(f"{program}: error:")]


# ---------------------------------------------------------------------------------------------- a failed start


def test_a_failed_start_does_not_block_the_fixed_rerun(ws, tmp_path, capsys):
    # fails while loading data, after the run directory got its config and log
    assert run_train(base_args(ws, tmp_path, "fix") + ["data.prompt_field=question"]) == 2
    assert (tmp_path / "fix" / "run_config.yaml").is_file()
    assert not (tmp_path / "fix" / "checkpoints").exists()
    capsys.readouterr()
    # the same command, fixed: no "already holds a run", no overwrite=true needed
    assert run_train(base_args(ws, tmp_path, "fix") + ["trainer.max_steps=2"]) == 0
    assert "already holds" not in capsys.readouterr().err
    assert "earlier start in this directory saved nothing" in (tmp_path / "fix" / "train.log").read_text()
    assert (tmp_path / "fix" / "composition").is_dir()


def test_a_second_start_in_a_directory_in_use_is_refused(ws, tmp_path, capsys):
    """Before the first checkpoint a run directory holds no work yet; the lock still keeps a
    second comm-train out of it while the first runs."""
    import fcntl

    run = tmp_path / "busy"
    run.mkdir()
    with open(run / ".lock", "a+") as held:  # what a running comm-train holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        assert run_train(base_args(ws, tmp_path, "busy") + ["trainer.max_steps=2"]) == 2
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and "is in use by a running comm-train (pid 4242 on elsewhere)" in lines[0]
        assert not (run / "run_config.yaml").exists()
    # released (as when that process ends, however it ends): the run starts
    assert run_train(base_args(ws, tmp_path, "busy") + ["trainer.max_steps=2"]) == 0


# ---------------------------------------------------------------------------------------------- stop signals


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_checkpoints_at_the_next_step_and_resume_is_exact(ws, whole, tmp_path, signum):
    args = base_args(ws, tmp_path, "stopped") + ["trainer.keep_last=0", "logger=wandb"]
    env = {**cli_env(), "COMM_FAULT_STEP_SECONDS": "0.4"}  # a run that surely still trains when signalled
    process = start_module("comm_cli.train", args, tmp_path, env)
    wait_for_text(tmp_path / "stopped" / "train.log", "step 2/12 loss", process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)

    assert process.returncode == 75, err[-3000:]
    line = next(line for line in err.splitlines() if line.startswith("comm-train: stopped by"))
    assert signal.Signals(signum).name in line and "resume=auto" in line
    newest = latest_checkpoint(tmp_path / "stopped")
    step = json.loads((newest / "trainer_state.json").read_text())["step"]
    assert 2 <= step < 12 and f"at step {step}/12" in line and str(newest) in line
    assert step % 4 != 0 or (newest.parent / f"step_{step:08d}").is_dir()  # a periodic save counts
    assert verify_checkpoint(newest) is None
    assert not (tmp_path / "stopped" / "composition").exists()
    # the tracker was closed: the W&B run file ends with its exit record
    run_file = next((tmp_path / "stopped" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert any(r.WhichOneof("record_type") == "exit" for r in finished_wandb_records(run_file, 30))

    resumed = run_module("comm_cli.train", args + ["resume=auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_abs_diff(final_bridges(tmp_path / "stopped"), final_bridges(whole)) <= 1e-6
    _, _, run_id = wandb_history(tmp_path / "stopped")
    assert run_id == json.loads((newest / "trainer_state.json").read_text())["wandb_run_id"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_start_up_is_one_line_exit_75_and_leaves_nothing_half_written(
    ws, tmp_path, signum
):
    """A signal while the augment-state cache is half built (its states written, its manifest
    not): the job stops at once, not when the build ends, with the same one line and status 75 as
    a stop during training; the half-built cache is gone, so the next start builds it anew."""
    args = base_args(ws, tmp_path, "early") + ["trainer.cache_augment_states=true"]
    env = {**cli_env(), "COMM_FAULT_SETUP_SECONDS": "120"}
    process = start_module("comm_cli.train", args, tmp_path, env)
    wait_for_text(tmp_path / "early" / "train.log", "COMM_FAULT_SETUP_SECONDS: pausing", process)
    signalled = time.monotonic()
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)

    assert process.returncode == 75, err[-3000:]
    assert time.monotonic() - signalled < 60  # at once, not after the 120 s build
    lines = [line for line in err.strip().splitlines() if line.startswith("comm-train:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"comm-train: stopped by {signal.Signals(signum).name} during start-up")
    assert "resume=auto" in lines[0]
    assert not (tmp_path / "early" / "augment_cache").exists()  # nothing that looks built
    assert not list((tmp_path / "early").glob(".tmp-*"))  # and no half of it left behind
    assert latest_checkpoint(tmp_path / "early") is None and not (tmp_path / "early" / "composition").exists()


# ---------------------------------------------------------------------------------------------- damaged checkpoints


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt(path: Path) -> None:
    """Same size, a few bytes changed in the middle (what a bad disk or copy does)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + 8, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


FILES = [
    "trainable.safetensors",
    "optimizer.bin",
    "scheduler.bin",
    "random_states_0.pkl",
    "trainer_state.json",
]


@pytest.mark.parametrize("damage", [_truncate, _corrupt], ids=["truncated", "corrupt"])
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_checkpoint_file_is_named_in_one_line(ws, whole, tmp_path, capsys, name, damage):
    run = tmp_path / "whole"
    shutil.copytree(whole / "checkpoints", run / "checkpoints")
    newest = run / "checkpoints" / "step_00000012"
    damage(newest / name)
    problem = verify_checkpoint(newest)
    assert problem is not None and problem.startswith(name)
    assert verify_checkpoint(run / "checkpoints" / "step_00000008") is None
    # naming the broken checkpoint: one line, exit 2, nothing loaded or written
    assert run_train(base_args(ws, tmp_path, "other") + [f"resume={newest}"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"checkpoint {newest} is broken: {name}" in lines[0]
    assert nothing_written(tmp_path / "other")


@pytest.mark.parametrize(
    "name, damage",
    [("trainable.safetensors", _truncate), ("optimizer.bin", _corrupt), ("trainer_state.json", _corrupt)],
)
def test_resume_auto_skips_a_damaged_newest_checkpoint(ws, whole, tmp_path, name, damage):
    run = tmp_path / "whole"
    shutil.copytree(whole, run)
    shutil.rmtree(run / "composition")
    damage(run / "checkpoints" / "step_00000012" / name)
    assert run_train(base_args(ws, tmp_path, "whole") + ["trainer.keep_last=0", "resume=auto"]) == 0
    # one line says which file failed and why, and training continues from the previous one
    log = (run / "train.log").read_text()
    assert f"skipping checkpoint step_00000012: {name}" in log
    assert "resumed at step 8" in log
    # steps 9-12 again from step 8: the same bridges as the uninterrupted run
    assert max_abs_diff(final_bridges(run), final_bridges(whole)) <= 1e-6


def test_every_checkpoint_broken_is_one_line(ws, whole, tmp_path, capsys):
    run = tmp_path / "whole"
    shutil.copytree(whole, run)
    for checkpoint in complete_checkpoints(run):
        _truncate(checkpoint / "trainable.safetensors")
    assert run_train(base_args(ws, tmp_path, "whole") + ["resume=auto"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "no checkpoint in" in lines[0] and "is intact" in lines[0]
    assert "overwrite=true" in lines[0]


# ---------------------------------------------------------------------------------------------- a full disk


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), no kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(ws, whole, tmp_path):
    run = tmp_path / "disk"
    args = base_args(ws, tmp_path, "disk") + ["trainer.keep_last=0"]
    assert run_train(args + ["trainer.max_steps=4"]) == 0
    before = {p.name: p.read_bytes() for p in (run / "checkpoints" / "step_00000004").iterdir()}
    trainable = (run / "checkpoints" / "step_00000004" / "trainable.safetensors").stat().st_size
    optimizer = (run / "checkpoints" / "step_00000004" / "optimizer.bin").stat().st_size
    assert trainable < optimizer
    # continue to step 8 where no file may grow past the trainable weights' size: the optimizer
    # state of step 8 cannot be written, as on a disk that fills up
    result = subprocess.run(
        [sys.executable, "-m", "comm_cli.train", *args, "trainer.max_steps=8", "resume=auto"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_file_size_limit(trainable + 1024),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    assert "cannot write checkpoint step_00000008" in lines[0]
    assert "step_00000004, is intact" in lines[0] and "resume=auto" in lines[0]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000004"]  # no partial step 8 left behind
    assert {p.name: p.read_bytes() for p in (run / "checkpoints" / "step_00000004").iterdir()} == before
    assert verify_checkpoint(run / "checkpoints" / "step_00000004") is None
    # space freed: the same command continues
    assert run_train(args + ["trainer.max_steps=8", "resume=auto"]) == 0
    assert latest_checkpoint(run).name == "step_00000008"


# ---------------------------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.max_steps=-5", "trainer.max_steps=-5"),
        ("trainer.max_steps=0", "trainer.max_steps=0"),
        ("trainer.batch_size=0", "trainer.batch_size=0"),
        ("trainer.gradient_accumulation_steps=0", "trainer.gradient_accumulation_steps=0"),
        ("trainer.save_every=0", "trainer.save_every=0"),
        ("trainer.eval_every=-1", "trainer.eval_every=-1"),
        ("trainer.log_every=0", "trainer.log_every=0"),
        ("trainer.epochs=-1", "trainer.epochs=-1.0"),
        ("optimizer.lr=0", "optimizer.lr=0.0"),
        ("scheduler.warmup_ratio=1.5", "scheduler.warmup_ratio=1.5"),
        ("method.lora.r=0", "method.lora.r=0"),
    ],
)
def test_impossible_values_are_rejected_by_key_before_anything_loads(ws, tmp_path, capsys, override, key):
    assert run_train(base_args(ws, tmp_path, "bad") + [override]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"{key} is not valid: it must be" in lines[0]
    assert nothing_written(tmp_path / "bad")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimizer.lr=abc", "optimizer.lr: Value 'abc' of type 'str' could not be converted to Float"),
        ("trainer.batch_size=many", "trainer.batch_size: Value 'many'"),
        ("optimizer=adamx", "unknown optimizer option 'adamx': choose one of adafactor, adamw, sgd"),
        ("trainer.max_steps=(", "cannot parse the override 'trainer.max_steps=('"),
    ],
)
def test_hydras_own_config_errors_are_one_line_and_exit_2(ws, tmp_path, capsys, override, expected):
    assert run_train(base_args(ws, tmp_path, "bad") + [override]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [line for line in err.strip().splitlines()], err
    assert len(error_lines(err)) == 1 and expected in error_lines(err)[0]
    from comm_cli.eval import main as eval_main

    assert run_in_process(eval_main, "comm-eval", ["generation.batch_size=x"]) == 2
    lines = error_lines(capsys.readouterr().err, "comm-eval")
    assert len(lines) == 1 and "generation.batch_size: Value 'x'" in lines[0]
    assert run_in_process(eval_main, "comm-eval", ["logger=nope"]) == 2
    assert "unknown logger option 'nope'" in error_lines(capsys.readouterr().err, "comm-eval")[0]


# ---------------------------------------------------------------------------------------------- comm-eval paths


@pytest.mark.parametrize(
    "override, expected",
    [
        ("checkpoint=/nonexistent/composition", "checkpoint '/nonexistent/composition' does not exist"),
        ("+task@tasks.mine=jsonl_qa", "data file '/no/such/qa.jsonl' does not exist"),
    ],
)
def test_comm_eval_checks_paths_before_building_anything(tmp_path, capsys, override, expected):
    """The key-value suite needs the specialists; a bad path must fail before they are built."""
    from comm_cli.eval import main as eval_main

    kv_dir = tmp_path / "kv"
    args = [f"output_root={tmp_path}", "suite=kv_arithmetic", f"kv.dir={kv_dir}", "logger=none", override]
    if override.startswith("+task"):
        args += ["tasks.mine.data.data_files=/no/such/qa.jsonl", f"checkpoint={tmp_path}"]
    started = time.perf_counter()
    assert run_in_process(eval_main, "comm-eval", args) == 2
    lines = error_lines(capsys.readouterr().err, "comm-eval")
    assert len(lines) == 1 and expected in lines[0]
    assert not kv_dir.exists() and not list(tmp_path.glob(".tmp-kv-*"))  # nothing was built
    assert time.perf_counter() - started < 30


# ---------------------------------------------------------------------------------------------- the console


def test_one_console_line_per_checkpoint_and_accelerates_detail_in_the_log(ws, tmp_path, capfd):
    args = base_args(ws, tmp_path, "quiet") + ["trainer.max_steps=8", "trainer.eval_every=null"]
    assert run_train(args) == 0
    out = capfd.readouterr().out
    # the message after "[time LEVEL logger] "; the run's closing summary names the checkpoints
    # directory and the next command once, after the last step
    messages = [line.split("] ", 1)[-1] for line in out.splitlines()]
    during = messages[: next(i for i, m in enumerate(messages) if m.startswith("done: "))]
    checkpoint_lines = [m for m in during if "checkpoint" in m]
    assert len(checkpoint_lines) == 2, out  # steps 4 and 8
    assert all(m.startswith("checkpoint step") for m in checkpoint_lines)
    assert "accelerate" not in out
    log = (tmp_path / "quiet" / "train.log").read_text()
    assert "INFO accelerate" in log and "Saving current state" in log


@pytest.mark.slow
def test_chaos_script_three_cycles(tmp_path):
    """scripts/chaos.py: 3 cycles of SIGKILL at random moments + resume, the result exact."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "chaos.py"), "--cycles", "3", "--seed", "1", "--steps", "16"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["survived"] and report["checkpoints_found_broken"] == 0
    assert report["kills"] >= 1 and report["max_abs_diff"] <= 1e-6


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Pruning an old checkpoint that is cut short (a kill inside the deletion) must not leave a
    step directory with files missing: the chaos script counts that as a broken checkpoint."""
    import comm_cli.training.checkpoint as ckpt

    run_dir = tmp_path / "run"
    for step in (1, 2, 3):
        path = ckpt.checkpoint_dir(run_dir, step)
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"weights")
        (path / ckpt.TRAINER_STATE).write_text("{}")

    def killed_half_way(path, ignore_errors=False):
        next(p for p in Path(path).iterdir() if p.name != ckpt.TRAINER_STATE).unlink()
        raise KeyboardInterrupt  # stands in for the SIGKILL: the rest is never deleted

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_checkpoints(run_dir, keep_last=1)
    monkeypatch.undo()
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step_00000002", "step_00000003"]
    assert all((p / "model.safetensors").is_file() for p in complete_checkpoints(run_dir))
    ckpt.remove_partial_checkpoints(run_dir)  # what the next start does
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
