"""How close to its matmul FLOP floor a forward pass made of the model's kernels can come: the floor
(model FLOPs at the bf16 matmul peak) plus the bytes the memory-bound kernels must move, at the card's
memory bandwidth, each kernel as the model runs it (it reads its inputs from memory and writes its outputs
back, nothing fused beyond what the kernels fuse today). Arithmetic only: no GPU needed.

    python -m bench.forward_bound --presets 1.3b-diffumamba 1.3b-diffumamba-h --seq-lens 4096 32768 131072

bound = (floor + traffic / bandwidth) / floor is the least `x floor` that bench.inference can measure for a
forward of these kernels, even with every memory-bound kernel at full bandwidth and the matmuls at the
peak. Batch 1, bf16 activations, fp32 residual stream (model/blocks.py); per token, per kernel:

    add + norm (2 a block)   reads hidden (2d) and the fp32 residual (4d), writes both back   12d
    flips (Mamba blocks)     the input reversed (read + write 2d each), the two outputs summed with the
                             backward one reversed back (read 2 x 2d, write 2d)               10d
    causal conv (a direction)  reads and writes x, B, C                                    4 conv_dim
    SSD scan (a direction)   mamba_ssm's five kernels: x read twice and y written (6 d_inner); the chunk
                             states, 4 bytes written, read, 2 written by state passing, 2 read by the
                             scan (12 H P N / Q); C B^T in fp32 written and read (8 g Q); B, C (8 g N);
                             dt and its cumulative sums (26 H)
    gated norm (a direction) reads y and z, writes the normalised output                   6 d_inner
    rotary (attention)       reads and writes q and k                                          8d
    MLP activation           GELU reads and writes the hidden layer (4h); SwiGLU reads 2h, writes h (6h)
    embedding, final norm    the fp32 row read and written (8d); hidden + residual read, output written (8d)

--without-autograd counts the kernels of a forward without autograd (inference, sampling; model/kernels.py's
scan_gate, gelu_gemm, sum_norm and state_pass): with one norm group the scan's output kernel also reads z and
writes each head's sum of squares (2 d_inner + 4 H) and the gated norm does not run; the directions' sum reads
the sums (2 x 4 H) and, in the same pass as the next add + norm, neither writes its result nor does that norm
read it (-2 x 2d); the GELU runs in the matmul's epilogue (no pass of its own); the states entering the chunks
come from one kernel, so no fp32 chunk states are written or read (12 H P N / Q becomes 4 H P N / Q).

--fused-mixer asks what a mixer written as one kernel per direction would allow: it reads in_proj's
output (z, x, B, C, dt) once and writes the normalised output (2 d_in_proj + 2 d_inner), in place of the
conv, the scan and the gated norm.

The matmuls (their own reads and writes included) and attention's fused kernel are in the floor's time.
Defaults: the H100 SXM's 3.35 TB/s and 770 TFLOP/s, the bf16 matmul peak bench.training measures on an
H100 80GB HBM3 (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench import common
from model.config import ModelConfig
from model.flops import forward_flops_per_token
from model.presets import PRESETS, get_preset

BF16, FP32 = 2, 4   # bytes


def gate_in_scan(cfg: ModelConfig, without_autograd: bool) -> bool:
    """Whether the scan's output kernel gates (a forward without autograd, one norm group: kernels.py)."""
    return without_autograd and cfg.mamba.ngroups == 1


def mamba_direction_bytes(cfg: ModelConfig, without_autograd: bool = False) -> dict[str, float]:
    """Bytes per token that one scan direction's memory-bound kernels move (see the module docstring)."""
    m = cfg.mamba
    di, heads, n, g, q = cfg.d_inner, cfg.mamba_nheads, m.d_state, m.ngroups, m.chunk_size
    conv_dim = di + 2 * g * n
    states = heads * m.headdim * n / q                     # state entries per token (one state per chunk)
    fp32_states = 0 if without_autograd else 2 * FP32     # without autograd: state_pass keeps them on chip
    scan = (3 * BF16 * di                                  # x read by chunk state and chunk scan, y written
            + (fp32_states + 2 * BF16) * states            # fp32 states written, read; bf16 written, read
            + 2 * FP32 * g * q                             # C B^T, fp32, written and read
            + 4 * BF16 * g * n                             # B (twice), C (twice)
            + (BF16 + 6 * FP32) * heads)                   # dt read; dt, dA cumsum written, read twice
    if gate_in_scan(cfg, without_autograd):                # z read, the sums of squares written
        return {"conv": 2 * BF16 * conv_dim, "scan": scan + BF16 * di + FP32 * heads}
    return {"conv": 2 * BF16 * conv_dim, "scan": scan, "gated norm": 3 * BF16 * di}


def fused_direction_bytes(cfg: ModelConfig) -> dict[str, float]:
    """The same direction as one kernel: in_proj's output read once, the normalised output written."""
    m = cfg.mamba
    in_proj_out = 2 * cfg.d_inner + 2 * m.ngroups * m.d_state + cfg.mamba_nheads   # z, x, B, C, dt
    return {"fused mixer": BF16 * (in_proj_out + cfg.d_inner)}


