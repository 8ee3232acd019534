#!/usr/bin/env bash
# Multi-node comm-train under SLURM: one `accelerate launch` per node (conf/accelerate/multinode.yaml),
# each starting one process per GPU; the nodes meet through torch's c10d rendezvous on the first
# node. The run directory (outputs/<name>) must be on a filesystem every node sees.
#
#   sbatch --nodes=2 --gpus-per-node=8 --time=24:00:00 scripts/slurm_train.sh \
#       experiment=code_qwen data.data_files=train.jsonl name=code_run
#
# Preemption and time limits: SLURM sends SIGTERM 300 s before the time limit (--signal below)
# and on preemption; the launcher passes it to every process, comm-train writes a checkpoint at
# the next step boundary and exits 75. The job always runs with resume=auto, so submitting the
# same command again (or --requeue) continues exactly where it stopped; a fresh name starts fresh.
# Set ACCELERATE_CONFIG for FSDP (conf/accelerate/fsdp.yaml) or DeepSpeed; GPUS_PER_NODE if not 8.
#
#SBATCH --job-name=comm-train
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=TERM@300
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${SLURM_NNODES:-1}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-conf/accelerate/multinode.yaml}

# One task per node; `exec` makes the launcher itself the task SLURM signals.
srun --kill-on-bad-exit=1 bash -c "exec accelerate launch \
  --config_file $ACCELERATE_CONFIG \
  --num_machines $NNODES \
  --num_processes $((NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID \
  --main_process_ip $MASTER_ADDR \
  --main_process_port $MASTER_PORT \
  --rdzv_backend c10d \
  -m comm_cli.train resume=auto $*"
