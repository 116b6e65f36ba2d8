"""The output head run only at scored (masked) positions: DiffusionLM.forward(ids, score_mask) with
diffusion_loss_selected must give the loss, stats and gradients of diffusion_loss on the full logits, and
both must match an independent fp64 SUBS reference written here."""
import pytest
import torch

from model import flops
from model.config import ModelConfig
from model.diffusion import (
    diffusion_loss,
    diffusion_loss_selected,
    mask_batch,
    masked_token_nll,
    scored_positions,
    subs_target_nll,
)
from model.lm import DiffusionLM
from model.presets import get_preset

PRESETS = ["tiny-diffumamba", "tiny-diffumamba-h", "tiny-diffutran"]
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def reference_loss(logits: torch.Tensor, batch: dict, mask_id: int):
    """SUBS NELBO per real token from full (B, L, V) logits, straight from the definition, in fp64:
    log-softmax with [MASK] removed at masked real positions, log p = 0 (carried over) elsewhere."""
    x_t, x_0, t, lm = batch["input_ids"], batch["targets"], batch["t"].double(), batch["loss_mask"].double()
    no_mask = torch.zeros(logits.shape[-1], dtype=torch.bool)
    no_mask[mask_id] = True
    logp = torch.log_softmax(logits.double().masked_fill(no_mask, float("-inf")), dim=-1)
    nll = -logp.gather(-1, x_0.unsqueeze(-1)).squeeze(-1)
    scored = (x_t == mask_id) & (lm > 0)
    per_seq = (torch.where(scored, nll, torch.zeros_like(nll)) / t.unsqueeze(-1)).sum(-1)
    return per_seq.sum() / lm.sum().clamp_min(1.0), per_seq


