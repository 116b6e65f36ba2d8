"""`dtrain params` and `dtrain sample`: commands about a model rather than a training run."""
from __future__ import annotations

import argparse


def cmd_params(args: argparse.Namespace) -> int:
    import torch

    from model.lm import DiffusionLM, count_parameters
    from model.presets import PRESETS, nominal_size

    print(f"{'preset':<20} {'family':<13} {'pattern':<26} {'d_model':>7} {'total':>10} {'no-embed':>10} {'vs name':>8}")
    for name, cfg in PRESETS.items():
        if args.preset and name not in args.preset:
            continue
        with torch.device("meta"):  # count without allocating
            model = DiffusionLM(cfg)
        total, body = count_parameters(model), count_parameters(model, include_embedding=False)
        nominal = nominal_size(name)
        vs = f"{(total / nominal - 1) * 100:+.1f}%" if nominal else "-"
        pattern = cfg.layer_pattern if len(cfg.layer_pattern) <= 26 else cfg.layer_pattern[:23] + "..."
        print(f"{name:<20} {cfg.family:<13} {pattern:<26} {cfg.d_model:>7} {total / 1e6:>9.2f}M "
              f"{body / 1e6:>9.2f}M {vs:>8}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from checkpoints_tools.pretrained import TOKENIZER_FILE, load_pretrained
    from model.sampler import sample

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_pretrained(args.model, device=device)
    tok_path = Path(args.tokenizer) if args.tokenizer else Path(args.model) / TOKENIZER_FILE
    tokenizer = None
    if tok_path.is_file():
        from data_pipeline.tokenizer import Tokenizer
        tokenizer = Tokenizer.load(tok_path)
    elif args.prompt:
        raise SystemExit(f"--prompt needs a tokenizer: {tok_path} not found (pass --tokenizer)")
    prefix = torch.tensor(tokenizer.encode(args.prompt)) if args.prompt else None
    ids = sample(model, batch_size=args.num, seq_len=args.length, steps=args.steps,
                 mask_id=model.cfg.mask_token_id, seed=args.seed, prefix=prefix, cuda_graphs=args.cuda_graphs)
    for i, row in enumerate(ids.tolist()):
        text = tokenizer.decode(row) if tokenizer else " ".join(map(str, row))
        print(f"--- sample {i} ---\n{text}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("params", help="parameter count of each preset (embedding included and excluded)")
    p.add_argument("--preset", nargs="*", help="only these presets")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("sample", help="generate text from an exported model folder")
    p.add_argument("--model", required=True, help="folder with config.json + model.safetensors")
    p.add_argument("--tokenizer", help="sentencepiece .model (default: the model folder's tokenizer.model)")
    p.add_argument("--prompt", default="", help="text to condition on (kept as a prefix)")
    p.add_argument("--num", type=int, default=2, help="number of samples")
    p.add_argument("--length", type=int, default=128, help="tokens per sample, prefix included")
    p.add_argument("--steps", type=int, default=128, help="denoising steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="on a GPU, replay the network from CUDA graphs: the same samples with far fewer kernel "
                        "launches (7x faster forwards at 1K tokens, docs/benchmarks.md); no effect on the CPU")
    p.set_defaults(func=cmd_sample)
