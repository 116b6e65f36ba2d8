"""The masked diffusion objective (MDLM, Sahoo et al. 2024) with an absorbing [MASK] state.

Forward process, log-linear schedule:
    alpha_t = 1 - t                      (probability a token is still clean at time t in (0, 1])
    q(x_t | x_0): each token independently becomes [MASK] with probability 1 - alpha_t = t.
SUBS parameterization of the denoiser p_theta(x_0 | x_t):
    zero mass on [MASK]; a token that is not masked in x_t is carried over unchanged.
Continuous-time negative ELBO per sequence (t ~ U(eps, 1)):
    NELBO = E_t [ alpha'_t / (1 - alpha_t) * sum_{i masked} log p_theta(x_0^i | x_t) ]
          = E_t [ 1/t * sum_{i masked} -log p_theta(x_0^i | x_t) ]
Training minimises it per token; exp(NELBO / tokens) on held-out data bounds the perplexity.

Masking is a pure function of (seed, step, position of the sample in the global batch), so any process
(a pipeline stage, a loader worker, a resumed run) regenerates exactly the same masked batch.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_EPS = 1e-3


# ---------------------------------------------------------------- noise schedule
def move_chance(t: torch.Tensor) -> torch.Tensor:
    """1 - alpha_t: probability that a token is [MASK] at time t (log-linear schedule)."""
    return t


def loss_weight(t: torch.Tensor) -> torch.Tensor:
    """-alpha'_t / (1 - alpha_t) = 1/t for the log-linear schedule."""
    return 1.0 / t


