"""The DiffusionLM stack as a DeepSpeed PipelineModule: one LayerSpec per block.

    [Embedding] [Block 0] ... [Block n-1] [final norm] [output projection]

A pipeline layer takes the previous layer's output as its one argument: the blocks pass the pair
(hidden, residual) of model.blocks, except across a stage boundary (see PipeBlock).

With tied embeddings the first and the last layer are TiedLayerSpecs of the same key: each end stage holds
its own copy of the token embedding and DeepSpeed all-reduces the two gradients, so the copies stay equal.
The layers are the model's own modules (model.lm / model.blocks) and are initialised by copying a
DiffusionLM built with the run seed, so a pipelined run starts from exactly the weights of a plain one.
Inputs: the first stage reads input_ids; the last stage reads (input_ids, targets, t, loss_mask, scored_index)
as labels.

With train.cuda_graphs each stage's run of blocks replays CUDA graphs while training (enable_block_graphs,
model/train_graphs.StageGraphs); the embedding, final norm and head around them run eagerly.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from model.blocks import Block, make_norm
from model.config import ModelConfig
from model.diffusion import diffusion_loss_selected
from model.lm import DiffusionLM, Embedding, Head

TIED_KEY = "embed"


def unpack(stream) -> tuple:
    """The previous layer's output as (hidden, residual): the embedding gives hidden alone."""
    return stream if isinstance(stream, tuple) else (stream, None)


class PipeBlock(Block):
    """A block as a pipeline layer. DeepSpeed (0.19.8) runs one backward pass through the whole stage per
    tensor a stage sends, so the last block of a stage sends the residual stream as one fp32 tensor,
    hidden + residual (mark_stage_end); the next stage starts from it as block 0 does from the embedding."""
    ends_stage = False

    def forward(self, stream):
        hidden, residual = super().forward(*unpack(stream))
        return hidden + residual if self.ends_stage else (hidden, residual)


def mark_stage_end(pipe) -> None:
    """Let this stage's last layer send one tensor when it is a block (every stage but the last)."""
    last = pipe.forward_funcs[-1] if pipe.forward_funcs else None
    if isinstance(last, PipeBlock):
        last.ends_stage = True


class FinalNorm(nn.Module):
    """The head's add + norm as its own pipeline layer (the projection is the tied embedding)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = make_norm(cfg)

    def forward(self, stream) -> torch.Tensor:
        return self.norm(*unpack(stream))[0]


class PipeHead(Head):
    def forward(self, stream) -> torch.Tensor:
        return super().forward(*unpack(stream))


class TiedEmbedding(Embedding):
    """The token embedding at both ends: ids -> vectors on the first stage, vectors -> logits on the last.

    A module (not a forward_fn partial) so DeepSpeed saves and loads its weight on both end stages.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return F.linear(x, self.tok.weight)
        return super().forward(x)


def layer_specs(cfg: ModelConfig) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec
    blocks = [LayerSpec(PipeBlock, kind, cfg) for kind in cfg.layer_pattern]
    if cfg.tie_embeddings:
        return [TiedLayerSpec(TIED_KEY, TiedEmbedding, cfg, tied_weight_attr="tok.weight"), *blocks,
                LayerSpec(FinalNorm, cfg), TiedLayerSpec(TIED_KEY, TiedEmbedding, cfg, tied_weight_attr="tok.weight")]
    return [LayerSpec(Embedding, cfg), *blocks, LayerSpec(PipeHead, cfg)]


def model_prefix(layer_idx: int, cfg: ModelConfig) -> dict[str, str]:
    """Map a pipeline layer's parameter-name prefix to DiffusionLM's: {"": "blocks.3."} etc."""
    n = cfg.n_layers
    if layer_idx == 0:
        return {"": "embed."}
    if layer_idx <= n:
        return {"": f"blocks.{layer_idx - 1}."}
    if cfg.tie_embeddings:
        return {"norm.": "head.norm."} if layer_idx == n + 1 else {"": "embed."}
    return {"": "head."}


def pipeline_to_model_state(layer_states: dict[int, dict], cfg: ModelConfig) -> dict:
    """DiffusionLM state_dict from per-layer state dicts (e.g. the layer_XX-model_states.pt files)."""
    out = {}
    for idx, sd in layer_states.items():
        for (src, dst) in model_prefix(idx, cfg).items():
            for k, v in sd.items():
                if k.startswith(src):
                    out[dst + k[len(src):]] = v
    if cfg.tie_embeddings:
        out["head.proj.weight"] = out["embed.tok.weight"]
    return out


def nan_unless_finite(loss: torch.Tensor, force_nan: bool = False) -> torch.Tensor:
    """The loss, or NaN when it is not finite (or force_nan: fault injection). NaN gradients on every rank
    and stage make DeepSpeed's optimizer discard the whole step (see loop.py); no host sync."""
    nan = torch.full_like(loss, float("nan"))
    return loss * (nan if force_nan else torch.where(torch.isfinite(loss), torch.ones_like(loss), nan))


