#!/usr/bin/env bash
# Multi-node comm-train under SLURM: one `accelerate launch` per node, each starting one process
# per GPU. The run directory (outputs/<name>) must be on a filesystem every node sees.
#
#   sbatch --nodes=2 --gpus-per-node=8 scripts/slurm_train.sh experiment=code_qwen data.data_files=train.jsonl
#
#SBATCH --job-name=comm-train
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${SLURM_NNODES:-1}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-conf/accelerate/ddp.yaml}

srun --kill-on-bad-exit=1 bash -c "accelerate launch \
  --config_file $ACCELERATE_CONFIG \
  --num_machines $NNODES \
  --num_processes $((NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_PROCID \
  --main_process_ip $MASTER_ADDR \
  --main_process_port $MASTER_PORT \
  --rdzv_backend c10d \
  -m comm_cli.train $*"
