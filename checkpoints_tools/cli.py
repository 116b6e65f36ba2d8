"""`dckpt`: look at, convert, export and check training checkpoints.

    dckpt inspect CKPT [--json] [--all]          step, tokens, model, saved layout, files, data state
    dckpt reshard CKPT OUT                       -> universal checkpoint: resume under any DP/PP/ZeRO layout
    dckpt export CKPT OUT [--dtype bf16|fp32]    -> config.json + model.safetensors + tokenizer.model
    dckpt verify PATH [--quick]                  checksums / completeness; exit 1 naming the bad file

CKPT is a checkpoint folder (…/checkpoints/step00001000) or a checkpoint root (its latest complete one).
Inputs are never modified; an existing OUT is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _inspect(args) -> int:
    from checkpoints_tools.summary import describe, render
    info = describe(args.checkpoint)
    print(json.dumps(info, indent=2) if args.json else render(info, max_files=10 ** 9 if args.all else 40))
    return 0


def _reshard(args) -> int:
    from checkpoints_tools.reshard import data_note, reshard
    path = reshard(args.checkpoint, args.out, workers=args.workers, tokenizer=args.tokenizer)
    print(f"universal checkpoint written: {path}")
    print(data_note(path))
    print(f"resume with: dtrain train --config <run config for the new layout> --resume {args.out}")
    return 0


def _export(args) -> int:
    from checkpoints_tools.export import export
    out = export(args.checkpoint, args.out, dtype=args.dtype, tokenizer=args.tokenizer)
    print(f"model exported: {out} ({args.dtype}); load it with checkpoints_tools.pretrained.load_pretrained "
          f"or `dtrain sample --model {out}`")
    return 0


def _verify(args) -> int:
    from checkpoints_tools.verify import failed, verify
    results = verify(args.path, quick=args.quick, progress=sys.stderr.isatty())
    for folder, problems in results.items():
        bad = [p for p in problems if not p.startswith("note:")]
        for p in problems:
            print(p, file=sys.stderr if p in bad else sys.stdout)
        print(f"{'FAILED' if bad else 'OK'}: {folder}")
    return 1 if failed(results) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dckpt", description="Checkpoint tools: inspect, reshard, export, verify")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="what a checkpoint holds (no DeepSpeed needed)")
    p.add_argument("checkpoint", help="checkpoint folder or checkpoint root")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="list every file")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("reshard", help="convert to a universal checkpoint (resume on another DP/PP/ZeRO layout)")
    p.add_argument("checkpoint", help="checkpoint folder or checkpoint root")
    p.add_argument("out", help="new folder for the universal checkpoint (must not exist)")
    p.add_argument("--workers", type=int, default=1, help="processes for DeepSpeed's extract/merge passes")
    p.add_argument("--tokenizer", help="tokenizer .model, for checkpoints that hold none")
    p.set_defaults(func=_reshard)

    p = sub.add_parser("export", help="framework-free model folder: config.json, model.safetensors, tokenizer")
    p.add_argument("checkpoint", help="checkpoint folder or checkpoint root")
    p.add_argument("out", help="new folder for the model (must not exist)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weight dtype in model.safetensors")
    p.add_argument("--tokenizer", help="tokenizer .model, for checkpoints that hold none")
    p.set_defaults(func=_export)

    p = sub.add_parser("verify", help="checksums and completeness; exit 1 naming the bad file")
    p.add_argument("path", help="checkpoint folder, checkpoint root (all its checkpoints) or exported model")
    p.add_argument("--quick", action="store_true", help="sizes only, no sha256")
    p.set_defaults(func=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings
    os.environ.setdefault("DS_ACCELERATOR", "cpu")   # conversions run on the CPU; no accelerator warning
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, RuntimeError, ValueError) as e:
        print(f"dckpt {args.command}: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
