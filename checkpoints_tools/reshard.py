"""`dckpt reshard`: any checkpoint (DP with ZeRO 1/2/3, or pipeline + ZeRO-1) -> a universal checkpoint.

DeepSpeed's `ds_to_universal` does the conversion: it cuts the ZeRO partitions into one folder per
parameter, zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt, which DeepSpeed re-partitions for whatever layout
loads it (`"checkpoint": {"load_universal": true}`, which the trainer sets by itself when --resume names
a universal checkpoint). The parameter layout it needs (nothing tensor-parallel; the tied embedding is
replicated on the first and last pipeline stages) is the trainer's declaration
(dtrain.checkpoint.universal_checkpoint_info), applied here too, so checkpoints saved before the model
declared it convert the same way.

What this adds around it:
  * parameter names: a data-parallel run names them like DiffusionLM (blocks.0.mixer...), a pipeline run
    like its PipelineModule (1.mixer..., tied_modules.embed...; the same for any number of stages). The
    folders get the DiffusionLM names, and links with the pipeline names point at them, so both load.
  * the trainer's own state (step, tokens, data-loader state, RNG; trainer_rank*.pt), config.yaml and the
    tokenizer are carried over; COMPLETE records the source layout; checksums.json is written.
  * the data loader: its state depends on the data-parallel size. Resuming with the same size (and
    micro-batch, grad_accum) continues the sample stream exactly; with another size the run needs
    data.reshard_on_resume=true and continues at the next epoch boundary (the rest of the current epoch is
    skipped; masks keep following the step number).
  * the input is never modified; the output must not exist; it is built under a temporary name and
    renamed at the end.

Output: OUT/step########/ (the universal checkpoint) and OUT/latest, so `--resume OUT` works.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoints_tools.manifest import build_manifest
from checkpoints_tools.summary import (
    CONFIG,
    LATEST,
    MARKER,
    TOKENIZER,
    conversion_source,
    model_config,
    saved_layout,
    tokenizer_path,
)

MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


class ReshardError(RuntimeError):
    pass


# ------------------------------------------------------------------ parameter names
def pipeline_names(cfg) -> dict[str, str]:
    """{DiffusionLM parameter name: PipelineModule parameter name} (the same for any number of stages)."""
    from dtrain.pipeline import TIED_KEY, model_prefix
    from model.lm import DiffusionLM
    with torch.device("meta"):
        names = [n for n, _ in DiffusionLM(cfg).named_parameters()]
    out = {}
    n_layers = len(cfg.layer_pattern)
    last = n_layers + (2 if cfg.tie_embeddings else 1)
    for idx in range(last + 1):
        for src, dst in model_prefix(idx, cfg).items():
            pipe_prefix = f"tied_modules.{TIED_KEY}." if cfg.tie_embeddings and dst == "embed." else f"{idx}."
            for name in names:
                if name.startswith(dst):
                    out.setdefault(name, pipe_prefix + src + name[len(dst):])
    missing = sorted(set(names) - set(out))
    if missing:
        raise ReshardError(f"no pipeline name for {missing[:5]}")
    return out


def _universal_info(pipeline: bool, tied: bool) -> dict:
    from dtrain.checkpoint import universal_checkpoint_info
    return universal_checkpoint_info(pipeline, tied)


def _shadow_input(src: Path, work: Path, pipeline: bool, tied: bool) -> Path:
    """A folder of links to the input's files, with the model-state files (small) rewritten to carry the
    model's UNIVERSAL_CHECKPOINT_INFO: the input itself is never touched."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO
    shadow = work / "input" / src.name
    shadow.mkdir(parents=True)
    info = _universal_info(pipeline, tied)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name.endswith("_model_states.pt") and not f.name.startswith("layer_"):
            state = torch.load(f, map_location="cpu", weights_only=False)
            state[UNIVERSAL_CHECKPOINT_INFO] = {**(state.get(UNIVERSAL_CHECKPOINT_INFO) or {}), **info}
            torch.save(state, shadow / f.name)
        else:
            os.symlink(f.resolve(), shadow / f.name)
    return shadow


