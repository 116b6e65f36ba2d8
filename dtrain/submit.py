"""`dtrain submit`: run `dtrain train` as a Slurm job from Python, through submitit.

    dtrain submit --config configs/1p3b_diffumamba.yaml --nodes 4 --gpus-per-node 8 train.steps=1000
    dtrain submit --config configs/tiny_cpu.yaml --cluster local --gpus-per-node 0 --nproc-per-node 2 --wait

One submitit task per rank. Each task sets the torch.distributed environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) from submitit's JobEnvironment and runs the trainer in a child process,
`python -m dtrain.cli train --config ... --resume auto ...`: the same trainer and flags as slurm/*.sh.

Timeout and preemption: Slurm sends submitit's signal (USR2) before the time limit. Each task passes it
on to its trainer as SIGUSR1 (the trainer checkpoints after the step that follows and exits); once the
trainer is done, rank 0 lets submitit requeue the job. The requeued job runs `checkpoint()`'s
DelayedSubmission, which resumes with --resume auto from the latest checkpoint.

Also used by slurm/common.sh: `python -m dtrain.submit keep-global-batch CONFIG WORLD [overrides]` prints
the train.grad_accum override that keeps the config's global batch on WORLD ranks; `python -m
dtrain.submit finished CONFIG [overrides]` exits 0 when the run's latest checkpoint is at train.steps.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

REPO = Path(__file__).resolve().parent.parent
# As in slurm/common.sh (see slurm/README.md): NCCL reports problems and aborts a collective that fails or
# times out instead of hanging; DTRAIN_TIMEOUT is the distributed timeout in seconds for the trainer.
LAUNCH_DEFAULTS = {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "DTRAIN_TIMEOUT": "600"}


# ------------------------------------------------------------------ global batch on any world size
def keep_global_batch(config: str, overrides: list[str], world: int) -> list[str]:
    """Overrides so that micro x grad_accum x data-parallel size equals the config's train.global_batch_size
    on `world` ranks: `train.grad_accum=K`, or, on more ranks than the configured micro-batches fill,
    smaller micro-batches one per step (`train.micro_batch_size=M train.grad_accum=1`, unless the overrides
    set the micro-batch). Empty when the config has no global batch, when the overrides set
    train.grad_accum themselves, or when it already fits. ConfigError when nothing fits."""
    from dtrain.config import load_config
    from model.config import ConfigError

    cfg = load_config(config, overrides)        # also validates the config: fail before any node starts
    t, stages = cfg.train, cfg.parallel.pipeline_stages
    if t.global_batch_size is None or any(o.startswith("train.grad_accum=") for o in overrides):
        return []
    if world % stages:
        raise ConfigError(f"parallel.pipeline_stages: {stages} does not divide the {world} ranks")
    dp = world // stages
    per_rank, uneven = divmod(t.global_batch_size, dp)
    if not uneven and per_rank % t.micro_batch_size == 0:
        accum = per_rank // t.micro_batch_size
        return [] if accum == t.grad_accum else [f"train.grad_accum={accum}"]
    micro_given = any(o.startswith("train.micro_batch_size=") for o in overrides)
    if not uneven and per_rank < t.micro_batch_size and not micro_given:
        return [f"train.micro_batch_size={per_rank}", "train.grad_accum=1"]
    raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
                      f"micro_batch_size {t.micro_batch_size} x {dp} data-parallel ranks")


def _keep_global_batch_main(argv: list[str]) -> int:
    from model.config import ConfigError
    config, world, overrides = argv[0], int(argv[1]), argv[2:]
    try:
        print(" ".join(keep_global_batch(config, overrides, world)))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------ has the run reached its last step?
def training_finished(config: str, overrides: list[str]) -> bool:
    """True when the run's latest complete checkpoint is at train.steps (nothing left to resume)."""
    from dtrain import checkpoint as ckpt
    from dtrain.config import load_config

    cfg = load_config(config, overrides)
    latest = ckpt.resolve("auto", Path(cfg.checkpoint_dir))
    step = re.search(r"(\d+)$", latest.name) if latest is not None else None
    return step is not None and int(step.group(1)) >= cfg.train.steps


