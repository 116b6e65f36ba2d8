"""Text samples under pipeline parallelism: the ancestral sampler driven through a DeepSpeed PipelineEngine.

Every rank of every pipeline runs model.sampler.sample_with in lockstep. Each network evaluation is one
`eval_batch` of a single micro-batch (x_t to the first stage, the logits out of the last), so one call is
one forward of the sample batch whatever train.grad_accum is. The last stage of the first pipeline
(data-parallel index 0) then broadcasts its logits to every rank of the world: all ranks draw the same
tokens with the same generator and make the same cache decisions, so they call eval_batch — which starts
with a world-wide barrier — the same number of times, and the samples are exactly what the single-process
sampler gives from the same weights. The other pipelines hold the same weights and run the same forwards;
their logits are not used. The broadcast is B x L x V fp32 per network evaluation: meant for the few short
samples the trainer logs (logging.num_samples x data.seq_len), not for bulk generation.

The sample batch (logging.num_samples sequences) need not have the training micro-batch's shape: the
engine caches activation and gradient buffer shapes between stages, so they are reset on every rank
before sampling and again after it, and the next train_batch renegotiates the training shapes exactly as
the first one did. The module's train/eval mode and the last stage's loss accumulators are restored too.

Precision: eval_batch runs the forward as the engine does (under torch_autocast with precision bf16, as the
pipeline's evaluation does); the logits are broadcast in fp32, which holds bf16 logits exactly.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from model.sampler import sample_with


class PipelineLogits:
    """(x_t (B, L), score_mask) -> logits at score_mask (N, V) float32, identical on every rank; call it on
    all ranks together. The pipeline computes and broadcasts the logits of every position."""

    def __init__(self, engine, vocab_size: int, device: torch.device):
        self.engine, self.vocab_size, self.device = engine, vocab_size, torch.device(device)
        # the last stage of data-parallel pipeline 0 (same model coordinate as this rank, if any)
        self.src = engine.grid.stage_to_global(engine.num_stages - 1, data=0)

    def __call__(self, x_t: torch.Tensor, score_mask: torch.Tensor) -> torch.Tensor:
        engine = self.engine
        # The last stage adds every forward's output to engine.total_loss, which eval_batch does not reset;
        # with compute_loss=False that output is the logits, so it must start from None (see sampling_mode).
        engine.total_loss = None
        # one micro-batch: (inputs for the first stage, "labels" for the last; no loss is computed)
        _, logits = engine.eval_batch(iter([(x_t, x_t)]), return_logits=True, compute_loss=False,
                                      reduce_output=None, bcast_loss=False, num_micro_batches=1)
        engine.total_loss = None
        shape = (*x_t.shape, self.vocab_size)
        if dist.get_rank() == self.src:
            if not torch.is_tensor(logits) or tuple(logits.shape) != shape:
                got = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
                raise RuntimeError(f"pipeline sampling: the last stage returned {got}, expected logits {shape}")
            out = logits.detach().to(self.device, torch.float32).contiguous()   # exact for bf16/fp16 logits
        else:
            out = torch.empty(shape, dtype=torch.float32, device=self.device)
        dist.broadcast(out, src=self.src)
        return out[score_mask]


@contextmanager
def sampling_mode(engine):
    """Eval mode and fresh activation shapes for the sample batch; the training state back afterwards."""
    was_training = engine.module.training
    saved = {k: getattr(engine, k) for k in ("total_loss", "total_additional_losses")}   # the last stage's
    engine.reset_activation_shape()
    try:
        yield
    finally:
        engine.reset_activation_shape()   # the next train_batch/eval_batch sends its shapes again
        for k, v in saved.items():
            setattr(engine, k, v)
        engine.train(was_training)


@torch.no_grad()
def pipeline_sample(engine, *, vocab_size: int, device: torch.device, **kwargs) -> torch.Tensor:
    """model.sampler.sample through a PipelineEngine; run on all ranks. kwargs: those of sample_with
    (batch_size, seq_len, steps, mask_id, generator, ...). Returns the same (B, L) ids on every rank."""
    with sampling_mode(engine):
        return sample_with(PipelineLogits(engine, vocab_size, device), device=device, **kwargs)
