"""The rows of bench/gpu_validate.py for the kernels that run only in forwards without autograd (inference,
sampling, evaluation), each a (what, dtype, got, want, tol) check at the 1.3B presets' widths:

    scan_gate   BiMamba2's directions through mixer_function.unscaled_forward (gate in the scan's output
                kernel, the norm's row scale in the sum of the directions) against the same module's
                training path (mamba_ssm's kernels, grad enabled) and against the float64 reference path:
                with the walk (the whole scan in one kernel, the directions on two streams, as the 1.3B
                model runs at batch 1), then with the three launches, with the state_pass kernel (the
                states entering the chunks) and without it
    walk_async  the walk's asynchronous form at a length of whole chunks, against float64 and the Triton walk
    gelu_gemm   the MLP's first matmul with the GELU in cuBLASLt's epilogue against the float64 formula
    whole model DiffusionLM logits without autograd against float64, no further from them than its
                logits with autograd enabled (the training path's kernels), so the pieces are checked
                where the model calls them; sum_norm (the directions' sum in the blocks' next norm) only
                runs there (240M at batch 2: the walk runs)

bf16 weights (as `dtrain sample` and bench.inference run) and fp32 weights under bf16 autocast (the
trainer's evaluation).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from bench.common import rel_err
from model import kernels
from model.lm import DiffusionLM
from model.mamba2 import BiMamba2
from model.presets import get_preset

BF16_TOL = 1e-2


def bimamba(cfg, fused, device, seed=0):
    """A BiMamba2 with its norm weights and D off their initial ones, so every parameter matters (a weight
    applied twice, or not at all, shows). bench/gpu_validate.py's matrix starts from it too."""
    torch.manual_seed(seed)
    model = BiMamba2(cfg, fuse_directions=fused).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".D")):
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model


def mixer_checks(device, gen, seqlen: int = 3000) -> list:
    """BiMamba2 (1.3B, directions separate) without autograd against its training path and float64;
    seqlen 3000 ends in a part chunk."""
    used = kernels.describe(device)["scan_gate"]
    model = bimamba(get_preset("1.3b-diffumamba"), False, device, seed=11)
    reference = copy.deepcopy(model).double()
    x = torch.randn(1, seqlen, model.fwd.d_model, generator=gen).to(device)
    with kernels.use_reference_kernels(), torch.no_grad():
        exact = reference(x.double())
    checks = []
    for label, weights, autocast, forced in (("bf16 weights", torch.bfloat16, False, ()),
                                             ("amp-bf16", torch.float32, True, ()),
                                             ("bf16 weights", torch.bfloat16, False, ("scan_walk",)),
                                             ("bf16 weights", torch.bfloat16, False, ("scan_walk", "state_pass"))):
        m = copy.deepcopy(model).to(weights)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad(), (kernels.use_reference_kernels(*forced) if forced else contextlib.nullcontext()):
                got = m(x.to(weights))
                states = kernels.describe(device)["state_pass"]
                walk = "kernel" if kernels.walk_usable(x, model.fwd.nheads) else "off"
            with torch.enable_grad():
                training = m(x.to(weights)).detach()   # parameters need gradients: the training path
        what = (f"BiMamba2 without autograd (1.3B, L {seqlen}, {label}, scan_gate: {used}, scan_walk: {walk}, "
                f"state_pass: {states})")
        checks.append((f"{what} vs the training path", torch.bfloat16, got, training, BF16_TOL))
        checks.append((f"{what} vs float64", torch.bfloat16, got, exact,
                       max(1.25 * rel_err(training.double().cpu(), exact.cpu()), 1e-6)))
    return checks


