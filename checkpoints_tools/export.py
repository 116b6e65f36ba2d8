"""`dckpt export`: a checkpoint -> a framework-free model folder (config.json, model.safetensors, tokenizer).

The weights are gathered to one fp32 DiffusionLM state dict (dtrain.checkpoint.consolidated_model_state:
ZeRO 1/2/3, pipeline, or universal), optionally cast to bf16, and written with
checkpoints_tools.pretrained.save_pretrained. Loading needs neither DeepSpeed nor the run config:

    from checkpoints_tools.pretrained import load_pretrained
    model, meta = load_pretrained("exports/240m-step10000")          # DiffusionLM in eval mode
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from checkpoints_tools.manifest import build_manifest
from checkpoints_tools.pretrained import save_pretrained
from checkpoints_tools.summary import conversion_source, model_config, tokenizer_path

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export(src: str | Path, out: str | Path, dtype: str = "fp32", tokenizer: str | Path | None = None) -> Path:
    """Write the model folder `out` (must not exist) from checkpoint `src`; returns `out`."""
    from dtrain.checkpoint import consolidated_model_state
    from model.lm import DiffusionLM
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    src, out, marker = conversion_source(src, out, "export")
    tok = Path(tokenizer) if tokenizer else tokenizer_path(src)
    vocab = (None, None)
    if tok is not None and "model" not in marker:
        from data_pipeline.tokenizer import Tokenizer
        t = Tokenizer.load(tok)
        vocab = (t.vocab_size, t.mask_id)
    cfg = model_config(src, *vocab)
    state = consolidated_model_state(src, cfg)
    model = DiffusionLM(cfg)
    model.load_state_dict(state, strict=True)
    extra = {"source": {"checkpoint": str(src.resolve()), "step": marker.get("step"), "tokens": marker.get("tokens")},
             "dtype": dtype}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o777 & ~_umask())   # mkdtemp makes it private; the output gets the usual permissions
    try:
        save_pretrained(model, staging, tokenizer_path=tok, dtype=DTYPES[dtype], extra=extra)
        build_manifest(staging)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