def block_bytes(kind: str, cfg: ModelConfig, fused_mixer: bool = False,
                without_autograd: bool = False) -> dict[str, float]:
    """Bytes per token of one block's memory-bound kernels, by kind of kernel."""
    d, h = cfg.d_model, cfg.mlp_hidden
    gelu = 0 if without_autograd else 2 * BF16 * h          # without autograd: in the matmul's epilogue
    out = {"add + norm": 2 * (2 * BF16 + 2 * FP32) * d,
           "MLP activation": (3 * BF16 * h) if cfg.mlp_kind == "swiglu" else gelu}
    if kind == "M":
        unscaled = gate_in_scan(cfg, without_autograd) and not fused_mixer
        sums = 2 * FP32 * cfg.mamba_nheads if unscaled else 0
        out["flips"] = 5 * BF16 * d + sums                 # (the norms' row scales read in the sum)
        if unscaled:                                       # sum_norm: the sum is not written, nor read by the norm
            out["flips"] -= BF16 * d
            out["add + norm"] -= BF16 * d
        direction = (fused_direction_bytes(cfg) if fused_mixer
                     else mamba_direction_bytes(cfg, without_autograd))
        for name, value in direction.items():
            out[name] = 2 * value                          # two directions
    elif kind == "A":
        out["rotary"] = 4 * BF16 * d
    else:
        raise ValueError(f"unknown block kind {kind!r}")
    return out


def forward_bytes_per_token(cfg: ModelConfig, fused_mixer: bool = False,
                            without_autograd: bool = False) -> dict[str, float]:
    """Bytes per token of the whole forward's memory-bound kernels, by kind of kernel."""
    total = {"embedding + final norm": 2 * FP32 * cfg.d_model + (2 * BF16 + FP32) * cfg.d_model}
    for kind in cfg.layer_pattern:
        for name, value in block_bytes(kind, cfg, fused_mixer, without_autograd).items():
            total[name] = total.get(name, 0.0) + value
    return total


def bound_row(preset: str, seq_len: int, peak_flops: float, bandwidth: float, fused_mixer: bool = False,
              without_autograd: bool = False) -> dict:
    cfg = get_preset(preset)
    floor_s = forward_flops_per_token(cfg, seq_len) * seq_len / peak_flops
    by_kind = {k: v * seq_len
               for k, v in forward_bytes_per_token(cfg, fused_mixer, without_autograd).items()}
    traffic = sum(by_kind.values())
    row = {"preset": preset, "seq_len": seq_len, "floor_ms": floor_s * 1e3, "traffic_GB": traffic / 1e9,
           "memory_ms": traffic / bandwidth * 1e3, "bound": 1 + traffic / bandwidth / floor_s}
    row.update({f"ms {k}": v / bandwidth * 1e3 for k, v in by_kind.items()})
    return row


COLUMNS = [("preset", "preset", ""), ("L (batch 1)", "seq_len", ",d"), ("matmul floor (ms)", "floor_ms", ",.1f"),
           ("memory-bound traffic (GB)", "traffic_GB", ",.1f"), ("at the bandwidth (ms)", "memory_ms", ",.1f"),
           ("bound (x floor)", "bound", ".2f")]


def plot(rows: list[dict], head: dict, path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for preset in dict.fromkeys(r["preset"] for r in rows):
        mine = [r for r in rows if r["preset"] == preset]
        ax.plot([r["seq_len"] for r in mine], [r["bound"] for r in mine], marker="o", label=preset)
    ax.axhline(1.25, color="gray", lw=0.8, ls="--", label="1.25x target")
    ax.set(xscale="log", xlabel="sequence length (batch 1)", ylabel="least forward time / matmul floor")
    ax.legend()
    common.save_figure(fig, head, "forward bound", path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["1.3b-diffumamba", "1.3b-diffumamba-h"], choices=sorted(PRESETS))
    ap.add_argument("--seq-lens", nargs="+", type=int, default=[4096, 32768, 131072])
    ap.add_argument("--peak-tflops", type=float, default=770.0, help="bf16 matmul peak (measured, not the data sheet)")
    ap.add_argument("--bandwidth-tbs", type=float, default=3.35, help="memory bandwidth, TB/s (H100 SXM: 3.35)")
    ap.add_argument("--fused-mixer", action="store_true",
                    help="each Mamba direction as one kernel (conv, scan, gated norm fused): what it would allow")
    ap.add_argument("--without-autograd", action="store_true",
                    help="the kernels of a forward without autograd: gate in the scan's output, GELU in the matmul, "
                         "the directions' sum in the next norm, one kernel for the chunk states")
    common.add_output_args(ap, "forward_bound")
    args = ap.parse_args(argv)
    if args.plot_only:
        return common.replot(args.out, "forward_bound", plot)
    rows = [bound_row(p, L, args.peak_tflops * 1e12, args.bandwidth_tbs * 1e12, args.fused_mixer,
                      args.without_autograd) for p in args.presets for L in args.seq_lens]
    mixer = "each Mamba direction one fused kernel" if args.fused_mixer else "the model's kernels"
    if args.without_autograd:
        mixer += (", without autograd (gate in the scan's output, GELU in the matmul, the sum in the next norm, "
                  "the chunk states in one kernel)")
    head = common.header(torch.device("cpu"), "bench.forward_bound",
                         assumptions=f"{args.peak_tflops:g} TFLOP/s matmul peak, {args.bandwidth_tbs:g} TB/s, {mixer}")
    kinds = [k for k in rows[0] if k.startswith("ms ")]
    by_kind = [("preset", "preset", ""), ("L", "seq_len", ",d"), *[(k[3:] + " (ms)", k, ",.1f") for k in kinds]]
    tables = [("", common.markdown_table(COLUMNS, rows)),
              ("memory-bound kernels at the bandwidth, by kind", common.markdown_table(by_kind, rows))]
    notes = [("bound = (matmul floor + traffic / bandwidth) / matmul floor: the least `x floor` a forward of "
              "these kernels reaches, with every memory-bound kernel at full bandwidth (module docstring)")]
    title = "Forward time bound from the matmul floor and memory traffic"
    path = common.write_results(args.out, "forward_bound", title, head, tables, rows, notes)
    common.print_results(path)
    plot(rows, head, args.out / "forward_bound.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
