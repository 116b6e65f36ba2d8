"""DiffusionLM: embed -> blocks (from the layer pattern) -> norm -> head.

The network maps a partly masked sequence x_t to logits over the clean tokens x_0 at every position, or,
given a score_mask, only at the selected positions (training: SUBS scores masked positions only, so the
head, the largest matmul at a 32k vocabulary, runs on about half the tokens).
It knows nothing of how it is trained or sharded; `pipeline_layers()` exposes the same modules as a
flat list of stages so a pipeline-parallel engine can partition them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from model.blocks import Block, make_norm
from model.config import ModelConfig
from model.diffusion import diffusion_loss_selected, rows_and_cols, scored_positions


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok(input_ids)


class Head(nn.Module):
    """Final add + norm (of the last block's (hidden, residual) pair) and projection to the vocabulary;
    `weight` may be the embedding's (tied)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = make_norm(cfg)
        self.proj = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None,
                score_mask: torch.Tensor | tuple | None = None) -> torch.Tensor:
        """(B, L, d) -> logits (B, L, V); with score_mask (bool (B, L), or the (2, N) scored_index of its
        True entries) only the selected positions -> (N, V), in row-major order of the True entries. Norm
        and projection act position by position, so these are exactly the selected rows of the full
        logits."""
        if score_mask is not None:
            is_mask = isinstance(score_mask, torch.Tensor) and score_mask.dtype == torch.bool
            if (score_mask.shape != hidden.shape[:-1]) if is_mask else len(score_mask) != 2:
                raise ValueError(f"score_mask must be a bool tensor of shape {tuple(hidden.shape[:-1])} or "
                                 f"its (rows, cols) index pair, got {type(score_mask).__name__} "
                                 f"{tuple(getattr(score_mask, 'shape', ()))}")
            index = rows_and_cols(score_mask)              # one device sync for a mask, none for an index
            hidden = hidden[index]
            residual = None if residual is None else residual[index]
        return self.proj(self.norm(hidden, residual)[0])


class DiffusionLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(kind, cfg) for kind in cfg.layer_pattern)
        self.head = Head(cfg)
        if cfg.tie_embeddings:
            self.head.proj.weight = self.embed.tok.weight
        self.trunk_graphs = None    # model/train_graphs.TrainingGraphs once enabled
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, std) for linears and embeddings, output projections of each residual
        branch scaled by 1/sqrt(2 * n_layers); Mamba's own parameters (A_log, D, dt_bias, conv) keep the
        initialisation their module gave them."""
        std = self.cfg.init_std
        nn.init.normal_(self.embed.tok.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.head.proj.weight, std=std)
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for block in self.blocks:
            for name, p in block.named_parameters():
                if p.dim() != 2 or "norm" in name:
                    continue
                is_residual_out = name.endswith(("out_proj.weight", "fc_out.weight"))
                nn.init.normal_(p, std=residual_std if is_residual_out else std)

    def forward(self, input_ids: torch.Tensor, score_mask: torch.Tensor | tuple | None = None) -> torch.Tensor:
        """Logits (B, L, V) at every position; with score_mask (bool (B, L), or its (2, N) index pair) only at
        its True positions, (N, V) in row-major order. Training passes the batch's scored_index (made on
        the host, model.diffusion.scored_index) and takes the loss from diffusion_loss_selected."""
        return self.head(*self.trunk(input_ids), score_mask)

    def trunk(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embedding and blocks: the last block's (hidden, residual) pair, which the head takes. While
        training on a GPU with model/train_graphs.enable(model), replayed from CUDA graphs."""
        if self.trunk_graphs is not None:
            return self.trunk_graphs(input_ids)
        return self.eager_trunk(input_ids)

    def eager_trunk(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, residual = self.embed(input_ids), None
        for block in self.blocks:
            hidden, residual = block(hidden, residual)
        return hidden, residual

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """diffusion_loss of this batch, with the head run at the scored (masked) positions only."""
        mask_id = self.cfg.mask_token_id
        score_mask = batch.get("scored_index")
        score_mask = scored_positions(batch, mask_id) if score_mask is None else score_mask
        return diffusion_loss_selected(self(batch["input_ids"], score_mask), batch, mask_id, score_mask)

    def pipeline_layers(self) -> list[nn.Module]:
        """The stack as a flat list [embed, block_0, ..., block_{n-1}, head] (same module objects). Each
        block returns the pair (hidden, residual), which the next block or the head takes as its inputs."""
        return [self.embed, *self.blocks, self.head]


def count_parameters(model: nn.Module, include_embedding: bool = True) -> int:
    """Unique parameters (a tied embedding counted once); without the token embedding / output head."""
    seen, total = set(), 0
    for name, p in model.named_parameters():  # named_parameters already dedupes tied tensors
        if id(p) in seen:
            continue
        seen.add(id(p))
        if not include_embedding and (name.startswith("embed.") or name == "head.proj.weight"):
            continue
        total += p.numel()
    return total