def _run_ds_to_universal(src: Path, dst: Path, workers: int) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    args = argparse.Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    ds_to_universal(args)


def _rename_and_alias(zero: Path, cfg, source_pipeline: bool) -> None:
    """zero/<DiffusionLM name>/ folders, plus a link for the other naming scheme."""
    to_pipe = pipeline_names(cfg)
    have = {p.name for p in zero.iterdir() if p.is_dir()}
    if source_pipeline:
        for model_name, pipe_name in tqdm(to_pipe.items(), desc="renaming", unit="param"):
            if pipe_name not in have:
                raise ReshardError(f"{zero}: no folder for parameter {pipe_name} ({model_name})")
            os.replace(zero / pipe_name, zero / model_name)
    missing = [n for n in to_pipe if not (zero / n / "fp32.pt").is_file()]
    if missing:
        raise ReshardError(f"{zero}: the conversion produced no weights for {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}")
    for model_name, pipe_name in to_pipe.items():
        if model_name != pipe_name:
            os.symlink(model_name, zero / pipe_name, target_is_directory=True)


def _param_files(zero: Path, cfg) -> None:
    """Every state file as {"param": tensor of the parameter's shape}, which all ZeRO stages load: from a
    ZeRO-3 source ds_to_universal writes bare flat tensors, which the ZeRO-1/2 loader cannot read."""
    from model.lm import DiffusionLM
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in DiffusionLM(cfg).named_parameters()}
    for name, shape in tqdm(shapes.items(), desc="checking", unit="param"):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            f = zero / name / f"{key}.pt"
            if not f.is_file():
                raise ReshardError(f"{f}: missing after the conversion")
            state = torch.load(f, map_location="cpu", weights_only=False)
            if not isinstance(state, dict):
                state = {"param": state.detach().reshape(shape).clone()}
                torch.save(state, f)
            if tuple(state["param"].shape) != tuple(shape):
                raise ReshardError(f"{f}: shape {tuple(state['param'].shape)}, the model's {name} is {tuple(shape)}")


def _optimizer_state(zero: Path) -> None:
    """zero/optimizer_state.pt in a form every ZeRO stage reads: ds_to_universal writes the ZeRO-1/2 loader's
    keys from a ZeRO-1/2 checkpoint and the ZeRO-3 loader's from a ZeRO-3 one (with a copy of rank 0's flat
    weights and moments, which the universal load never reads)."""
    import deepspeed
    from deepspeed.checkpoint import constants as c
    path = zero / "optimizer_state.pt"
    sd = torch.load(path, map_location="cpu", weights_only=False)
    groups = sd.get(c.PARAM_GROUPS) or sd[c.OPTIMIZER_STATE_DICT][c.PARAM_GROUPS]
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in groups]
    params = [d for d in zero.iterdir() if d.is_dir() and not d.is_symlink()]
    steps = {float(torch.load(d / "step.pt", weights_only=False)) for d in params if (d / "step.pt").is_file()}
    if not steps and c.OPTIMIZER_STATE_DICT in sd:   # a ZeRO-3 source: one step for all, per-parameter files
        steps = {float(sd[c.OPTIMIZER_STATE_DICT]["state"][0]["step"])}
        for d in params:
            torch.save(torch.tensor(steps.copy().pop()), d / "step.pt")
    if len(steps) != 1:
        raise ReshardError(f"{zero}: parameters disagree on the optimizer step: {sorted(steps)}")
    out = {k: sd[k] for k in ("loss_scaler", "dynamic_loss_scale", "overflow", c.CLIP_GRAD) if k in sd}
    out.update({c.DS_VERSION: sd.get(c.DS_VERSION, deepspeed.__version__), c.PARAM_GROUPS: groups,
                c.OPTIMIZER_STATE_DICT: {"state": {0: {"step": torch.tensor(steps.pop())}}, c.PARAM_GROUPS: groups}})
    torch.save(out, path)


