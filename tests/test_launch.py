"""comm-launch and comm-config: the launch configs and the SLURM script ship inside the wheel and
are found by name from any directory; num_processes follows the GPUs present unless given; a
launched job exits with comm-train's status (75 after a stop, not the launcher's 1), and a
process that fails to load its model stops every process with one line."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from comm_cli import launch as L
from comm_cli.errors import ConfigError
from comm_cli.training.checkpoint import latest_checkpoint, verify_checkpoint
from tests.helpers import (
    REPO,
    base_args,
    build_workspace,
    free_port,
    install_wheel,
    launch_env,
    start_module,
    wait_for_text,
)

COMMON = ["trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_every=2", "trainer.keep_last=0"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("workspace"))


def error_lines(err: str, program: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{program}: error:")]


# ---------------------------------------------------------------------------------------------- the configs


def test_per_gpu_configs_leave_num_processes_to_the_gpus_present():
    configs = {name: yaml.safe_load(path.read_text()) for name, path in L.launch_configs().items()}
    assert {"ddp", "fsdp", "multinode", "cpu_2proc", "single_gpu"} <= set(configs)
    per_gpu = [n for n, c in configs.items() if c["distributed_type"] in L.PER_GPU and n != L.CPU_CONFIG]
    assert {"ddp", "fsdp", "multinode"} <= set(per_gpu)
    assert all("num_processes" not in configs[name] for name in per_gpu)
    assert L.process_count(configs["ddp"], "ddp", [], 4) == ["--num_processes", "4"]
    assert L.process_count(configs["multinode"], "multinode", [], 8) == ["--num_processes", "16"]
    assert L.process_count(configs["multinode"], "multinode", ["--num_machines", "3"], 8)[1] == "24"
    assert L.process_count(configs["ddp"], "ddp", ["--gpu_ids", "0,1"], 8)[1] == "2"
    assert L.process_count(configs["ddp"], "ddp", ["--num-processes=3"], 8) == []  # given: kept
    assert L.process_count(configs[L.CPU_CONFIG], L.CPU_CONFIG, [], 0) == []
    assert L.process_count(configs["single_gpu"], "single_gpu", [], 8) == []
    with pytest.raises(ConfigError, match="comm-launch cpu_2proc"):
        L.process_count(configs["fsdp"], "fsdp", [], 0)


def test_arguments_go_to_accelerate_launch_or_to_comm_train():
    options = L.accelerate_options()
    launcher, train = L.split_arguments(
        [
            "--num_processes",
            "2",
            "name=x",
            "--mixed-precision=no",
            "trainer.max_steps=3",
            "--",
            "--cfg",
            "job",
        ],
        options,
    )
    assert launcher == ["--num_processes", "2", "--mixed-precision=no"]
    assert train == ["name=x", "trainer.max_steps=3", "--cfg", "job"]
    with pytest.raises(ConfigError, match="comm-launch's to set"):
        L.split_arguments(["--config_file", "x.yaml"], options)
    with pytest.raises(ConfigError, match="needs a value"):
        L.split_arguments(["--num_processes"], options)


def test_comm_config_fills_in_this_machines_gpu_count_for_plain_accelerate(tmp_path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    monkeypatch.setenv("COMM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(L, "gpu_count", lambda: 4)
    copy = L.config_for_this_machine("ddp")
    assert tmp_path in copy.parents
    assert load_config_from_file(str(copy)).num_processes == 4  # what accelerate launch reads
    assert L.config_for_this_machine(L.CPU_CONFIG) == L.launch_configs()[L.CPU_CONFIG]
    monkeypatch.setattr(L, "gpu_count", lambda: 0)  # no GPU: the shipped file, accelerate asks for the count
    assert L.config_for_this_machine("ddp") == L.launch_configs()["ddp"]


def test_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    from comm_cli.train import main as train_main
    from tests.helpers import run_in_process

    assert L.launch(["nope", "name=x"]) == 2
    (line,) = error_lines(capsys.readouterr().err, "comm-launch")
    assert "unknown launch config 'nope'" in line and "ddp" in line and "cpu_2proc" in line
    monkeypatch.setattr(L, "gpu_count", lambda: 0)
    assert L.launch(["ddp", "name=x"]) == 2
    (line,) = error_lines(capsys.readouterr().err, "comm-launch")
    assert "has none" in line and "comm-launch cpu_2proc" in line
    assert run_in_process(train_main, "comm-train", ["accelerate=fsdp", "name=x"]) == 2
    (line,) = error_lines(capsys.readouterr().err, "comm-train")
    assert "comm-launch fsdp" in line


def test_help_pages_name_every_config(capsys, monkeypatch):
    assert L.launch(["--help"]) == 0
    page = capsys.readouterr().out
    assert all(f"  {name} " in page for name in L.launch_configs())
    assert "75" in page and "comm-config" in page
    monkeypatch.setattr(sys, "argv", ["comm-config", "--help"])
    L.config_main()
    assert "comm-config accelerate NAME" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- from an install


@pytest.mark.slow
def test_an_installed_wheel_launches_two_processes_from_any_directory(ws, tmp_path):
    """pip install . ships the launch configs and the SLURM script; from a directory outside the
    checkout comm-config names them inside the install and comm-launch runs two real processes."""
    target, names = install_wheel(tmp_path)
    shipped = {n for n in names if n.startswith("comm_cli/conf/") and ("accelerate" in n or "slurm" in n)}
    expected = {f"comm_cli/conf/accelerate/{p.name}" for p in (REPO / "conf" / "accelerate").glob("*.yaml")}
    assert shipped == expected | {"comm_cli/conf/slurm/slurm_train.sh"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = launch_env(PYTHONPATH=str(target))

    def run(program: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(target / "bin" / program), *args],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    for args, name in ((("accelerate", "cpu_2proc"), "cpu_2proc.yaml"), (("slurm",), "slurm_train.sh")):
        found = run("comm-config", *args)
        assert found.returncode == 0, found.stderr[-2000:]
        assert (
            Path(found.stdout.strip())
            == target / "comm_cli" / "conf" / found.stdout.strip().split("conf/")[1]
        )
        assert Path(found.stdout.strip()).name == name and Path(found.stdout.strip()).is_file()
    listing = run("comm-config", "list")
    assert listing.returncode == 0 and "ddp" in listing.stdout and str(target) in listing.stdout

    trained = run(
        "comm-launch",
        "cpu_2proc",
        "--main_process_port",
        str(free_port()),
        *base_args(ws, elsewhere, "two"),
        *COMMON,
        "trainer.batch_size=2",
        timeout=900,
    )
    assert trained.returncode == 0, trained.stderr[-4000:]
    newest = latest_checkpoint(elsewhere / "two")
    assert newest.name == "step_00000004" and verify_checkpoint(newest) is None
    assert sorted(p.name for p in newest.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert (elsewhere / "two" / "composition").is_dir()


# ---------------------------------------------------------------------------------------------- stops and failures


def _comm_launch(config: str, args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return start_module(
        "comm_cli.launch", [config, "--main_process_port", str(free_port()), *args], cwd, launch_env(**env)
    )


@pytest.mark.slow
def test_a_stop_under_comm_launch_exits_with_comm_trains_75(ws, tmp_path):
    """SIGTERM to comm-launch (as a scheduler sends it) while two processes train: a checkpoint,
    one line, and comm-train's 75 (torchrun alone would exit 1)."""
    args = base_args(ws, tmp_path, "stopped") + ["trainer.max_steps=40", "trainer.batch_size=2"]
    process = _comm_launch(L.CPU_CONFIG, args, tmp_path, COMM_FAULT_STEP_SECONDS="0.5")
    wait_for_text(tmp_path / "stopped" / "train.log", "step 2/40 loss", process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 75, err[-4000:]
    stops = [line for line in err.splitlines() if line.startswith("comm-train: stopped by SIGTERM")]
    assert len(stops) == 1 and "resume=auto" in stops[0], err[-4000:]
    newest = latest_checkpoint(tmp_path / "stopped")
    assert verify_checkpoint(newest) is None and str(newest) in stops[0]


@pytest.mark.slow
def test_a_stop_during_start_up_under_comm_launch_is_one_line_and_75(ws, tmp_path):
    """SIGTERM to comm-launch while process 0 builds the augment-state cache and process 1 waits
    for it: both stop at once (not after the build), one line, 75, no half-built cache."""
    args = base_args(ws, tmp_path, "early") + ["trainer.cache_augment_states=true", "trainer.batch_size=2"]
    process = _comm_launch(L.CPU_CONFIG, args, tmp_path, COMM_FAULT_SETUP_SECONDS="300")
    wait_for_text(tmp_path / "early" / "train.log", "COMM_FAULT_SETUP_SECONDS: pausing", process)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 75, err[-4000:]
    assert time.monotonic() - signalled < 120  # at once, not after the 300 s build
    lines = [line for line in err.splitlines() if line.startswith(("comm-train:", "comm-launch:"))]
    assert len(lines) == 1 and "Traceback" not in err, err[-4000:]
    assert lines[0].startswith("comm-train: stopped by SIGTERM during start-up")
    assert not (tmp_path / "early" / "augment_cache").exists()
    assert not list((tmp_path / "early").glob(".tmp-*"))


@pytest.mark.slow
def test_a_process_that_cannot_load_its_model_stops_every_process_in_one_line(ws, tmp_path):
    """FSDP over two processes, the anchor missing on process 1 only (as on a node without its
    files): every process stops at once with one line naming it, instead of process 0 waiting in
    the next collective until its timeout."""
    args = base_args(ws, tmp_path, "missing") + COMMON + ["trainer.batch_size=2"]
    started = time.monotonic()
    process = _comm_launch(
        "fsdp",
        ["--num_processes", "2", "--mixed_precision", "no", *args],
        tmp_path,
        COMM_FAULT_MISSING_MODEL_ON="1",
    )
    _, err = process.communicate(timeout=600)
    assert process.returncode == 2, err[-4000:]
    (line,) = error_lines(err, "comm-train")
    assert "missing-on-this-node" in line and "process 1 of 2" in line, err[-4000:]
    assert not any(line.startswith("comm-launch:") for line in err.splitlines())
    assert time.monotonic() - started < 300  # not a collective's timeout (10 minutes and more)


def test_the_slurm_script_exits_with_comm_trains_status_not_sruns(tmp_path):
    """srun reports a step that ended on a signal as a failure of its own; the script exits with
    the status comm-train's main process wrote (75: run me again)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n"$@"\nexit 1\n',
        "scontrol": "#!/usr/bin/env bash\necho 127.0.0.1\n",
        "comm-launch": '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_FILE"\necho 75 > "$COMM_EXIT_STATUS_FILE"\nexit 1\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]]),
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "localhost",
        "ARGS_FILE": str(tmp_path / "args"),
    }
    env.pop("COMM_EXIT_STATUS_FILE", None)
    result = subprocess.run(
        ["bash", str(L.slurm_script()), "name=run", "data.data_files=my file.jsonl"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 75, result.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:3] == ["multinode", "--machine_rank", "0"] and "--num_processes" not in args
    assert args[args.index("--num_machines") + 1] == "2" and args[-2:] == [
        "name=run",
        "data.data_files=my file.jsonl",
    ]
    assert "resume=auto" in args
