#!/usr/bin/env bash
# Multi-node comm-train under SLURM: one comm-launch per node, each starting one process per GPU.
#
#   sbatch --nodes=2 --gpus-per-node=8 --time=24:00:00 "$(comm-config slurm)" \
#       experiment=code_qwen data.data_files=train.jsonl name=code_run
#
# It ships with comm (`comm-config slurm` prints its path; in a checkout it is also
# scripts/slurm_train.sh). Each node runs `comm-launch multinode` (conf/accelerate/multinode.yaml:
# the nodes meet through torch's c10d rendezvous on the first node); comm-launch must be on the
# PATH of every node (sbatch passes your environment on: submit from the activated install). The
# run directory (outputs/<name>) must be on a filesystem every node sees.
#
# Preemption and time limits: SLURM sends SIGTERM 300 s before the time limit (--signal below)
# and on preemption; every process writes a checkpoint at the next step boundary (at once during
# start-up, where nothing is half-written), and the job exits 75, comm-train's status for "stopped:
# run me again". The job always runs with resume=auto, so submitting the same command again (or
# --requeue) continues exactly where it stopped; a fresh name starts fresh.
#
# ACCELERATE_CONFIG: another launch config by name or path (fsdp, deepspeed_zero3, ...; its
# num_machines and machine rank are set here). GPUS_PER_NODE: processes per node when not one per
# GPU present.
#
#SBATCH --job-name=comm-train
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=TERM@300
set -euo pipefail

NNODES=${SLURM_NNODES:-1}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-multinode}
PROCESSES=()
if [[ -n "${GPUS_PER_NODE:-}" ]]; then
  PROCESSES=(--num_processes $((NNODES * GPUS_PER_NODE)))
fi

# The main process of the first node (where this script runs) writes comm-train's exit status
# here; comm-launch there replaces it with its own conclusion.
STATUS_DIR=$(mktemp -d)
trap 'rm -rf "$STATUS_DIR"' EXIT
export COMM_EXIT_STATUS_FILE="$STATUS_DIR/exit_status"

# One task per node; `exec` makes comm-launch itself the task SLURM signals. Each node reads its
# own rank from SLURM_NODEID; the overrides pass through unchanged ("$@").
status=0
srun --kill-on-bad-exit=1 bash -c 'exec comm-launch "$0" --machine_rank "$SLURM_NODEID" "$@"' \
  "$ACCELERATE_CONFIG" --num_machines "$NNODES" ${PROCESSES[@]+"${PROCESSES[@]}"} \
  --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" --rdzv_backend c10d \
  resume=auto "$@" || status=$?
if ((status != 0)) && [[ -s "$COMM_EXIT_STATUS_FILE" ]]; then
  status=$(<"$COMM_EXIT_STATUS_FILE")
fi
exit "$status"
