#!/bin/bash
# Pretrain the 1.3B model on multi-node 8-GPU nodes. Every #SBATCH line can be overridden on the sbatch
# command line; settings and trainer overrides: slurm/README.md. Example:
#   sbatch --nodes=2 slurm/pretrain_1p3b.sh train.steps=1000
#SBATCH --job-name=dtrain-1p3b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=72:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
export DTRAIN_CONFIG=${DTRAIN_CONFIG:-configs/1p3b_diffumamba.yaml}
# sbatch runs a copy of this file: find the checkout from the path that was submitted.
if [ -z "${DTRAIN_HOME:-}" ]; then
  script=$(scontrol show job "${SLURM_JOB_ID:?submit this script with sbatch}" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
  DTRAIN_HOME=$(cd "$(dirname "$script")/.." && pwd)
fi
export DTRAIN_HOME
exec bash "$DTRAIN_HOME/slurm/common.sh" "$@"
