#!/bin/bash
# The multi-node launcher behind slurm/pretrain_*.sh (see slurm/README.md).
#
#   bash common.sh [override ...]    the batch part: pre-flight checks, one srun step with one task per
#                                    node, checkpoint-and-requeue on SIGUSR1 (sbatch --signal=B:USR1@T)
#   bash common.sh --node            the node part, run by srun on every node: one torchrun
#
# Settings come from the environment (all optional but DTRAIN_CONFIG); extra arguments are trainer
# overrides (key=value), as is DTRAIN_OVERRIDES.
set -euo pipefail

log() { echo "[dtrain-slurm $(date -u +%H:%M:%S) $(hostname)] $*"; }
die() { log "ERROR: $*" >&2; exit 1; }

: "${DTRAIN_HOME:=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PY=${DTRAIN_PYTHON:-python3}

activate() {
  # Site set-up (module load, venv or conda activation); eval'd on the batch host and on every node.
  if [ -n "${DTRAIN_ACTIVATE:-}" ]; then
    set +u; eval "$DTRAIN_ACTIVATE"; set -u
  fi
  command -v "$PY" >/dev/null || die "python '$PY' not found (set DTRAIN_PYTHON or DTRAIN_ACTIVATE)"
}

# A path as given, else relative to the working directory, else relative to the checkout.
abspath() {
  case $1 in
    /*) echo "$1" ;;
    *) if [ -e "$1" ]; then echo "$PWD/$1"; else echo "$DTRAIN_HOME/$1"; fi ;;
  esac
}

resolvable() { getent ahosts "$1" >/dev/null; }

# ---------------------------------------------------------------- node part (one per node, via srun)
node_main() {
  activate
  resolvable "$MASTER_ADDR" || die "master address $MASTER_ADDR does not resolve on this node"
  local nproc=$DTRAIN_NPROC_PER_NODE logdir
  logdir="$DTRAIN_JOB_LOG_DIR/restart${SLURM_RESTART_COUNT:-0}/$(hostname)"
  mkdir -p "$logdir"
  log "node $SLURM_NODEID/$SLURM_NNODES: $nproc processes, rendezvous at $MASTER_ADDR:$MASTER_PORT"
  # SIGUSR1 goes to every process of the step (checkpoint request). torchrun must not act on it:
  # ignored here, the ignore is inherited by torchrun and its workers, and the trainer installs its own
  # handler. The workers then checkpoint, exit 0, and torchrun exits 0 with them.
  trap '' USR1
  # shellcheck disable=SC2086  # DTRAIN_TORCHRUN_ARGS and DTRAIN_ENTRY are word lists
  exec "$PY" -m torch.distributed.run \
    --nnodes "$SLURM_NNODES" --nproc-per-node "$nproc" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id "$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}" \
    --rdzv-conf "join_timeout=${DTRAIN_RDZV_TIMEOUT:-600},read_timeout=${DTRAIN_STORE_TIMEOUT:-60}" \
    --max-restarts 0 --shutdown-timeout "${DTRAIN_SHUTDOWN_TIMEOUT:-120}" \
    --log-dir "$logdir" --tee 3 \
    ${DTRAIN_TORCHRUN_ARGS:-} \
    ${DTRAIN_ENTRY:--m dtrain.cli train} "$@"
}

# ---------------------------------------------------------------- batch part
on_usr1() {
  requeue=1
  if [ -z "$srun_pid" ]; then
    log "SIGUSR1 before the trainer started (is the --signal lead time longer than --time?)"
  else
    log "SIGUSR1: asking the trainer to checkpoint and stop"
  fi
  scancel --signal=USR1 "$SLURM_JOB_ID" || log "scancel --signal=USR1 failed"
}

batch_main() {
  [ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with sbatch (see slurm/README.md)"
  # SIGUSR1 on this shell (sbatch --signal=B:USR1@T, or `scancel --batch --signal=USR1 JOBID`): pass it
  # on to every process of the job's steps (the trainer checkpoints and exits), then requeue.
  # SIGTERM (time limit, scancel, preemption) reaches every process of the job from Slurm itself: only
  # wait for the trainer. No requeue then: a cancelled job must stay cancelled.
  requeue=0 terminated=0 srun_pid=
  trap on_usr1 USR1
  trap 'log "SIGTERM: Slurm is ending the job"; terminated=1' TERM
  activate
  local restart=${SLURM_RESTART_COUNT:-0}
  log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) start $restart on $SLURM_NNODES node(s): $SLURM_JOB_NODELIST"

  # ---- pre-flight: fail now, with the reason, rather than hang in a rendezvous ----
  [ -n "${DTRAIN_CONFIG:-}" ] || die "DTRAIN_CONFIG is not set"
  DTRAIN_CONFIG=$(abspath "$DTRAIN_CONFIG")
  [ -f "$DTRAIN_CONFIG" ] || die "config file not found: $DTRAIN_CONFIG"
  local overrides=()
  if [ -n "${DTRAIN_DATA:-}" ]; then
    DTRAIN_DATA=$(abspath "$DTRAIN_DATA")
    [ -e "$DTRAIN_DATA" ] || die "data path not found: $DTRAIN_DATA"
    overrides+=("data.path=$DTRAIN_DATA")
  fi
  if [ -n "${DTRAIN_OUTPUT:-}" ]; then
    case $DTRAIN_OUTPUT in /*) ;; *) DTRAIN_OUTPUT=$PWD/$DTRAIN_OUTPUT ;; esac
    mkdir -p "$DTRAIN_OUTPUT" || die "cannot create output directory $DTRAIN_OUTPUT"
    overrides+=("run.out_dir=$DTRAIN_OUTPUT")
  fi
  if [ -n "${DTRAIN_BACKEND:-}" ]; then overrides+=("parallel.backend=$DTRAIN_BACKEND"); fi
  # shellcheck disable=SC2206  # DTRAIN_OVERRIDES is a whitespace-separated list
  overrides+=(${DTRAIN_OVERRIDES:-} "$@")
  export PYTHONPATH="$DTRAIN_HOME${PYTHONPATH:+:$PYTHONPATH}"
  export DTRAIN_NPROC_PER_NODE=${DTRAIN_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
  local world=$((SLURM_NNODES * DTRAIN_NPROC_PER_NODE)) extra
  # Validates the config and overrides, and keeps the config's global batch on this many ranks by
  # choosing train.grad_accum (and on many ranks a smaller micro-batch), unless the overrides set it.
  extra=$("$PY" -m dtrain.submit keep-global-batch "$DTRAIN_CONFIG" "$world" "${overrides[@]}") ||
    die "the config does not fit $world ranks or does not validate (message above)"
  if [ -n "$extra" ]; then
    log "$world ranks: $extra keeps the config's global batch"
    # shellcheck disable=SC2206  # one or two KEY=VALUE words
    overrides+=($extra)
  fi

  MASTER_ADDR=${DTRAIN_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
  resolvable "$MASTER_ADDR" || die "master address $MASTER_ADDR does not resolve"
  # Per-job port: jobs sharing a node do not collide.
  MASTER_PORT=${DTRAIN_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  DTRAIN_JOB_LOG_DIR=${DTRAIN_LOG_DIR:-$PWD/logs}/$SLURM_JOB_NAME-$SLURM_JOB_ID
  mkdir -p "$DTRAIN_JOB_LOG_DIR"
  export MASTER_ADDR MASTER_PORT DTRAIN_HOME DTRAIN_JOB_LOG_DIR
  # Slurm >= 22.05: srun does not inherit sbatch's --cpus-per-task unless told so.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
  # NCCL: report problems, and abort a collective that times out (a dead peer) instead of waiting.
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export DTRAIN_TIMEOUT=${DTRAIN_TIMEOUT:-600}   # seconds: torch.distributed init / collectives

  local args=(--config "$DTRAIN_CONFIG" --resume auto "${overrides[@]}")
  {
    echo "restart=$restart nodes=$SLURM_JOB_NODELIST master=$MASTER_ADDR:$MASTER_PORT"
    echo "trainer: ${DTRAIN_ENTRY:--m dtrain.cli train} ${args[*]}"
    env | grep -E '^(DTRAIN_|SLURM_JOB|NCCL_|TORCH_|MASTER_)' | sort
  } > "$DTRAIN_JOB_LOG_DIR/launch-restart$restart.txt"
  log "trainer: ${args[*]}"
  log "logs: $DTRAIN_JOB_LOG_DIR"

  # ---- run: one task per node; any task failing ends the step (no survivor waits for a dead peer) ----
  local rc=0
  # shellcheck disable=SC2086  # DTRAIN_SRUN_ARGS is a word list
  srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --label ${DTRAIN_SRUN_ARGS:-} \
    bash "$DTRAIN_HOME/slurm/common.sh" --node "${args[@]}" &
  srun_pid=$!
  # `wait` returns early when a trapped signal arrives: wait again until srun itself has ended.
  while :; do
    wait "$srun_pid" && rc=0 || rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break
  done
  if [ "$rc" = 0 ]; then
    log "trainer step ended with exit code 0"
  else
    log "ERROR: trainer step failed (exit code $rc); the first 'srun: error:' line above names the node;" \
        "per-rank logs: $DTRAIN_JOB_LOG_DIR/restart$restart"
  fi

  if [ "$requeue" = 1 ] && [ "$terminated" = 0 ]; then
    # A signal that came while the trainer was still starting (before its handler) did not stop it.
    if [ "$rc" = 0 ] && "$PY" -m dtrain.submit finished "$DTRAIN_CONFIG" "${overrides[@]}"; then
      log "the run has reached train.steps: not requeueing"
      exit 0
    fi
    local max=${DTRAIN_MAX_REQUEUES:-100}
    [ "$restart" -lt "$max" ] || die "not requeueing: already restarted $restart times (DTRAIN_MAX_REQUEUES)"
    log "requeueing job $SLURM_JOB_ID: the next start resumes from the latest checkpoint"
    # Slurm kills this script as part of the requeue: nothing after this line runs.
    scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue failed (was the job submitted with --no-requeue?)"
    exit 0
  fi
  exit "$rc"
}

if [ "${1:-}" = --node ]; then
  shift
  node_main "$@"
else
  batch_main "$@"
fi
