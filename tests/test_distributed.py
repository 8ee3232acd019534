"""The distributed engines, actually run on this machine's CPUs: FSDP2 on two processes over gloo,
DeepSpeed ZeRO-2/3 on one process (Accelerate cannot make a multi-process DeepSpeed job without
a GPU), and the multi-node launch path (scripts/slurm_train.sh with conf/accelerate/multinode.yaml)
as two "nodes" on localhost. Each must give the bridges of a one-process run with the same
global batch, write checkpoints that hold only the trained parameters and their optimizer
state, and resume exactly."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from comm_cli.training.checkpoint import latest_checkpoint, verify_checkpoint
from tests.helpers import (
    REPO,
    base_args,
    build_workspace,
    free_port,
    launch_env,
    max_abs_diff,
    run_train,
    trainable_weights,
)

COMMON = ["trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_every=2", "trainer.keep_last=0"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="module")
def one(ws, tmp_path_factory):
    """One process, batch 4: the reference every engine must reproduce."""
    root = tmp_path_factory.mktemp("one")
    assert run_train(base_args(ws, root, "one") + COMMON + ["trainer.batch_size=4"]) == 0
    return root / "one"


def final_bridges(run_dir: Path) -> dict[str, torch.Tensor]:
    return trainable_weights(run_dir / "composition" / "composition_model.safetensors")


def launch_command(config: str, processes: int, args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "conf" / "accelerate" / config),
        "--num_processes",
        str(processes),
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "comm_cli.train",
        *args,
    ]


def launch(
    config: str, processes: int, args: list[str], cwd: Path, **env: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        launch_command(config, processes, args),
        cwd=cwd,
        env=launch_env(**env),
        capture_output=True,
        text=True,
        timeout=900,
    )


def trainable_names(run_dir: Path) -> set[str]:
    return set(final_bridges(run_dir))


# ---------------------------------------------------------------------------------------------- FSDP2


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_equals_one_process_keeps_checkpoints_lean_and_resumes_exactly(
    ws, one, tmp_path
):
    args = base_args(ws, tmp_path, "fsdp") + COMMON + ["trainer.batch_size=2"]
    result = launch("fsdp.yaml", 2, args, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert max_abs_diff(final_bridges(tmp_path / "fsdp"), final_bridges(one)) < 1e-5

    # lean: the trained parameters and their optimizer state, never a shard of a base
    checkpoint = latest_checkpoint(tmp_path / "fsdp")
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "optimizer.bin",
        "random_states_0.pkl",
        "random_states_1.pkl",
        "scheduler.bin",
        "trainable.safetensors",
        "trainer_state.json",
    ]
    names = trainable_names(one)
    assert set(trainable_weights(checkpoint / "trainable.safetensors")) == names
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    assert set(optimizer["state"]) == names  # keyed by name: only the bridges have state
    assert verify_checkpoint(checkpoint) is None

    # SIGTERM to the launcher: it passes the signal to both ranks, which agree on one step,
    # write a checkpoint together and exit 75; resume=auto under FSDP continues exactly.
    stop_args = base_args(ws, tmp_path, "stopped") + COMMON + ["trainer.batch_size=2", "trainer.log_every=1"]
    process = subprocess.Popen(
        launch_command("fsdp.yaml", 2, stop_args),
        cwd=tmp_path,
        env=launch_env(COMM_FAULT_STEP_SECONDS="1.0"),  # slow steps: surely still training when signalled
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / "stopped" / "train.log"
    deadline = time.monotonic() + 600
    while not (log.is_file() and "step 1/4 loss" in log.read_text()):
        assert process.poll() is None, process.stderr.read()[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert "stopped by SIGTERM at step" in err, err[-4000:]
    stopped_at = json.loads((latest_checkpoint(tmp_path / "stopped") / "trainer_state.json").read_text())[
        "step"
    ]
    assert stopped_at < 4
    assert not (tmp_path / "stopped" / "composition").exists()
    resumed = launch("fsdp.yaml", 2, stop_args + ["resume=auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed at step {stopped_at}" in (tmp_path / "stopped" / "train.log").read_text()
    assert max_abs_diff(final_bridges(tmp_path / "stopped"), final_bridges(tmp_path / "fsdp")) <= 1e-6


# ---------------------------------------------------------------------------------------------- DeepSpeed

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is an optional extra (pip install 'comm-cli[deepspeed]') and is not installed here",
)


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_one_cpu_process(ws, one, tmp_path, stage):
    config = f"deepspeed_zero{stage}.yaml"
    args = base_args(ws, tmp_path, "ds") + COMMON + ["trainer.batch_size=4"]
    result = launch(config, 1, args, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert max_abs_diff(final_bridges(tmp_path / "ds"), final_bridges(one)) < 1e-5

    # lean: DeepSpeed's module state holds the bridges only; the ZeRO optimizer state is the
    # bridges' (fp32 master weights + two Adam moments, nothing of the bases)
    checkpoint = latest_checkpoint(tmp_path / "ds")
    names = trainable_names(one)
    module_file = next((checkpoint / "pytorch_model").glob("*model_states.pt"))
    module = torch.load(module_file, weights_only=False, map_location="cpu")["module"]
    assert set(module) == names
    trained = sum(t.numel() for t in trainable_weights(checkpoint / "trainable.safetensors").values())
    optim_file = next((checkpoint / "pytorch_model").glob("*optim_states.pt"))
    assert optim_file.stat().st_size < 4 * 4 * trained + 64 * 1024
    assert verify_checkpoint(checkpoint) is None

    killed = launch(
        config,
        1,
        base_args(ws, tmp_path, "killed") + COMMON + ["trainer.batch_size=4"],
        tmp_path,
        COMM_FAULT_KILL_AT_STEP="3",
    )
    assert killed.returncode != 0
    assert latest_checkpoint(tmp_path / "killed").name == "step_00000002"
    resumed = launch(
        config,
        1,
        base_args(ws, tmp_path, "killed") + COMMON + ["trainer.batch_size=4", "resume=auto"],
        tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert max_abs_diff(final_bridges(tmp_path / "killed"), final_bridges(tmp_path / "ds")) <= 1e-6


# ---------------------------------------------------------------------------------------------- two nodes

FAKE_SRUN = """#!/usr/bin/env bash
# srun on one machine: drop srun's options, start the command once per "node" with its ids.
while [[ "$1" == --* ]]; do shift; done
pids=()
# Node 0 first, and the others once its rendezvous store listens: on one host a later node could
# otherwise bind the port first, and node 0's launcher refuses a port in use (real nodes are
# separate hosts, so this ordering is only needed here).
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
  pids+=($!)
  if ((node == 0)); then
    for ((i = 0; i < 1200; i++)); do
      (echo > "/dev/tcp/127.0.0.1/$MASTER_PORT") 2>/dev/null && break
      sleep 0.1
    done
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
echo 127.0.0.1
"""


@pytest.mark.slow
def test_two_nodes_on_localhost_through_the_slurm_script(ws, one, tmp_path):
    """scripts/slurm_train.sh (comm-launch multinode on each node), with srun and scontrol stood
    in for by scripts that start both "nodes" here: 2 nodes x 1 CPU process equals one process."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # comm-launch as an install puts it on the PATH, running this checkout's comm_cli
    comm_launch = f'#!/usr/bin/env bash\nexec "{sys.executable}" -m comm_cli.launch "$@"\n'
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("comm-launch", comm_launch)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    env = launch_env(
        PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="localhost",
        GPUS_PER_NODE="1",
        MASTER_PORT=str(free_port()),
    )
    args = base_args(ws, tmp_path, "nodes") + COMMON + ["trainer.batch_size=2"]
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "slurm_train.sh"), *args],
        cwd=tmp_path,  # the script names its launch config, found by comm-launch from any directory
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "nodes"
    assert sorted(p.name for p in latest_checkpoint(run).glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert max_abs_diff(final_bridges(run), final_bridges(one)) < 1e-5