def walk_async_checks(device, gen, seqlen: int = 4096) -> list:
    """BiMamba2 (1.3B) without autograd at a length of whole chunks, where the walk's asynchronous form runs
    (model/chunk_walk_async.py): against float64 (as close as the training path is) and against the Triton
    walk (the same products in the same order: equal on an H200)."""
    model = bimamba(get_preset("1.3b-diffumamba"), False, device, seed=13)
    reference = copy.deepcopy(model).double()
    x = torch.randn(1, seqlen, model.fwd.d_model, generator=gen).to(device)
    with kernels.use_reference_kernels(), torch.no_grad():
        exact = reference(x.double())
    m = model.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        got = m(xb)
        used = kernels.describe(device)["walk_async"]
        with kernels.use_reference_kernels("walk_async"):
            triton_walk = m(xb)
    with torch.enable_grad():
        training = m(xb).detach()
    what = f"BiMamba2 without autograd (1.3B, L {seqlen}, bf16 weights, walk_async: {used})"
    return [(f"{what} vs float64", torch.bfloat16, got, exact,
             max(1.25 * rel_err(training.double().cpu(), exact.cpu()), 1e-6)),
            (f"{what} vs the Triton walk", torch.bfloat16, got, triton_walk, 1e-3)]


def gelu_checks(device, gen, tokens: int = 4096) -> list:
    """kernels.linear_gelu (1.3B MLP: 2048 -> 4096) against gelu_tanh(x @ W.T) in float64."""
    d, hidden = 2048, 4096
    x = torch.randn(2, tokens // 2, d, generator=gen).to(device)
    weight = (torch.randn(hidden, d, generator=gen) / d ** 0.5).to(device)
    want = F.gelu(F.linear(x.double(), weight.double()), approximate="tanh")
    checks = []
    for label, dtype, autocast in (("bf16", torch.bfloat16, False), ("amp-bf16", torch.float32, True)):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            usable = kernels.linear_gelu_usable(x)
            got = kernels.linear_gelu(x.to(dtype), weight.to(dtype))
        what = f"MLP matmul + GELU in the epilogue ({label}, gelu_gemm: {'kernel' if usable else 'off'})"
        checks.append((f"{what} vs float64", torch.bfloat16, got, want, BF16_TOL))
    return checks


def model_checks(device, gen, seqlen: int = 2048) -> list:
    """A 240M DiffusionLM in bf16: its logits without autograd against the float64 reference path's, no
    further from them than its logits with autograd (the training path's kernels) are (25% slack). Twelve
    layers of bf16 rounding part the two kernel paths by about 1e-2, so they are not compared directly."""
    torch.manual_seed(12)
    model = DiffusionLM(get_preset("240m-diffumamba")).to(device, torch.bfloat16).eval()
    reference = copy.deepcopy(model).double()
    ids = torch.randint(0, model.cfg.vocab_size - 1, (2, seqlen), generator=gen)
    ids[torch.rand(ids.shape, generator=gen) < 0.5] = model.cfg.mask_token_id
    ids = ids.to(device)
    with torch.no_grad():
        got = model(ids)
        with kernels.use_reference_kernels():
            exact = reference(ids)
    with torch.enable_grad():
        training = model(ids).detach()
    used = ", ".join(f"{k}: {v}" for k, v in kernels.describe(device).items() if k in ("scan_out", "scan_gate",
                                                                                       "scan_walk", "walk_async",
                                                                                       "gelu_gemm", "sum_norm"))
    training_err = rel_err(training.double(), exact)
    what = f"DiffusionLM 240M logits without autograd ({used}) vs float64"
    return [(f"{what} (the training path's kernels: {training_err:.2e})", torch.bfloat16, got, exact,
             max(1.25 * training_err, 1e-6))]


def inference_checks(device, gen) -> list:
    """Every row above (on a GPU with the fused mixer; none elsewhere)."""
    if device.type != "cuda" or not kernels.uses_kernel("mixer", torch.empty(0, device=device)):
        return []
    return (mixer_checks(device, gen) + walk_async_checks(device, gen) + gelu_checks(device, gen)
            + model_checks(device, gen))
