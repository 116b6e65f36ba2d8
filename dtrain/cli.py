"""`dtrain`: the project's command line; one subcommand per job, each a function in its module.

    dtrain train --config configs/x.yaml [key=value ...] [--resume auto|PATH]
    dtrain eval --checkpoint RUN/checkpoints
    dtrain params                    parameter counts of the presets
    dtrain sample --model EXPORT     samples from an exported model
    dtrain submit --config ... --nodes N --gpus-per-node G    submitit launcher (Slurm or local)
"""
from __future__ import annotations

import argparse
import json
import sys


def _train(args) -> int:
    from dtrain.config import load_config
    from dtrain.loop import train
    from dtrain.step_flags import TrainingStopped
    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, resume=args.resume)
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr, flush=True)
        return 2
    return 0 if result["status"] in ("finished", "preempted") else 1


def _eval(args) -> int:
    import torch.distributed as dist

    from dtrain.loop import evaluate_checkpoint
    result = evaluate_checkpoint(args.checkpoint, args.overrides)
    if dist.get_rank() == 0:
        print(json.dumps(result, indent=2), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtrain", description="Masked-diffusion LM pretraining (DeepSpeed)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain from a YAML run config (launch with torchrun/deepspeed/srun)")
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny_cpu.yaml")
    p.add_argument("--resume", default=None,
                   help="'auto': the latest complete checkpoint of the run (fresh start if none); or a "
                        "checkpoint folder (…/checkpoints/step00001000)")
    p.add_argument("overrides", nargs="*", help="dotted overrides: optim.lr=3e-4 model.d_model=256")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="ELBO perplexity bound of a checkpoint on the validation split")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a checkpoint root (uses latest)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the stored config: train.eval_iters=50")
    p.set_defaults(func=_eval)

    from dtrain.model_cmds import add_commands as add_model_commands
    add_model_commands(sub)  # params, sample

    from dtrain.submit import add_commands as add_submit_commands
    add_submit_commands(sub)  # submit (submitit)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    from model.config import ConfigError
    # DeepSpeed calls collectives torch has renamed; the warnings repeat every step and say nothing to users
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    # DeepSpeed broadcasts the pipeline's tied embedding at start-up outside no_grad; harmless (the tests
    # check that both copies train and stay equal), but torch warns in the first backward of every stage
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    return rc


def console_main() -> None:
    """The `dtrain` command. A rank whose work is done leaves through engine.exit_rank: without the
    interpreter's finalisation, where a native thread of torch.distributed / DeepSpeed now and then aborted
    a finished rank."""
    rc = main()
    if "torch.distributed" not in sys.modules:     # a command that never imported torch
        sys.exit(rc)
    from dtrain.engine import exit_rank
    exit_rank(rc)


if __name__ == "__main__":
    console_main()