def _model_state_files(out: Path) -> None:
    """Both names DeepSpeed looks for (mp_rank_* for ZeRO-1/2 and pipelines, zero_pp_rank_0_* for ZeRO-3):
    under load_universal only their metadata is read (step counters, client state), not the weights."""
    present = sorted(out.glob("*_model_states.pt"))
    if not present:
        raise ReshardError(f"{out}: the conversion copied no *_model_states.pt file")
    first = next((p for p in present if p.name == MODEL_STATES[0]), present[0])
    for name in MODEL_STATES:
        if not (out / name).exists():
            shutil.copyfile(first, out / name)


def reshard(src: str | Path, out: str | Path, workers: int = 1, tokenizer: str | Path | None = None) -> Path:
    """Convert checkpoint `src` into a universal checkpoint under the new folder `out`; returns its path."""
    src, out, marker = conversion_source(src, out, "reshard")
    if (src / "zero" / "optimizer_state.pt").is_file():
        raise ReshardError(f"{src}: already a universal checkpoint; it resumes under any layout as it is")
    layout = saved_layout(src, marker)
    pipeline = (layout.get("pipeline_stages") or 1) > 1
    tok_vocab = None
    if tokenizer is not None:
        from data_pipeline.tokenizer import Tokenizer
        t = Tokenizer.load(tokenizer)
        tok_vocab = (t.vocab_size, t.mask_id)
    cfg = model_config(src, *(tok_vocab or (None, None)))

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o777 & ~_umask())   # mkdtemp makes it private; the output gets the usual permissions
    try:
        dst = staging / src.name
        with tempfile.TemporaryDirectory(prefix=".dckpt-", dir=out.parent) as work:
            shadow = _shadow_input(src, Path(work), pipeline, cfg.tie_embeddings)
            _run_ds_to_universal(shadow, dst, workers)
        _rename_and_alias(dst / "zero", cfg, pipeline)
        _param_files(dst / "zero", cfg)
        _optimizer_state(dst / "zero")
        _model_state_files(dst)
        # the trainer's own state, the run config and the tokenizer
        for f in sorted(src.glob("trainer_rank*.pt")):
            shutil.copyfile(f, dst / f.name)
        shutil.copyfile(src / CONFIG, dst / CONFIG)
        tok = Path(tokenizer) if tokenizer else tokenizer_path(src)
        if tok is not None:
            shutil.copyfile(tok, dst / TOKENIZER)
        build_manifest(dst, progress=True)
        summary = {k: marker[k] for k in ("step", "tokens", "skipped_steps") if k in marker}
        (dst / MARKER).write_text(json.dumps({**summary, "universal": True, "source": str(src.resolve()),
                                              "source_layout": layout, "model": cfg.to_dict()}) + "\n")
        (staging / LATEST).write_text(src.name)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / src.name


def data_note(path: Path) -> str:
    """How the data stream resumes from this checkpoint, in words."""
    states = sorted(Path(path).glob("trainer_rank*.pt"))
    for f in states:
        ld = torch.load(f, map_location="cpu", weights_only=False).get("loader")
        if ld is not None:
            return (f"data loader: saved with dp_size={ld['dp_size']}, micro_batch_size={ld['micro_batch_size']}, "
                    f"grad_accum={ld['grad_accum']} in epoch {ld['epoch']}. Resuming with the same three continues "
                    f"the sample stream exactly; with any other, set data.reshard_on_resume=true: the stream "
                    f"continues at the start of epoch {ld['base_epoch'] + -(-ld['k'] // ld['batches_per_epoch'])}, "
                    f"skipping the "
                    f"rest of this one; masks keep following the step number.")
    return "data loader: no state saved (the resumed run starts its data stream from the beginning)"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
