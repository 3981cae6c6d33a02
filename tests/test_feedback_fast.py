"""The exact shortcuts of the feedback step (fsa.feedback) against their plain forms.

- upsampling_adjoint: A·R with R the bilinear resize matrix, and R·v_c = F.interpolate(v_c);
- ensemble_apply_upsampled (ProxyCLIP's ensemble on CLIP's grid) = ensemble_apply on the upsampled values;
- feedback_attention, made a block of rows at a time, = output_similarity → prune_top_p_sorted → scaling;
- kl_divergence with subnormal probabilities = the KL product as it was, and = the N×N×K sum;
- the scaling's pruned entries (minus the dtype's largest value) = masked_fill(−inf), bit for bit, up to λ = 88;
- ProxyCLIP's out_proj on the coarse grid (finish_last_block_mixed) = out_proj(M·v_c); M's rows sum to 1.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fsa.feedback as fb
from fsa.config import FeedbackConfig
from fsa.sliding import linear_resize_matrix
from fsa.top_p import prune_top_p_sorted
from fsa.vision import finish_last_block, finish_last_block_mixed

DT = torch.float64
GRIDS = [((21, 21), (42, 42)), ((5, 8), (6, 10)), ((3, 7), (5, 7)), ((6, 6), (4, 9))]


def _values(coarse, fine, seed, heads=3, d=4):
    g = torch.Generator().manual_seed(seed)
    vc = torch.randn(2, heads, coarse[0] * coarse[1], d, generator=g, dtype=DT)
    grid = vc.reshape(2 * heads, *coarse, d).permute(0, 3, 1, 2)
    v = F.interpolate(grid, size=fine, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    return vc, v.reshape(2, heads, fine[0] * fine[1], d)


def _rows(b, n, m, seed):
    return torch.softmax(torch.randn(b, n, m, generator=torch.Generator().manual_seed(seed), dtype=DT), dim=-1)


@pytest.mark.parametrize("coarse,fine", GRIDS)
def test_upsampling_adjoint_is_a_times_r(coarse, fine):
    r = torch.kron(linear_resize_matrix(coarse[0], fine[0], DT), linear_resize_matrix(coarse[1], fine[1], DT))
    vc, v = _values(coarse, fine, seed=1)
    assert (r @ vc - v).abs().max() < 1e-14  # R is the resize
    a = _rows(2, 7, fine[0] * fine[1], seed=2)
    got = fb.upsampling_adjoint(a, coarse, fine)
    assert got.shape == (2, 7, coarse[0] * coarse[1])
    assert (got - a @ r).abs().max() < 1e-14


@pytest.mark.parametrize("coarse,fine", GRIDS)
@pytest.mark.parametrize("ensemble", [True, False])
def test_ensemble_on_the_coarse_grid(coarse, fine, ensemble):
    vc, v = _values(coarse, fine, seed=3)
    n = fine[0] * fine[1]
    a_new, a0 = _rows(2, n, n, seed=4), _rows(2, n, n, seed=5)[:, None]
    up = fb.UpsampledValues(vc, coarse, fine)
    cfg = FeedbackConfig(ensemble=ensemble)
    got = fb.adapt_values(a_new, a0, v, cfg, cls_token=False, upsampled=up)
    want = fb.adapt_values(a_new, a0, v, cfg, cls_token=False)
    assert got.shape == want.shape == v.shape
    assert (got - want).abs().max() < 1e-13


def test_upsampled_values_ignored_where_they_do_not_apply():
    """With CLS or per-head attention the plain ensemble runs (the shortcut needs one shared matrix)."""
    vc, v = _values((3, 3), (4, 4), seed=6)
    a_new, a0 = _rows(2, 16, 16, seed=7), _rows(2, 16, 16, seed=8)[:, None].expand(-1, 3, -1, -1)
    up = fb.UpsampledValues(vc, (3, 3), (4, 4))
    cfg = FeedbackConfig()
    assert torch.equal(fb.adapt_values(a_new, a0, v, cfg, cls_token=False, upsampled=up),
                       fb.adapt_values(a_new, a0, v, cfg, cls_token=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pruning", [True, False])
def test_blocked_feedback_attention_equals_its_steps(monkeypatch, dtype, pruning):
    """For any block of rows, A_new = the scaling of Ŝ (as output_similarity makes it) after the sorted
    top-p; and every block size gives the same values up to rounding of the product."""
    g = torch.Generator().manual_seed(9)
    pi = torch.softmax(8 * torch.randn(2, 300, 11, generator=g, dtype=dtype), dim=-1)
    cfg = FeedbackConfig(pruning=pruning, lam=2.5, p=0.4)
    results = []
    for rows in (1 << 19, 7 * 300, 300):  # one block, several, one row per block
        monkeypatch.setattr(fb, "ROW_BLOCK_ELEMENTS", rows)
        sim = fb.output_similarity(pi, cfg.eps)
        keep = prune_top_p_sorted(sim, cfg.p) if pruning else None
        got = fb.feedback_attention(pi, cfg)
        assert torch.equal(got, fb.adapted_attention(sim, keep, cfg.lam)), rows
        results.append(got)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert all((r - results[0]).abs().max() < tol for r in results)


def test_kl_with_subnormal_probabilities():
    """Confident Π has subnormal entries; zeroing them before the product leaves Ŝ as it was."""
    g = torch.Generator().manual_seed(10)
    pi = torch.softmax(20 * torch.randn(1, 400, 60, generator=g), dim=-1)
    assert bool((pi[pi > 0] < torch.finfo(torch.float32).tiny).any())
    lg = torch.log(pi + 1e-10)
    before = torch.baddbmm((pi * lg).sum(-1, keepdim=True), pi, lg.transpose(1, 2), beta=1.0, alpha=-1.0)
    before.diagonal(dim1=-2, dim2=-1).zero_()
    before = before.clamp_(min=0.0).add_(1.0).reciprocal_()
    assert torch.equal(fb.output_similarity(pi, 1e-10), before)
    naive = (pi.double()[:, :, None] * (lg.double()[:, :, None] - lg.double()[:, None])).sum(-1).clamp(min=0)
    assert (fb.kl_divergence(pi, 1e-10).double() - naive).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lam", [0.0, 3.0, 4.5, 88.0])
def test_pruned_scaling_equals_masked_fill(dtype, lam):
    """Ŝ in (0, 1] with the diagonal 1 and kept, pruned entries up to 1 − 1e-6 and equal to 1 (their Ŝ·exp(λŜ)
    up to e^88 at λ = 88): the same A_new as filling −inf, on every entry."""
    g = torch.Generator().manual_seed(int(lam) + 7)
    n = 300
    sim = torch.rand(2, n, n, generator=g, dtype=torch.float64).clamp_(min=1e-6).to(dtype)
    sim[:, :, :5] = 1 - 1e-6  # pruned entries next to the kept maximum
    sim[:, :, 5] = 1.0  # and ties with it (identical class distributions), pruned by a small p
    torch.diagonal(sim, dim1=1, dim2=2).fill_(1.0)
    pruned = torch.rand(2, n, n, generator=g) < 0.6
    pruned[:, :, 5] = True
    torch.diagonal(pruned, dim1=1, dim2=2).fill_(False)
    want = (sim * torch.exp(lam * sim)).masked_fill_(pruned, float("-inf")).softmax(dim=-1)
    got = fb.adapted_attention(sim, ~pruned, lam)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)
    assert bool((got[pruned] == 0).all())


@pytest.mark.parametrize("ensemble", [True, False])
def test_out_proj_on_the_coarse_grid(ensemble):
    """M·out_proj(v_c) = out_proj(M·v_c) for ProxyCLIP's last block (no residual, no FFN): the bias passes
    through because every row of M sums to 1."""
    from fsa.backbones import tiny_test_clip

    block = tiny_test_clip().double().eval().visual.transformer.resblocks[-1]
    heads = block.attn.num_heads
    d = block.attn.embed_dim // heads
    coarse, fine = (3, 4), (6, 7)
    vc, v = _values(coarse, fine, seed=8, heads=heads, d=d)
    n = fine[0] * fine[1]
    a_new, a0 = _rows(2, n, n, seed=9), _rows(2, n, n, seed=10)[:, None]
    up = fb.UpsampledValues(vc, coarse, fine)
    cfg = FeedbackConfig(ensemble=ensemble)
    mixing = fb.adapted_mixing(a_new, a0, cfg, cls_token=False, upsampled=up)
    assert mixing.shape == (2, n, coarse[0] * coarse[1])
    assert (mixing.sum(dim=-1) - 1).abs().max() < 1e-14
    x = torch.randn(2, n, block.attn.embed_dim, dtype=DT)
    with torch.no_grad():
        want = finish_last_block(block, x, fb.adapt_values(a_new, a0, v, cfg, cls_token=False), residual=False,
                                 ffn=False)
        got = finish_last_block_mixed(block, mixing, vc, DT)
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-12
    assert fb.adapted_mixing(a_new, a0, cfg, cls_token=True, upsampled=up) is None
    assert fb.adapted_mixing(a_new, a0, cfg, cls_token=False, upsampled=None) is None