def antithetic_t(u: float | torch.Tensor, positions: torch.Tensor, n: int, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Stratified t over a batch of n: sample i gets t = eps + (1-eps) * ((u + i) / n mod 1).

    One shared uniform u per batch; each stratum [i/n, (i+1)/n) holds exactly one sample, so the batch
    covers (eps, 1] evenly and the variance of the loss estimate drops (MDLM's antithetic sampling).
    """
    frac = torch.remainder((torch.as_tensor(u, dtype=torch.float64) + positions.to(torch.float64)) / n, 1.0)
    return (eps + (1.0 - eps) * frac).to(torch.float32)


def mask_tokens(x0: torch.Tensor, t: torch.Tensor, uniforms: torch.Tensor, mask_id: int,
                maskable: torch.Tensor | None = None) -> torch.Tensor:
    """x_t from x_0: token i is replaced by [MASK] where uniforms[i] < t (per row). Pure."""
    masked = uniforms < t.to(uniforms.dtype).unsqueeze(-1)
    if maskable is not None:
        masked &= maskable.bool()
    return torch.where(masked, torch.full_like(x0, mask_id), x0)


# ---------------------------------------------------------------- deterministic randomness
def _seed_of(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy's SeedSequence hashing: stable across platforms)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


_T_STREAM, _MASK_STREAM = 0x7, 0x3  # keep the t-draw and the per-sample mask draws independent


def mask_batch(x0: torch.Tensor, *, seed: int, step: int, positions: torch.Tensor, global_batch_size: int,
               mask_id: int, eps: float = DEFAULT_EPS, loss_mask: torch.Tensor | None = None) -> dict:
    """Mask a (micro-)batch of clean sequences; a pure function of its arguments.

    positions[j]: the index of row j within the optimizer step's global batch (0 .. global_batch_size-1).
    The per-step uniform u comes from (seed, step) alone, so all ranks agree on the antithetic strata;
    the per-token uniforms of a row come from (seed, step, position), so a row is masked the same way
    whichever rank, worker or pipeline stage computes it, and whatever the data-parallel size.
    loss_mask marks real tokens (1) vs padding (0); padding is never masked and never scored.
    Returns the batch dict every component reads: input_ids (x_t), targets (x_0), t, loss_mask.
    """
    x0 = x0.long()
    B, L = x0.shape
    positions = torch.as_tensor(positions, dtype=torch.long)
    if positions.shape != (B,):
        raise ValueError(f"positions must have shape ({B},), got {tuple(positions.shape)}")
    if loss_mask is None:
        loss_mask = torch.ones(B, L, dtype=torch.float32)
    u = torch.rand((), generator=torch.Generator().manual_seed(_seed_of(_T_STREAM, seed, step)), dtype=torch.float64)
    t = antithetic_t(u, positions, global_batch_size, eps)
    uniforms = torch.empty(B, L, dtype=torch.float32)
    for j in range(B):
        g = torch.Generator().manual_seed(_seed_of(_MASK_STREAM, seed, step, int(positions[j])))
        uniforms[j] = torch.rand(L, generator=g)
    xt = mask_tokens(x0, t, uniforms, mask_id, maskable=loss_mask > 0)
    return {"input_ids": xt, "targets": x0, "t": t, "loss_mask": loss_mask.float()}


# ---------------------------------------------------------------- SUBS parameterization
def exclude_mask_logit(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """A copy of logits (..., V) in fp32 (fp64 stays fp64) with [MASK]'s logit at -inf: SUBS puts no mass
    on [MASK]. One full-size copy, changed in place."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
    x.select(-1, mask_id).fill_(float("-inf"))
    return x


def subs_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, mask_id: int) -> torch.Tensor:
    """log p_theta(x_0 | x_t) under SUBS: no mass on [MASK]; unmasked tokens carried over (log p = 0)."""
    logp = torch.log_softmax(exclude_mask_logit(logits, mask_id), dim=-1)
    unmasked = input_ids != mask_id
    if unmasked.any():
        carried = torch.full_like(logp, float("-inf"))
        carried.scatter_(-1, input_ids.unsqueeze(-1), 0.0)
        logp = torch.where(unmasked.unsqueeze(-1), carried, logp)
    return logp


def scored_positions(batch: dict, mask_id: int) -> torch.Tensor:
    """bool (B, L): the positions the NELBO scores, masked in x_t and real (loss_mask > 0).

    Under SUBS every other position carries its token over with log p = 0, so the output head is needed
    only here: pass this as `score_mask` to DiffusionLM.forward and the logits to diffusion_loss_selected.
    """
    return (batch["input_ids"] == mask_id) & (batch["loss_mask"] > 0)


def scored_index(batch: dict, mask_id: int) -> torch.Tensor:
    """(2, N) int64: the rows and columns of scored_positions, in row-major order. Any `score_mask` argument
    takes it in place of the bool mask. Made where the batch is made (the host), it lets the model and the
    loss pick the scored rows without waiting for the device: with a bool mask on the GPU, N is known only
    after a device-to-host copy, which stalls the host in the middle of every micro-batch."""
    return torch.stack(scored_positions(batch, mask_id).nonzero(as_tuple=True))


def rows_and_cols(score_mask: torch.Tensor | tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of a bool (B, L) score_mask's True entries (one device sync), or of a scored_index
    (2, N) / (rows, cols) pair as given."""
    if isinstance(score_mask, torch.Tensor) and score_mask.dtype == torch.bool:
        return score_mask.nonzero(as_tuple=True)
    rows, cols = score_mask
    return rows, cols


def subs_target_nll(logits: torch.Tensor, targets: torch.Tensor, mask_id: int) -> torch.Tensor:
    """-log p_theta(target | x_t) at masked positions under SUBS; logits (..., V), targets (...) -> (...).

    Cross-entropy over the vocabulary with [MASK] excluded (its logit set to -inf), which equals the SUBS
    log-probability of the target without materialising the carried-over distribution. Computed in fp32
    (fp64 logits stay fp64) on one full-precision copy of the logits, besides cross_entropy's own softmax.
    """
    x = exclude_mask_logit(logits, mask_id)
    nll = F.cross_entropy(x.reshape(-1, x.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape)


def _nelbo(nll: torch.Tensor, rows: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    """The loss from the nll of the scored tokens (N,) and their sequence ids rows (N,): the per-token
    NELBO sum_i 1/t * nll_i / number of real tokens, and the per-sequence stats. No scored token (N = 0)
    gives loss 0, still attached to the graph through nll."""
    t = batch["t"]
    weighted = nll * loss_weight(t.to(nll.dtype))[rows]
    per_seq = torch.zeros(t.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, weighted)
    tokens_per_seq = batch["loss_mask"].float().sum(-1)
    loss = per_seq.sum() / tokens_per_seq.sum().clamp_min(1.0)
    return loss, {"nelbo_per_seq": per_seq.detach(), "tokens_per_seq": tokens_per_seq.detach(),
                  "t": t.detach()}


def diffusion_loss_selected(logits: torch.Tensor, batch: dict, mask_id: int,
                            score_mask: torch.Tensor | tuple | None = None) -> tuple[torch.Tensor, dict]:
    """diffusion_loss from the logits of the scored positions only: logits (N, V) are the rows of
    scored_positions(batch, mask_id) (or of score_mask, that same mask or its scored_index, computed by the
    caller) in row-major order, as DiffusionLM.forward(input_ids, score_mask=...) returns them. Same
    (loss, stats) as diffusion_loss on the full (B, L, V) logits.
    """
    if score_mask is None:
        score_mask = scored_positions(batch, mask_id)
    rows, cols = rows_and_cols(score_mask)
    if logits.dim() != 2 or logits.shape[0] != rows.numel():
        raise ValueError(f"expected logits of the {rows.numel()} scored positions, (N, V); got {tuple(logits.shape)}")
    return _nelbo(subs_target_nll(logits, batch["targets"][rows, cols], mask_id), rows, batch)


def diffusion_loss(logits: torch.Tensor, batch: dict, mask_id: int) -> tuple[torch.Tensor, dict]:
    """Training loss from full logits (B, L, V): the per-token NELBO, sum_i 1/t * nll_i over masked tokens
    / number of real tokens.

    Returns (loss, stats) where stats holds per-sequence NELBO sums (B,), token counts (B,) and t (B,),
    detached, for logging loss by t bucket and for the ELBO perplexity bound. Only the scored rows of the
    logits are used; a caller that can skip the head elsewhere should use diffusion_loss_selected.
    """
    score_mask = scored_positions(batch, mask_id)
    return diffusion_loss_selected(logits[score_mask], batch, mask_id, score_mask)


def masked_token_nll(logits: torch.Tensor, batch: dict, mask_id: int) -> torch.Tensor:
    """-log p_theta(x_0^i | x_t) at scored (masked, real) positions, 0 elsewhere; (B, L, V) -> (B, L)."""
    score_mask = scored_positions(batch, mask_id)
    nll = subs_target_nll(logits[score_mask], batch["targets"][score_mask], mask_id)
    return torch.zeros(score_mask.shape, dtype=nll.dtype, device=nll.device).masked_scatter(score_mask, nll)


def elbo_perplexity(total_nelbo: float, total_tokens: float) -> float:
    """Perplexity upper bound exp(NELBO per token) from sums accumulated over a validation set."""
    return float(np.exp(total_nelbo / max(total_tokens, 1.0)))
