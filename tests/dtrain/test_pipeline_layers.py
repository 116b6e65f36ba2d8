"""The pipeline's layers: the (hidden, residual) pair inside a stage, one tensor across a stage boundary."""
from types import SimpleNamespace

import torch

from dtrain.pipeline import FinalNorm, PipeBlock, TiedEmbedding, mark_stage_end
from model.lm import DiffusionLM
from model.presets import get_preset


def test_a_stage_sends_the_residual_stream_as_one_tensor():
    """DeepSpeed runs one backward pass through a stage per tensor it sends: the last block of a stage
    must send hidden + residual as one tensor, inner blocks keep the pair, the last stage marks nothing,
    and the stages compose to DiffusionLM's forward."""
    torch.manual_seed(0)
    cfg = get_preset("tiny-diffumamba-h")
    model = DiffusionLM(cfg)
    blocks = [PipeBlock(kind, cfg) for kind in cfg.layer_pattern]
    for block, original in zip(blocks, model.blocks):
        block.load_state_dict(original.state_dict())
    head_norm, tied = FinalNorm(cfg), TiedEmbedding(cfg)
    head_norm.norm.load_state_dict(model.head.norm.state_dict())
    tied.load_state_dict(model.embed.state_dict())

    first, last = SimpleNamespace(forward_funcs=[tied, *blocks[:2]]), SimpleNamespace(
        forward_funcs=[blocks[2], head_norm, tied])
    mark_stage_end(first)
    mark_stage_end(last)
    assert [b.ends_stage for b in blocks] == [False, True, False]

    ids = torch.randint(0, cfg.vocab_size - 1, (2, 24))
    out = ids
    for layer in first.forward_funcs:
        out = layer(out)
    assert isinstance(out, torch.Tensor)                     # what crosses the boundary: one tensor
    hidden, residual = model.blocks[1](*model.blocks[0](model.embed(ids)))
    torch.testing.assert_close(out, hidden + residual)
    for layer in last.forward_funcs:
        out = layer(out)
    torch.testing.assert_close(out, model(ids), rtol=1e-5, atol=1e-5)
