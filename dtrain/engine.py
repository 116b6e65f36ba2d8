"""DeepSpeed wiring: process group, DeepSpeed config, and the engine for DP/ZeRO-k or PP + ZeRO-1.

The model code (model/) is the same in both modes: data parallelism wraps a DiffusionLM, pipeline
parallelism cuts the same modules into a PipelineModule (dtrain/pipeline.py).

Precision: "bf16" runs DeepSpeed's torch_autocast mode — parameters, master weights, gradients and their
accumulation stay fp32 and matmuls run in bf16. DeepSpeed's own "bf16" mode casts every parameter to bf16
(its data_types.keep_in_fp32_modules covers buffers only), which would run Mamba's A_log, D and dt_bias
in bf16; autocast keeps them fp32, as the Mamba authors require.
"""
from __future__ import annotations

import datetime
import functools
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from dtrain.config import RunConfig
from dtrain.optim import SSM_PARAM_NAMES, build_optimizer
from dtrain.zero_step import grad_norms_in_fp32, skip_on_device
from model.config import ConfigError, ModelConfig
from model.lm import DiffusionLM


@dataclass
class Trainee:
    """What the loop needs to know about the engine it drives."""
    engine: Any
    model_cfg: ModelConfig
    device: torch.device
    pipeline: bool
    dp_rank: int
    dp_size: int
    stage: int
    num_stages: int
    loss_fn: Any | None = None   # PipeLoss under pipeline parallelism

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def reads_data(self) -> bool:
        return self.is_first_stage or self.is_last_stage


def free_port() -> int:
    """A TCP port free on this host right now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(backend: str | None = None) -> torch.device:
    """Join (or, for a plain `python`/`dtrain` run, create) the process group; return this rank's device."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(os.environ.get("DTRAIN_DEEPSPEED_LOG_LEVEL", "WARNING"))  # the trainer logs progress itself
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:  # srun, one task per rank
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("launched by srun with several tasks but MASTER_ADDR is not set; export "
                               "MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)")
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    if "RANK" not in os.environ:  # not launched by torchrun / deepspeed / srun: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    cuda = torch.cuda.is_available()
    if not cuda:
        # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU on first use (~45 s on 2 cores).
        # It is an optional speed-up: build_shm_op() returning None is DeepSpeed's own "not available"
        # path, so gloo does all collectives. (A private name: revisit when upgrading DeepSpeed.)
        import importlib
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    backend = backend or ("nccl" if cuda else "gloo")
    if not torch.distributed.is_initialized():
        # Bounded collectives: a peer that vanishes without closing its sockets ends the job with an
        # error after DTRAIN_TIMEOUT seconds instead of hanging until the scheduler's time limit.
        timeout = datetime.timedelta(seconds=float(os.environ.get("DTRAIN_TIMEOUT", "1800")))
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def exit_rank(rc: int) -> None:
    """Leave the process with status rc. A rank in a process group ends it and leaves without the interpreter's
    finalisation: there, now and then, a native thread of torch.distributed / DeepSpeed aborted a finished
    rank ("terminate called without an active exception", SIGABRT), and torchrun then reported the whole
    run as failed. Call once the rank's work is done (checkpoints written, logs closed)."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        raise SystemExit(rc)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def check_batch(cfg: RunConfig, world_size: int) -> int:
    """Data-parallel size from the world and the pipeline depth; the global batch must add up."""
    t, p = cfg.train, cfg.parallel
    if world_size % p.pipeline_stages:
        raise ConfigError(f"parallel.pipeline_stages: {p.pipeline_stages} does not divide the world size "
                          f"{world_size}")
    dp = world_size // p.pipeline_stages
    got = t.micro_batch_size * t.grad_accum * dp
    if t.global_batch_size is not None and t.global_batch_size != got:
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} != train.micro_batch_size ({t.micro_batch_size}) "
            f"x train.grad_accum ({t.grad_accum}) x data-parallel size ({dp} = {world_size} ranks / "
            f"{p.pipeline_stages} pipeline stages) = {got}")
    return dp


def zero_tuning(p) -> dict:
    """The ZeRO communication settings the config sets (left out: DeepSpeed's defaults apply)."""
    return {k: getattr(p, k) for k in ("overlap_comm", "reduce_bucket_size", "contiguous_gradients")
            if getattr(p, k) is not None}


def deepspeed_config(cfg: RunConfig, dp_size: int, load_universal: bool = False) -> dict:
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage, **zero_tuning(cfg.parallel)},
        "data_types": {"grad_accum_dtype": "fp32"},
        "steps_per_print": 2 ** 31,   # the trainer logs itself
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer waits for the GPU at every micro-batch's forward and step() call;
        # the trainer measures tokens/s itself
        "timers": {"throughput": {"enabled": False}},
    }
    if t.precision == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if cfg.parallel.pipeline_stages > 1:
        ds["pipeline"] = {"activation_checkpoint_interval": int(t.activation_checkpointing)}
    if load_universal:   # resuming from a universal checkpoint (dckpt reshard): any saved layout
        ds["checkpoint"] = {"load_universal": True}
    return ds


