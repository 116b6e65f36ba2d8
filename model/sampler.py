"""Ancestral sampling for the absorbing-state diffusion (MDLM's `ddpm_cache` sampler).

From x_1 = all [MASK], step t -> s = t - 1/N along the log-linear schedule. For a masked position, the
reverse posterior under SUBS is
    q(x_s | x_t, x_0 ~ p_theta) = (t - s)/t * p_theta(x_0 | x_t)  +  s/t * [MASK]
and an unmasked position is copied unchanged. The denoiser takes no time input, so while no token
changes between two steps its prediction is reused (the cache) instead of running the network again.
A prefix, if given, is written into x_1 and, being unmasked, is carried through every step.

Only masked positions are ever computed: the network's head runs at them alone (score_mask), the
cached prediction is their log p_theta (N_masked, V) in fp32, and the fp64 posterior is formed a block of
rows at a time, so memory stays near one set of logits also at 128K tokens.

`sample(model, ...)` runs a module; `sample_with(logits_fn, device=..., ...)` runs any function
(x_t (B, L), score_mask (B, L) bool) -> logits at the score_mask positions (N, V), e.g. one that drives a
pipeline-parallel engine (dtrain/pipe_sampling.py). Given the same logits and generator the two take
exactly the same path.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from model.diffusion import exclude_mask_logit

ROWS_PER_BLOCK = 4096   # posterior rows formed at once in fp64: 4096 x 32768 x 8 B = 1 GiB


def _gumbel_argmax(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sample index ~ weights (unnormalised, >= 0) along the last dim with the Gumbel-max trick (fp64)."""
    u = torch.rand(weights.shape, generator=generator, device=weights.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (weights.log() + gumbel).argmax(dim=-1)


def _subs_log_probs(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """log p_theta(x_0 | x_t) at masked positions under SUBS: softmax with no mass on [MASK]; fp32."""
    return torch.log_softmax(exclude_mask_logit(logits, mask_id), dim=-1)


def _draw(log_p0: torch.Tensor, t: float, s: float, mask_id: int, generator: torch.Generator) -> torch.Tensor:
    """One reverse step t -> s at the masked positions: token v with weight (t - s) p_theta(v), [MASK] with
    weight s (normalised by t). Rows are drawn a block at a time, in order."""
    out = []
    for block in log_p0.split(ROWS_PER_BLOCK):
        q = block.double().exp() * (t - s)
        q[:, mask_id] = s
        out.append(_gumbel_argmax(q, generator))
    return torch.cat(out) if out else log_p0.new_empty(0, dtype=torch.long)


@torch.no_grad()
def sample(model: torch.nn.Module, *, batch_size: int, seq_len: int, steps: int, mask_id: int,
           seed: int = 0, generator: torch.Generator | None = None, prefix: torch.Tensor | None = None,
           eps: float = 1e-5, return_stats: bool = False, cuda_graphs: bool = False):
    """Generate `batch_size` sequences of `seq_len` tokens in `steps` denoising steps.

    prefix: LongTensor (P,) or (batch_size, P) of token ids kept fixed at the start of every sequence.
    Returns LongTensor (batch_size, seq_len) with no [MASK] left; with return_stats also a dict with the
    number of network evaluations (fewer than steps + 1 thanks to the cache).
    cuda_graphs: on a GPU, replay the network's trunk from a CUDA graph (model/graphs.py): the same
    logits with far fewer kernel launches, for a DiffusionLM whose weights do not move meanwhile.
    """
    device = next(model.parameters()).device
    if cuda_graphs:
        from model.graphs import GraphedDenoiser
        model = GraphedDenoiser(model)
    return sample_with(lambda x_t, score_mask: model(x_t, score_mask=score_mask),
                       device=device, batch_size=batch_size, seq_len=seq_len,
                       steps=steps, mask_id=mask_id, seed=seed, generator=generator, prefix=prefix, eps=eps,
                       return_stats=return_stats)


@torch.no_grad()
def sample_with(logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, device: torch.device | str,
                batch_size: int, seq_len: int, steps: int, mask_id: int, seed: int = 0,
                generator: torch.Generator | None = None, prefix: torch.Tensor | None = None,
                eps: float = 1e-5, return_stats: bool = False):
    """`sample` with the network given as a function (x_t, score_mask) -> logits at the masked positions
    (N, V), in row-major order of score_mask, on `device`.

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

    timesteps = torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)
    log_p0, evaluations = None, 0     # log p_theta(x_0 | x) at the masked positions of x (the cache)
    for i in range(steps):
        t, s = timesteps[i].item(), timesteps[i + 1].item()
        masked = x == mask_id
        if not masked.any():
            break
        if log_p0 is None:
            log_p0, evaluations = _subs_log_probs(logits_fn(x, masked), mask_id), evaluations + 1
        proposal = _draw(log_p0, t, s, mask_id, generator)
        if (proposal != mask_id).any():   # some token was unmasked: the cached prediction is stale
            x = x.masked_scatter(masked, proposal)
            log_p0 = None

    masked = x == mask_id
    if masked.any():  # final noise removal: the most likely token where a mask survived
        if log_p0 is None:
            log_p0, evaluations = _subs_log_probs(logits_fn(x, masked), mask_id), evaluations + 1
        x = x.masked_scatter(masked, log_p0.argmax(-1))
    return (x, {"network_evaluations": evaluations}) if return_stats else x