class PipeLoss:
    """loss_fn of the PipelineModule (runs on the last stage); keeps the per-sequence stats it saw."""

    def __init__(self, mask_id: int):
        self.mask_id = mask_id
        self.stats: list[dict] = []
        self.poison = False   # set by the trainer to turn this step's loss into NaN (fault injection)

    def __call__(self, logits: torch.Tensor, labels: tuple) -> torch.Tensor:
        input_ids, targets, t, loss_mask, scored = labels
        rows, cols = scored                # made on the host: no device sync to find the scored rows
        loss, stats = diffusion_loss_selected(logits[rows, cols], {"input_ids": input_ids, "targets": targets,
                                                                   "t": t, "loss_mask": loss_mask},
                                              self.mask_id, (rows, cols))
        self.stats.append(stats)
        return nan_unless_finite(loss, self.poison)


def checkpoint_keeping_autocast(function, *args):
    """The pipeline's activation checkpointing: torch's non-reentrant checkpoint, whose recomputation runs
    under the autocast state of the forward pass. DeepSpeed's default (deepspeed.checkpointing.checkpoint,
    0.19.8) recomputes outside autocast: in fp32 under bf16 training, several times slower on a GPU, and
    the gradients are not those of the bf16 forward."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


@functools.cache
def pipeline_module_class():
    """DeepSpeed's PipelineModule, whose forward can run the stage's blocks through CUDA graphs (made on
    first use: importing deepspeed.pipe is slow and only the trainer needs it)."""
    from deepspeed.pipe import PipelineModule

    class DiffusionPipe(PipelineModule):
        block_graphs = None   # StageGraphs over forward_funcs[block_range[0]:block_range[1]]
        block_range = (0, 0)

        def forward(self, forward_input):
            if self.block_graphs is None:
                return super().forward(forward_input)
            self.micro_offset += 1   # as DeepSpeed's forward (per-layer seeds are off)
            start, stop = self.block_range
            x = forward_input
            for layer in self.forward_funcs[:start]:
                x = layer(x)
            x = self.block_graphs(x)
            for layer in self.forward_funcs[stop:]:
                x = layer(x)
            return x

    return DiffusionPipe


def enable_block_graphs(pipe, autocast_dtype: torch.dtype | None, micro_batches: int):
    """Replay this stage's blocks from CUDA graphs while training (train.cuda_graphs). The gradient sums go
    to the parameters at each step's last backward: backwards run in the forwards' order, so that is the
    backward of every micro_batches-th forward. Up to min(stages from here to the last, micro_batches)
    micro-batches are in flight here (1F1B), each in its own graph slot. None when the stage has no block."""
    from model.train_graphs import StageGraphs, every_nth_call
    at = [i for i, f in enumerate(pipe.forward_funcs) if isinstance(f, PipeBlock)]
    if not at:
        return None
    if at != list(range(at[0], at[-1] + 1)):
        raise ValueError(f"train.cuda_graphs: the blocks of pipeline stage {pipe.stage_id} are not consecutive")
    pipe.block_range = (at[0], at[-1] + 1)
    pipe.block_graphs = StageGraphs(pipe.forward_funcs[at[0]:at[-1] + 1], autocast_dtype,
                                    every_nth_call(micro_batches),
                                    max_slots=min(pipe.num_stages - pipe.stage_id, micro_batches))
    return pipe.block_graphs


def build_pipeline_module(cfg: ModelConfig, *, num_stages: int, partition_method: str, seed: int,
                          activation_checkpointing: bool, loss_fn: PipeLoss):
    pipe = pipeline_module_class()(layers=layer_specs(cfg), num_stages=num_stages, loss_fn=loss_fn,
                                   partition_method=partition_method,
                                   activation_checkpoint_interval=1 if activation_checkpointing else 0,
                                   activation_checkpoint_func=checkpoint_keeping_autocast,
                                   checkpointable_layers=["PipeBlock"])
    mark_stage_end(pipe)
    # start from the weights a single-process DiffusionLM gets with this seed
    torch.manual_seed(seed)
    reference = DiffusionLM(cfg).state_dict()
    for idx in range(pipe._local_start, pipe._local_stop):
        spec = pipe._layer_specs[idx]
        module = pipe.tied_modules[spec.key] if hasattr(spec, "key") else getattr(pipe, str(idx))
        want = {}
        for src, dst in model_prefix(idx, cfg).items():
            want.update({src + k[len(dst):]: v for k, v in reference.items() if k.startswith(dst)})
        module.load_state_dict({k: want[k] for k in module.state_dict()}, strict=True)
    return pipe
