"""Ancestral sampling for the absorbing-state diffusion (MDLM's `ddpm_cache` sampler).

From x_1 = all [MASK], step t -> s = t - 1/N along the log-linear schedule. For a masked position, the
reverse posterior under SUBS is
    q(x_s | x_t, x_0 ~ p_theta) = (t - s)/t * p_theta(x_0 | x_t)  +  s/t * [MASK]
and an unmasked position is copied unchanged. The denoiser takes no time input, so while no token
changes between two steps its prediction is reused (the cache) instead of running the network again.
A prefix, if given, is written into x_1 and, being unmasked, is carried through every step.

`sample(model, ...)` runs a module; `sample_with(logits_fn, device=..., ...)` runs any function
x_t (B, L) -> logits (B, L, V), e.g. one that drives a pipeline-parallel engine (dtrain/pipe_sampling.py).
Given the same logits and generator the two take exactly the same path.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from model.diffusion import subs_log_probs


def _gumbel_argmax(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sample index ~ weights (unnormalised, >= 0) along the last dim with the Gumbel-max trick (fp64)."""
    u = torch.rand(weights.shape, generator=generator, device=weights.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (weights.log() + gumbel).argmax(dim=-1)


@torch.no_grad()
def sample(model: torch.nn.Module, *, batch_size: int, seq_len: int, steps: int, mask_id: int,
           seed: int = 0, generator: torch.Generator | None = None, prefix: torch.Tensor | None = None,
           eps: float = 1e-5, return_stats: bool = False):
    """Generate `batch_size` sequences of `seq_len` tokens in `steps` denoising steps.

    prefix: LongTensor (P,) or (batch_size, P) of token ids kept fixed at the start of every sequence.
    Returns LongTensor (batch_size, seq_len) with no [MASK] left; with return_stats also a dict with the
    number of network evaluations (fewer than steps + 1 thanks to the cache).
    """
    return sample_with(model, device=next(model.parameters()).device, batch_size=batch_size, seq_len=seq_len,
                       steps=steps, mask_id=mask_id, seed=seed, generator=generator, prefix=prefix, eps=eps,
                       return_stats=return_stats)


@torch.no_grad()
def sample_with(logits_fn: Callable[[torch.Tensor], torch.Tensor], *, device: torch.device | str,
                batch_size: int, seq_len: int, steps: int, mask_id: int, seed: int = 0,
                generator: torch.Generator | None = None, prefix: torch.Tensor | None = None,
                eps: float = 1e-5, return_stats: bool = False):
    """`sample` with the network given as a function x_t (B, L) LongTensor -> logits (B, L, V) on `device`.

    Where several processes run it together (a pipeline), logits_fn must return the same logits on every
    one of them: with the same generator they then draw the same tokens and make the same cache decisions,
    so they call logits_fn the same number of times.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = torch.device(device)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.full((batch_size, seq_len), mask_id, dtype=torch.long, device=device)
    if prefix is not None:
        prefix = torch.as_tensor(prefix, dtype=torch.long, device=device)
        prefix = prefix.expand(batch_size, -1) if prefix.dim() == 1 else prefix
        if prefix.shape[1] > seq_len:
            raise ValueError(f"prefix of {prefix.shape[1]} tokens is longer than seq_len={seq_len}")
        x[:, : prefix.shape[1]] = prefix

    def denoise(x_t: torch.Tensor) -> torch.Tensor:
        return subs_log_probs(logits_fn(x_t), x_t, mask_id).double().exp()

    timesteps = torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)
    p_x0, evaluations = None, 0
    for i in range(steps):
        t, s = timesteps[i].item(), timesteps[i + 1].item()
        if p_x0 is None:
            p_x0, evaluations = denoise(x), evaluations + 1
        q_xs = p_x0 * (t - s)
        q_xs[..., mask_id] = s
        proposal = _gumbel_argmax(q_xs, generator)
        x_new = torch.where(x == mask_id, proposal, x)
        if not torch.equal(x_new, x):
            p_x0 = None  # the input changed: the cached prediction is stale
        x = x_new

    still_masked = x == mask_id
    if still_masked.any():  # final noise removal: the most likely token where a mask survived
        if p_x0 is None:
            p_x0, evaluations = denoise(x), evaluations + 1
        x = torch.where(still_masked, p_x0.argmax(-1), x)
    return (x, {"network_evaluations": evaluations}) if return_stats else x
