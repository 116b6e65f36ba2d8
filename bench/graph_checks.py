"""Training with CUDA graphs against the same training without (rows of bench/gpu_validate.py): the trunk
replayed from graphs (model/train_graphs.TrainingGraphs) and a pipeline stage's blocks (StageGraphs)."""
from __future__ import annotations

import copy

import torch

from model import graphs, train_graphs
from model.diffusion import mask_batch
from model.lm import DiffusionLM
from model.presets import get_preset


def hook_accumulate_grad_nodes(model, hook) -> list:
    """As DeepSpeed's ZeRO does: `hook` on every parameter's AccumulateGrad node, the nodes kept alive
    (returned)."""
    nodes = []
    for p in model.parameters():
        node = p.expand_as(p).grad_fn.next_functions[0][0]
        node.register_hook(hook)
        nodes.append(node)
    return nodes


def training_graph_checks(device, gen, micro_batches: int = 3) -> list:
    """Training with the trunk replayed from CUDA graphs (model/train_graphs.py) against the same training
    without: the losses of `micro_batches` micro-batches (bf16 autocast, fp32 weights, as the trainer runs)
    and the gradients they accumulate, which a graph's static buffers must not disturb; the graphs' summed
    gradients handed over after every backward, and only after the last (the trainer's ZeRO-1 way), also
    when the last micro-batch has another shape and runs eagerly (it then carries the graphed ones' sums)."""
    preset = "240m-diffumamba-h" if device.type == "cuda" else "tiny-diffumamba-h"
    torch.manual_seed(5)
    plain = DiffusionLM(get_preset(preset).replace(layer_pattern="MA")).to(device).train()
    seq_len = 1024 if device.type == "cuda" else 32

    def masked(step, length):
        return {k: v.to(device) for k, v in mask_batch(
            torch.randint(0, plain.cfg.vocab_size - 1, (2, length), generator=gen), seed=0, step=step,
            positions=torch.arange(2), global_batch_size=2, mask_id=plain.cfg.mask_token_id).items()}
    batches = [masked(i, seq_len) for i in range(micro_batches)]
    odd_last = batches[:-1] + [masked(micro_batches, seq_len // 2)]

    def train(model, batches):
        losses = []
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            for b in batches:
                loss = model.loss(b)[0]
                loss.backward()
                losses.append(loss.detach().float())
        return torch.stack(losses), torch.cat([p.grad.flatten() for p in model.parameters()])

    same_shape, odd_shape = train(plain, batches), train(plain, odd_last)
    checks = []
    for mode, hand_over, run, (want_losses, want_grads) in (
            ("every backward", None, batches, same_shape),
            ("last micro-batch", train_graphs.every_nth_call(micro_batches), batches, same_shape),
            ("last micro-batch, which has another shape and runs eagerly", train_graphs.every_nth_call(micro_batches),
             odd_last, odd_shape)):
        graphed = copy.deepcopy(plain)
        graphed.zero_grad(set_to_none=True)
        graphs = train_graphs.enable(graphed, torch.bfloat16, hand_over)
        # made on the default stream, so a capture that reached them would fail; each must see every hand-over
        hooked = [0]   # with the sums handed over at the last micro-batch only, the hooks run only then
        _kept_nodes = hook_accumulate_grad_nodes(graphed, lambda *_, n=hooked: n.__setitem__(0, n[0] + 1))
        losses, grads = train(graphed, run)
        # every micro-batch's gradient reaches the head's parameters (a tied embedding too); the trunk-only
        # ones get theirs once, at the hand-over, when the graphs hand over at the last micro-batch only
        trunk_only = {id(p) for _, p in graphs.trunk_parameters()} - {id(p) for p in graphed.head.parameters()}
        once = hand_over is not None and graphs.captured is not None
        hook_calls = sum(1 if once and id(p) in trunk_only else micro_batches for p in graphed.parameters())
        state = "on" if graphs.captured is not None else "off (CPU)"
        what = f"training, trunk from CUDA graphs vs plain (graphs: {state}, sums handed over: {mode})"
        checks += [(f"{what}: losses of {micro_batches} micro-batches", torch.float32, losses, want_losses, 1e-3),
                   (f"{what}: accumulated gradients", torch.float32, grads, want_grads, 1e-2),
                   (f"{what}: gradient hooks on the parameters' kept AccumulateGrad nodes, calls", torch.float32,
                    torch.tensor([float(hooked[0])]), torch.tensor([float(hook_calls)]), 1e-6)]
        if device.type == "cuda":   # the graph path, not the eager one, is what the rows above compared
            checks.append((f"training CUDA graphs captured ({mode})", torch.float32,
                           torch.tensor([float(graphs.captured is not None)]), torch.tensor([1.0]), 1e-6))
    return checks


def stage_graph_checks(device, gen) -> list:
    """A pipeline stage's blocks replayed from CUDA graphs (model/train_graphs.StageGraphs) against the same
    blocks run eagerly, three micro-batches in 1F1B order with two in flight (two graph slots): the losses,
    the stage input's gradients (sent to the previous stage) and the summed gradients, handed over at the
    third backward (bf16 autocast, fp32 weights, as the trainer runs)."""
    from dtrain.pipeline import PipeBlock  # the trainer's pipeline layer: a stream in, a stream out
    cfg = get_preset("240m-diffumamba-h" if device.type == "cuda" else "tiny-diffumamba-h").replace(layer_pattern="MA")
    torch.manual_seed(6)
    plain = torch.nn.ModuleList(PipeBlock(kind, cfg) for kind in cfg.layer_pattern).to(device).train()
    plain[-1].ends_stage = True
    seq_len = 1024 if device.type == "cuda" else 32
    xs = [torch.randn(2, seq_len, cfg.d_model, generator=gen).to(device) for _ in range(3)]
    weight = torch.randn(2, seq_len, cfg.d_model, generator=gen).to(device)
    order = [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]

    def train(run_stage, blocks):
        leaves = [x.clone().requires_grad_(True) for x in xs]
        losses = {}
        for kind, i in order:
            if kind == "F":
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    losses[i] = (run_stage(leaves[i]).float() * weight).mean()
            else:
                losses[i].backward()
        return (torch.stack([losses[i].detach() for i in range(3)]), torch.cat([x.grad.flatten() for x in leaves]),
                torch.cat([p.grad.flatten() for p in blocks.parameters()]))

    def eager(x):
        for block in plain:
            x = block(x)
        return x

    want = train(eager, plain)
    graphed_blocks = copy.deepcopy(plain)
    graphed_blocks.zero_grad(set_to_none=True)
    graphs = train_graphs.StageGraphs(list(graphed_blocks), torch.bfloat16, train_graphs.every_nth_call(3),
                                      max_slots=2)
    got = train(graphs, graphed_blocks)
    state = f"on, {len(graphs.slots)} slots" if graphs.slots else "off (CPU)"
    what = f"pipeline stage, blocks from CUDA graphs vs plain (graphs: {state}, 1F1B, 2 in flight)"
    checks = [(f"{what}: losses of 3 micro-batches", torch.float32, got[0], want[0], 1e-3),
              (f"{what}: the stage input's gradients", torch.float32, got[1], want[1], 1e-2),
              (f"{what}: accumulated gradients", torch.float32, got[2], want[2], 1e-2)]
    if device.type == "cuda":
        checks.append(("pipeline stage CUDA graph slots captured", torch.float32,
                       torch.tensor([float(len(graphs.slots))]), torch.tensor([2.0]), 1e-6))
    return checks


def denoiser_capture_checks(device, gen, batch: int = 2, seq_len: int = 8192) -> list:
    """The denoiser's CUDA graph (model/graphs.py) on a GPU: the memory its capture takes against an eager
    forward's activations, for 240M DiffuMamba at batch 2, where the walk runs both directions on two
    streams; and a failed capture that leaves the process usable: a random draw on the GPU after it.
    The capture may take up to twice the eager peak (the two streams' blocks are not shared within it:
    1.6x on an H200); a block kept from reuse until the capture ends, as record_stream did, adds each
    layer's share (3.1x; batch 8 x 64K at 1.3B ran out of memory; docs/benchmarks.md)."""
    if device.type != "cuda":
        return []   # CUDA graphs only
    torch.manual_seed(5)
    model = DiffusionLM(get_preset("240m-diffumamba")).to(device, torch.bfloat16).eval()
    ids = torch.randint(0, model.cfg.vocab_size - 1, (batch, seq_len), generator=gen).to(device)
    with torch.no_grad():
        graphs.warm_up_on_side_stream(lambda: model.trunk(ids), graphs.WARMUP_CALLS)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        model.trunk(ids)
        eager = torch.cuda.max_memory_allocated(device) - base
        torch.cuda.empty_cache()   # as torch.cuda.graph does on entry: what is reserved after it is the capture's
        reserved = torch.cuda.memory_reserved(device)
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            model.trunk(ids)
        captured = torch.cuda.memory_reserved(device) - reserved

    def failing_capture():   # a synchronisation is not allowed in a capture: the capture and its end fail
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            torch.rand(8, device=device)
            torch.cuda.synchronize(device)
    try:
        graphs.capture_or_explain(failing_capture, device, "a failing", "run without graphs")
        failed = False
    except RuntimeError:
        failed = True
    drawn = torch.rand(8, device=device)   # raises "Offset increment outside graph capture" if not released
    what = (f"memory a capture of 240M DiffuMamba (batch {batch}, L {seq_len}) takes, over an eager forward's "
            f"activations ({eager / 2**20:.0f} MiB): {captured / 2**20:.0f} MiB")
    return [(what, torch.float32,
             torch.tensor([captured / eager]), torch.tensor([1.0]), 1.0),
            ("a failed capture raised, then a random draw on its GPU", torch.float32,
             torch.tensor([float(failed), float(drawn.numel() == 8)]), torch.tensor([1.0, 1.0]), 1e-6)]