def make_model(preset: str, tied: bool, seed: int, norm: str = "rmsnorm") -> DiffusionLM:
    torch.manual_seed(seed)
    cfg = get_preset(preset).replace(tie_embeddings=tied, norm=norm)
    model = DiffusionLM(cfg).double()
    # fresh random weights everywhere (norm gains included), so no path hides behind an init of ones/zeros
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def make_batch(cfg: ModelConfig, seed: int, B: int = 4, L: int = 40, padded: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, cfg.mask_token_id, (B, L), generator=g)
    loss_mask = None
    if padded:
        loss_mask = torch.ones(B, L)
        loss_mask[0, L // 2:] = 0        # a half-padded row
        loss_mask[1, 5:] = 0             # a mostly padded row
        loss_mask[2, :] = 0              # a row of padding only
    return mask_batch(x0, seed=seed, step=seed, positions=torch.arange(B), global_batch_size=B,
                      mask_id=cfg.mask_token_id, loss_mask=loss_mask)


def grads(model: DiffusionLM, loss: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def check_paths_agree(model: DiffusionLM, batch: dict):
    """Full-logits diffusion_loss, selected-logits loss and the reference: values, stats and gradients."""
    mask_id = model.cfg.mask_token_id
    full = model(batch["input_ids"])
    loss_full, s_full = diffusion_loss(full, batch, mask_id)
    g_full = grads(model, loss_full)

    score_mask = scored_positions(batch, mask_id)
    sel = model(batch["input_ids"], score_mask=score_mask)
    assert sel.shape == (int(score_mask.sum()), model.cfg.vocab_size) and sel.dtype == torch.float64
    torch.testing.assert_close(sel, full.detach()[score_mask], **TIGHT)
    loss_sel, s_sel = diffusion_loss_selected(sel, batch, mask_id)
    g_sel = grads(model, loss_sel)

    ref = model(batch["input_ids"])
    loss_ref, per_seq_ref = reference_loss(ref, batch, mask_id)
    g_ref = grads(model, loss_ref)

    assert loss_sel.dtype == torch.float64
    torch.testing.assert_close(loss_sel, loss_full, **TIGHT)
    torch.testing.assert_close(loss_sel, loss_ref, **TIGHT)
    torch.testing.assert_close(s_sel["nelbo_per_seq"], s_full["nelbo_per_seq"], **TIGHT)
    torch.testing.assert_close(s_sel["nelbo_per_seq"], per_seq_ref.detach(), **TIGHT)
    assert torch.equal(s_sel["tokens_per_seq"], batch["loss_mask"].sum(-1))
    assert torch.equal(s_sel["tokens_per_seq"], s_full["tokens_per_seq"])
    assert torch.equal(s_sel["t"], batch["t"]) and torch.equal(s_full["t"], batch["t"])
    assert all(not v.requires_grad for v in s_sel.values())
    assert g_sel.keys() == g_full.keys() == g_ref.keys()
    for name in g_sel:
        torch.testing.assert_close(g_sel[name], g_full[name], **TIGHT, msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(g_sel[name], g_ref[name], **TIGHT, msg=lambda m, name=name: f"{name}: {m}")
    return loss_sel, s_sel, g_sel


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("preset", PRESETS)
def test_selected_head_matches_full_logits(preset, tied):
    model = make_model(preset, tied, seed=1)
    batch = make_batch(model.cfg, seed=2)
    assert 0 < int(scored_positions(batch, model.cfg.mask_token_id).sum()) < batch["input_ids"].numel()
    loss, _, g = check_paths_agree(model, batch)
    assert torch.isfinite(loss) and loss > 0
    assert all(v.abs().sum() > 0 for v in g.values()), "every parameter gets a gradient"
    # DiffusionLM.loss takes the selected path
    torch.testing.assert_close(model.loss(batch)[0], loss, **TIGHT)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_layernorm_head_is_exact_too(tied):
    model = make_model("tiny-diffumamba-h", tied, seed=10, norm="layernorm")
    check_paths_agree(model, make_batch(model.cfg, seed=11))
    check_paths_agree(model, make_batch(model.cfg, seed=12, padded=True))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("preset", PRESETS)
def test_padding_and_rows_without_masked_tokens(preset, tied):
    model = make_model(preset, tied, seed=3)
    batch = make_batch(model.cfg, seed=4, padded=True)
    batch["input_ids"][3] = batch["targets"][3]     # a real row with no masked token
    scored = scored_positions(batch, model.cfg.mask_token_id)
    assert not scored[2].any() and not scored[3].any() and scored[0].any()
    assert not scored[batch["loss_mask"] == 0].any()
    _, stats, _ = check_paths_agree(model, batch)
    assert stats["nelbo_per_seq"][2] == 0 and stats["nelbo_per_seq"][3] == 0
    assert stats["tokens_per_seq"].tolist() == [20.0, 5.0, 0.0, 40.0]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_no_masked_position_gives_zero_loss_with_a_gradient_path(tied):
    model = make_model("tiny-diffumamba-h", tied, seed=5)
    batch = make_batch(model.cfg, seed=6)
    batch["input_ids"] = batch["targets"].clone()
    mask_id = model.cfg.mask_token_id
    score_mask = scored_positions(batch, mask_id)
    assert not score_mask.any()
    logits = model(batch["input_ids"], score_mask=score_mask)
    assert logits.shape == (0, model.cfg.vocab_size)
    loss, stats = diffusion_loss_selected(logits, batch, mask_id)
    assert loss.requires_grad and loss.item() == 0.0
    assert torch.equal(stats["nelbo_per_seq"], torch.zeros(4, dtype=torch.float64))
    g = grads(model, loss)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in g.values())   # present, finite, zero
    check_paths_agree(model, batch)
    # an all-padding batch: no token at all, still loss 0 and no NaN
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    loss, stats = diffusion_loss_selected(model(batch["input_ids"], score_mask=score_mask), batch, mask_id)
    assert loss.item() == 0.0 and torch.equal(stats["tokens_per_seq"], torch.zeros(4))
    assert all(torch.isfinite(v).all() for v in grads(model, loss).values())


def test_selected_logits_must_match_the_mask():
    model = make_model("tiny-diffutran", True, seed=7)
    batch = make_batch(model.cfg, seed=8)
    mask_id = model.cfg.mask_token_id
    score_mask = scored_positions(batch, mask_id)
    with pytest.raises(ValueError):
        diffusion_loss_selected(model(batch["input_ids"]), batch, mask_id)           # full logits
    with pytest.raises(ValueError):
        diffusion_loss_selected(model(batch["input_ids"], score_mask)[1:], batch, mask_id)
    with pytest.raises(ValueError):
        model(batch["input_ids"], score_mask=score_mask.long())   # an index tensor is not a mask
    with pytest.raises(ValueError):
        model(batch["input_ids"], score_mask=score_mask[:, 1:])


def test_masked_token_nll_and_low_precision_logits():
    torch.manual_seed(9)
    V, mask_id = 11, 10
    batch = mask_batch(torch.randint(0, V - 1, (3, 16)), seed=1, step=1, positions=torch.arange(3),
                       global_batch_size=3, mask_id=mask_id)
    logits = torch.randn(3, 16, V, dtype=torch.float64)
    _, per_seq_ref = reference_loss(logits, batch, mask_id)
    nll = masked_token_nll(logits, batch, mask_id)
    assert nll.shape == (3, 16)
    assert torch.equal(nll == 0, ~scored_positions(batch, mask_id))
    torch.testing.assert_close((nll / batch["t"].double().unsqueeze(-1)).sum(-1), per_seq_ref, **TIGHT)
    # bf16 logits: computed in fp32, the caller's tensor untouched (the [MASK] column is set on a copy)
    for dtype in (torch.bfloat16, torch.float32):
        x = logits.to(dtype)
        before = x.clone()
        out = subs_target_nll(x, batch["targets"], mask_id)
        assert out.dtype == torch.float32 and torch.equal(x, before)
        torch.testing.assert_close(out.double(), subs_target_nll(x.double(), batch["targets"], mask_id),
                                   rtol=1e-6, atol=1e-6)


def test_head_fraction_in_the_flop_count():
    """One non-causal attention block + GELU MLP + tied head, d = 64, V = 512, L = 64, by hand:
    attention 2*64*192 + 2*64*64 + 2*64*64 + 2*64*64 = 49,152; MLP 2*64*256 + 2*256*64 = 65,536;
    head 2*64*512 = 65,536 per position. Full forward 180,224; training with the head at the expected
    masked fraction (1 + 1e-3) / 2 = 0.5005: 3 * (114,688 + 0.5005 * 65,536) = 3 * 147,488.768."""
    cfg = ModelConfig(vocab_size=512, mask_token_id=511, d_model=64, layer_pattern="A", n_heads=4, mlp_ratio=4)
    assert flops.expected_masked_fraction() == pytest.approx(0.5005)
    assert flops.expected_masked_fraction(0.1) == pytest.approx(0.55)
    assert flops.forward_flops_per_token(cfg, 64) == 180_224                      # inference: full head
    assert flops.forward_flops_per_token(cfg, 64, head_fraction=0.0) == 114_688
    assert flops.train_flops_per_token(cfg, 64) == pytest.approx(442_466.304)
    assert flops.train_flops_per_token(cfg, 64, head_fraction=flops.FULL_HEAD) == 540_672
    assert flops.train_flops_per_token(cfg, 64, flops.expected_masked_fraction(0.1)) == pytest.approx(
        3 * (114_688 + 0.55 * 65_536))
    with pytest.raises(ValueError):
        flops.forward_flops_per_token(cfg, 64, head_fraction=1.5)


SYNCING_OPS = {"nonzero", "_local_scalar_dense", "is_nonzero", "masked_select", "equal"}


def ops_needing_device_values(run) -> set:
    """The aten ops of run() that need a tensor's values on the host (on a GPU: the host waits for the
    device): nonzero, item, bool(), masked_select, and indexing by a bool mask (a nonzero inside)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    seen = set()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in SYNCING_OPS:
                seen.add(name)
            if name.startswith("index") and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                for a in args if isinstance(a, (list, tuple)) for i in a):
                seen.add(f"{name} by a bool mask")
            return func(*args, **(kwargs or {}))

    with Recorder():
        run()
    return seen


@pytest.mark.parametrize("preset", PRESETS)
def test_selecting_by_the_host_made_index_never_waits_for_the_device(preset):
    """Training selects the scored positions with the batch's scored_index, made on the host: forward,
    loss and backward then run no op that needs device values on the host, so the host can queue the next
    micro-batch while the GPU works. Selecting by the bool mask does need them (one nonzero), and both
    give the same loss and gradients."""
    from model.diffusion import scored_index
    model = make_model(preset, tied=True, seed=13)
    batch = make_batch(model.cfg, seed=14, padded=True)
    mask_id = model.cfg.mask_token_id
    results = {}

    def step(score):
        def run():
            model.zero_grad()
            loss, _ = diffusion_loss_selected(model(batch["input_ids"], score), batch, mask_id, score)
            loss.backward()
            results[score.dtype] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
        return run

    assert ops_needing_device_values(step(scored_index(batch, mask_id))) == set()
    assert ops_needing_device_values(step(scored_positions(batch, mask_id))) == {"nonzero"}
    (loss_i, grads_i), (loss_m, grads_m) = results[torch.int64], results[torch.bool]
    torch.testing.assert_close(loss_i, loss_m, **TIGHT)
    for a, b in zip(grads_i, grads_m):
        torch.testing.assert_close(a, b, **TIGHT)
