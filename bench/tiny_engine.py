"""The trainer's engine at the tiny CPU config, and masked micro-batches as the trainer hands them to
train_step: the start of every check that drives dtrain.loop.train_step directly (bench.zero_step_check,
the engine probes of tests/dtrain)."""
from __future__ import annotations

import itertools

import torch

from dtrain import engine as dengine
from dtrain.config import load_config
from dtrain.loop import to_device
from model.diffusion import mask_batch

VOCAB, MASK_ID, SEQ_LEN, MICRO_BATCH = 512, 511, 64, 2
CPU = torch.device("cpu")


def tiny_engine(*overrides: str, device: torch.device = CPU):
    """dtrain's engine (a Trainee) for configs/tiny_cpu.yaml at micro-batch 2 x 64 tokens, vocabulary 512."""
    cfg = load_config("configs/tiny_cpu.yaml", [f"data.seq_len={SEQ_LEN}", f"train.micro_batch_size={MICRO_BATCH}",
                                                 "train.global_batch_size=null", *overrides])
    return dengine.build(cfg, cfg.model_config(VOCAB, MASK_ID), device)


def masked_batches(global_batch_size: int, device: torch.device = CPU, generator: torch.Generator | None = None):
    """Three masked micro-batches of one set of random tokens (torch's global generator unless one is given),
    cycled; masked as sample positions 0 and 1 of a global batch of `global_batch_size`."""
    x0 = torch.randint(0, MASK_ID, (MICRO_BATCH, SEQ_LEN), generator=generator)
    return itertools.cycle([to_device(mask_batch(x0, seed=0, step=s, positions=torch.arange(MICRO_BATCH),
                                                 global_batch_size=global_batch_size, mask_id=MASK_ID),
                                      device, MASK_ID) for s in range(3)])
