"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning-rate schedule.

Weight decay applies to matrices (linears, convolutions, the embedding); norms, biases and Mamba's A_log,
D and dt_bias get none (decaying those would pull the SSM's decay rates and skip term towards zero).
The learning rate is set by the trainer each step (`lr_at`), so a skipped step never shifts the schedule.
A torch optimizer is handed to DeepSpeed so that nothing is JIT-compiled (DeepSpeed's own fused/CPU Adam);
torch's fused AdamW, on the GPU and the CPU alike, so that a bad step is skipped on the device.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dtrain.config import OptimSection

# parameter names (last component) that stay fp32 and get no weight decay
SSM_PARAM_NAMES = ("A_log", "D", "dt_bias")


def no_decay(name: str, p: torch.Tensor) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return p.dim() < 2 or leaf in SSM_PARAM_NAMES or leaf == "bias" or "norm" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": plain, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimSection, device_type: str) -> torch.optim.Optimizer:
    # fused (the default): its found_inf lets a bad step be skipped on the device (dtrain/zero_step.py)
    fused = cfg.fused is not False
    kwargs = {"fused": True} if fused else {"foreach": device_type != "cpu"}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, **kwargs)


def lr_at(step: int, cfg: OptimSection, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to lr, then decay to min_lr."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.schedule == "linear":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1.0 - progress)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