# ------------------------------------------------------------------ the task run on every rank
def _port_for(job_id: str) -> int:
    """A port per job (jobs sharing a node do not collide), 20000-39999."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 20000


class TrainTask(submitit.helpers.Checkpointable):
    """The submitted callable: one instance per job, run once per task (= rank)."""

    def __init__(self, config: str, overrides: list[str], workdir: str, python: str = sys.executable):
        self.config, self.overrides, self.workdir, self.python = config, list(overrides), workdir, python

    def command(self) -> list[str]:
        return [self.python, "-m", "dtrain.cli", "train", "--config", self.config, "--resume", "auto",
                *self.overrides]

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        child_env = {
            **os.environ,
            "RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks),
            "LOCAL_RANK": str(env.local_rank), "LOCAL_WORLD_SIZE": str(env.num_tasks // env.num_nodes),
            "GROUP_RANK": str(env.node),
            "MASTER_ADDR": os.environ.get("DTRAIN_MASTER_ADDR", env.hostnames[0]),
            "MASTER_PORT": os.environ.get("DTRAIN_MASTER_PORT", str(_port_for(env.job_id))),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        }
        for key, value in LAUNCH_DEFAULTS.items():
            child_env.setdefault(key, value)
        print(f"dtrain submit: {env}; rendezvous {child_env['MASTER_ADDR']}:{child_env['MASTER_PORT']}",
              flush=True)
        if env.global_rank == 0:
            print(f"dtrain submit: {' '.join(self.command())}", flush=True)
        # Slurm signals every process of the job: the trainer must not die of submitit's signal (USR2),
        # nor of a SIGUSR1 that comes before it has installed its handler. Started while both are
        # ignored here, the trainer inherits the ignores (and installs its own SIGUSR1 handler).
        preempt = submitit.JobEnvironment._usr_sig()
        submitit_handler = signal.signal(preempt, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        child = subprocess.Popen(self.command(), env=child_env, cwd=self.workdir)

        # Instead of submitit's handler: let the trainer checkpoint first. submitit's handler, called
        # below outside signal context, then calls checkpoint() on rank 0 and requeues the job.
        received: list[int] = []

        def on_preempt(signum, frame):
            received.append(signum)
            if child.poll() is None:
                child.send_signal(signal.SIGUSR1)

        signal.signal(preempt, on_preempt)
        while child.poll() is None:
            time.sleep(0.5)
        code = child.returncode
        if received and callable(submitit_handler):
            print(f"dtrain submit: rank {env.global_rank}: trainer exited {code} after "
                  f"{signal.Signals(received[0]).name}", flush=True)
            if code == 0 and training_finished(self.config, self.overrides):
                print("dtrain submit: the run is complete: not requeueing", flush=True)
                return code
            submitit_handler(received[0], None)   # rank 0: checkpoint() + requeue + exit; others: returns
            return code
        if code != 0:
            raise RuntimeError(f"rank {env.global_rank}: `dtrain train` exited with code {code}")
        return code

    def checkpoint(self, *args, **kwargs):
        """Called by submitit before requeueing: the next run resumes (--resume auto) from the latest
        complete checkpoint."""
        return submitit.helpers.DelayedSubmission(type(self)(self.config, self.overrides, self.workdir,
                                                             self.python))


# ------------------------------------------------------------------ submitting
def build_executor(args: argparse.Namespace, tasks_per_node: int):
    ex = submitit.AutoExecutor(folder=args.folder, cluster=args.cluster)
    params = {"name": args.job_name, "timeout_min": args.timeout_min, "nodes": args.nodes,
              "tasks_per_node": tasks_per_node, "cpus_per_task": args.cpus_per_task}
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cluster in (None, "slurm"):
        extra = dict(kv.split("=", 1) for kv in args.slurm_arg)
        params.update(
            slurm_signal_delay_s=args.signal_delay_s,
            slurm_additional_parameters={"requeue": True, **extra},
            # one rank failing ends the job: no survivor waits for a dead peer until the time limit
            slurm_srun_args=["--kill-on-bad-exit=1"],
            slurm_setup=list(args.setup),
        )
        if args.partition:
            params["slurm_partition"] = args.partition
    ex.update_parameters(**params)
    return ex


def cmd_submit(args: argparse.Namespace) -> int:
    from model.config import ConfigError

    config = str(Path(args.config).resolve())
    if not Path(config).is_file():
        print(f"dtrain submit: config file not found: {config}", file=sys.stderr)
        return 2
    tasks_per_node = args.nproc_per_node or args.gpus_per_node or 1
    overrides = list(args.overrides)
    try:
        overrides += keep_global_batch(config, overrides, args.nodes * tasks_per_node)
    except ConfigError as e:
        print(f"dtrain submit: config error: {e}", file=sys.stderr)
        return 2
    task = TrainTask(config, overrides, os.getcwd())
    ex = build_executor(args, tasks_per_node)
    job = ex.submit(task)
    print(f"dtrain submit: job {job.job_id} ({args.nodes} node(s) x {tasks_per_node} rank(s)); "
          f"logs in {job.paths.folder}", flush=True)
    if not args.wait:
        return 0
    try:
        codes = job.results()
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
        print(f"dtrain submit: job {job.job_id} failed: {e}", file=sys.stderr)
        return 1
    return max(int(c or 0) for c in codes)


def add_commands(sub) -> None:
    p = sub.add_parser("submit", help="submit `dtrain train` to Slurm (or run it locally) with submitit")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs to request per node (0: none)")
    p.add_argument("--nproc-per-node", type=int, help="ranks per node (default: --gpus-per-node, or 1)")
    p.add_argument("--cluster", choices=["slurm", "local", "debug"],
                   help="default: slurm when sbatch is on PATH, else local")
    p.add_argument("--timeout-min", type=int, default=24 * 60, help="job time limit in minutes")
    p.add_argument("--signal-delay-s", type=int, default=300,
                   help="seconds before the time limit at which the trainer is told to checkpoint")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per rank")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--job-name", default="dtrain", help="Slurm job name")
    p.add_argument("--folder", default="logs/submitit/%j", help="submitit folder (pickles, logs); %%j: job id")
    p.add_argument("--setup", action="append", default=[],
                   help="shell line run before the tasks start, e.g. 'source venv/bin/activate' (repeatable)")
    p.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. account=myproj, qos=high (repeatable)")
    p.add_argument("--wait", action="store_true", help="wait for the job and exit with its status")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, as for `dtrain train`")
    p.set_defaults(func=cmd_submit)


if __name__ == "__main__":
    if sys.argv[1:2] == ["keep-global-batch"]:
        sys.exit(_keep_global_batch_main(sys.argv[2:]))
    if sys.argv[1:2] == ["finished"]:   # exit status 0: the run has reached train.steps
        sys.exit(0 if training_finished(sys.argv[2], sys.argv[3:]) else 1)
    parser = argparse.ArgumentParser(prog="python -m dtrain.submit")
    add_commands(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args()
    sys.exit(parsed.func(parsed))
