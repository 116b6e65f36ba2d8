#!/bin/bash
# Pretrain the 0.5B model on multi-node 8-GPU nodes. Every #SBATCH line can be overridden on the sbatch
# command line; settings and trainer overrides: slurm/README.md. Example:
#   sbatch --nodes=2 slurm/pretrain_0p5b.sh train.steps=1000
#SBATCH --job-name=dtrain-0p5b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
export DTRAIN_CONFIG=${DTRAIN_CONFIG:-configs/0p5b_diffumamba.yaml}
# sbatch runs a copy of this file: find the checkout from the path that was submitted.
if [ -z "${DTRAIN_HOME:-}" ]; then
  script=$(scontrol show job "${SLURM_JOB_ID:?submit this script with sbatch}" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
  DTRAIN_HOME=$(cd "$(dirname "$script")/.." && pwd)
fi
export DTRAIN_HOME
exec bash "$DTRAIN_HOME/slurm/common.sh" "$@"