def _checkpointed_forward(forward, *inputs):
    return torch.utils.checkpoint.checkpoint(forward, *inputs, use_reentrant=False)


def enable_activation_checkpointing(model: DiffusionLM) -> None:
    """Recompute each block's activations in the backward pass (parameter names unchanged)."""
    for block in model.blocks:
        block.forward = functools.partial(_checkpointed_forward, block.forward)


def build(cfg: RunConfig, model_cfg: ModelConfig, device: torch.device, load_universal: bool = False) -> Trainee:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    from dtrain.checkpoint import universal_checkpoint_info
    world = dist.get_world_size()
    dp_size = check_batch(cfg, world)
    ds_cfg = deepspeed_config(cfg, dp_size, load_universal)
    if cfg.parallel.pipeline_stages > 1:
        from dtrain.pipeline import PipeLoss, build_pipeline_module
        loss_fn = PipeLoss(model_cfg.mask_token_id)
        module = build_pipeline_module(model_cfg, num_stages=cfg.parallel.pipeline_stages,
                                       partition_method=cfg.parallel.partition_method, seed=cfg.run.seed,
                                       activation_checkpointing=cfg.train.activation_checkpointing,
                                       loss_fn=loss_fn)
    else:
        loss_fn = None
        torch.manual_seed(cfg.run.seed)
        module = DiffusionLM(model_cfg)
        if cfg.train.activation_checkpointing:
            enable_activation_checkpointing(module)
    # declare the parameter layout for universal checkpoints (saved with every checkpoint by DeepSpeed)
    setattr(module, UNIVERSAL_CHECKPOINT_INFO,
            universal_checkpoint_info(cfg.parallel.pipeline_stages > 1, model_cfg.tie_embeddings))
    optimizer = build_optimizer(module, cfg.optim, device.type)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_cfg)
    grad_norms_in_fp32(engine.optimizer)
    skip_on_device(engine.optimizer)   # the step never waits for the GPU (dtrain/zero_step.py)
    if cfg.train.cuda_graphs:   # after deepspeed.initialize: the graphs record where the parameters live now
        autocast_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
        if cfg.parallel.pipeline_stages > 1:
            from dtrain.pipeline import enable_block_graphs
            enable_block_graphs(module, autocast_dtype, engine.gradient_accumulation_steps())
        else:
            from model import train_graphs
            train_graphs.enable(module, autocast_dtype, graph_gradient_hand_over(engine, cfg.parallel.zero_stage))
    if cfg.parallel.pipeline_stages > 1:
        return Trainee(engine, model_cfg, device, True, engine.grid.data_parallel_id, dp_size, engine.stage_id,
                       engine.num_stages, loss_fn)
    return Trainee(engine, model_cfg, device, False, dist.get_rank(), dp_size, 0, 1)


def graph_gradient_hand_over(engine, zero_stage: int):
    """When the trunk's CUDA graphs hand their summed gradients to the parameters (model/train_graphs):
    at DeepSpeed's gradient-accumulation boundary, the only backward whose gradients ZeRO-1 reads (its
    hooks ignore the others); None, every backward, under ZeRO-2, which reduces each micro-batch's
    gradient as it arrives."""
    return engine.is_gradient_accumulation_boundary if zero_stage <= 1 else None


def fp32_param_report(module: nn.Module, names=SSM_PARAM_NAMES) -> dict[str, torch.dtype]:
    """dtypes of the parameters that must stay fp32 (for checks after deepspeed.initialize)."""
    return {n: p.dtype for n, p in module.named_parameters() if n.rsplit(".", 1)[-1] in names}
