"""model/flops.py against torch's FlopCounterMode on real forward passes (matmul-class ops only)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import flops
from model.blocks import Block
from model.config import MambaConfig, ModelConfig
from model.lm import DiffusionLM

L = 64
CFG = ModelConfig(vocab_size=100, mask_token_id=99, d_model=64, layer_pattern="MA", n_heads=4,
                  mamba=MambaConfig(d_state=16, headdim=16, chunk_size=16))


def counted_per_token(module, x) -> float:
    with FlopCounterMode(display=False) as fc:
        module(x)
    return fc.get_total_flops() / x.shape[0] / x.shape[1]


def test_attention_block_and_mlp_exact():
    d = CFG.d_model
    got = counted_per_token(Block("A", CFG), torch.randn(2, L, d))
    # the CPU attention kernel is not seen by the counter: add QK^T and AV (2*L*d each) by hand
    assert flops.block_flops("A", CFG, L) == got + 4 * L * d


def test_mamba_block_close_to_counted():
    got = counted_per_token(Block("M", CFG), torch.randn(2, L, CFG.d_model))
    # the reference chunked scan also does the (small) inter-chunk state passing as matmuls
    assert flops.block_flops("M", CFG, L) == pytest.approx(got, rel=0.05)


def test_whole_model_and_training_factor():
    ids = torch.randint(0, 99, (2, L))
    got = counted_per_token(DiffusionLM(CFG), ids) + 4 * L * CFG.d_model   # + the attention block's SDPA
    assert flops.forward_flops_per_token(CFG, L) == pytest.approx(got, rel=0.05)
    assert flops.train_flops_per_token(CFG, L, head_fraction=1.0) == 3 * flops.forward_flops_per_token(CFG, L)


def test_peak_table():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops(None) is None and flops.peak_flops("cpu") is None
