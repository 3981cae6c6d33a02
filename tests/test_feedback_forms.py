"""The efficient FSA building blocks of `fsa.feedback` vs their naive forms (docs/method.md §3).

- output_similarity vs the materialised N x N x K KL tensor (and its properties: Ŝ_ii = 1,
  Ŝ in (0, 1], bounded by ε when probabilities are exactly 0, not symmetric);
- prune_top_p vs a per-row Python loop;
- adapted_attention: equals the naive softmax, rows sum to 1, exactly 0 where pruned;
- ensemble_apply vs explicit per-head (A_new A0 + A0 A_new + A_new) / 3 matrices, with the
  CLS embedding diag(1, A_new), per-head / shared / identity A0;
- apply_new (A_new alone) vs diag(1, A_new) v.
"""
from __future__ import annotations

import math

import pytest
import torch

import reference as R
from _fixtures_ref import _single_thread  # noqa: F401  (autouse fixture)
from _fixtures_ref import DT, max_abs, record

import fsa.feedback as fb


def _pi(B, N, K, scale, seed, zeros=False):
    """Class distributions like FSA's: softmax of scaled cosine-like logits, rows clustered so
    that similarities spread over (0, 1]."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, K, generator=g, dtype=DT)
    assign = torch.randint(0, 4, (B, N), generator=g)
    logits = centers[assign] + 0.3 * torch.randn(B, N, K, generator=g, dtype=DT)
    pi = torch.softmax(scale * logits, dim=-1)
    if zeros:  # some exactly-zero probabilities (one-hot rows)
        pi[:, :3] = torch.nn.functional.one_hot(torch.arange(3) % K, K).to(DT)
    return pi


def _sim(B, N, seed):
    g = torch.Generator().manual_seed(seed)
    return 1.0 / (1.0 + 5.0 * torch.rand(B, N, N, generator=g, dtype=DT))  # in (1/6, 1]


# ---------------------------------------------------------------------------------------------
# output similarity
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,N,K,scale", [(1, 49, 7, 10.0), (2, 40, 5, 20.0), (1, 81, 7, 35.0), (2, 12, 150, 3.0)])
@pytest.mark.parametrize("eps", [1e-10, 1e-6])
def test_output_similarity_vs_kl_tensor(B, N, K, scale, eps):
    pi = _pi(B, N, K, scale, seed=N + K)
    got = fb.output_similarity(pi, eps)
    assert got.shape == (B, N, N) and got.dtype == DT
    want = torch.stack([R.output_similarity_naive(pi[b], eps) for b in range(B)])
    d = record(f"forms/output_similarity/N{N}K{K}s{scale}e{eps}", max_abs(got, want))
    assert d <= 1e-12, d


def test_output_similarity_properties():
    pi = _pi(2, 30, 6, 25.0, seed=3, zeros=True)
    S = fb.output_similarity(pi, 1e-10)
    assert torch.isfinite(S).all()
    assert (S > 0).all() and (S <= 1).all(), "Ŝ in (0, 1]"
    diag = torch.diagonal(S, dim1=-2, dim2=-1)
    assert max_abs(diag, torch.ones_like(diag)) <= 1e-12, "Ŝ_ii = 1"
    assert max_abs(S, S.transpose(-1, -2)) > 1e-3, "Ŝ is not symmetric"
    # naive: exactly 1 on the diagonal
    Sn = R.output_similarity_naive(pi[0], 1e-10)
    assert torch.equal(torch.diagonal(Sn), torch.ones(30, dtype=DT))
    # ε bounds the KL of exactly-zero probabilities: one-hot rows i (class a) and j (class b != a):
    # KL_ij = log(1 + ε) - log(ε) ≈ 23.03, so Ŝ_ij ≈ 1 / 24.03, and it equals the naive value.
    kl = math.log(1 + 1e-10) - math.log(1e-10)
    assert abs(float(S[0, 0, 1]) - 1 / (1 + kl)) <= 1e-12
    want = torch.stack([R.output_similarity_naive(pi[b], 1e-10) for b in range(2)])
    assert max_abs(S, want) <= 1e-12


def test_output_similarity_eps_changes_result():
    """ε is not a cosmetic guard: it changes Ŝ measurably for confident Π (docs/method.md §3.3)."""
    pi = _pi(1, 30, 7, 40.0, seed=5)
    a, b = fb.output_similarity(pi, 1e-10), fb.output_similarity(pi, 1e-30)
    assert max_abs(a, b) > 1e-3


def test_output_similarity_float32_close():
    """In float32 the efficient form stays close to the float64 naive one (ε survives in fp32)."""
    pi = _pi(1, 49, 7, 20.0, seed=7)
    got = fb.output_similarity(pi.float(), 1e-10)
    want = R.output_similarity_naive(pi[0], 1e-10)
    d = record("forms/output_similarity/float32", max_abs(got[0].double(), want))
    assert d <= 1e-4, d


# ---------------------------------------------------------------------------------------------
# pruning, scaling
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.01, 0.05, 0.2, 0.45, 0.9, 1.0])
@pytest.mark.parametrize("B,N", [(1, 49), (2, 40), (1, 7)])
def test_prune_top_p_vs_loop(B, N, p):
    sim = _sim(B, N, seed=N)
    got = fb.prune_top_p(sim, p)
    assert got.dtype == torch.bool and got.shape == (B, N, N)
    want = torch.stack([R.prune_keep_naive(sim[b], p) for b in range(B)])
    assert torch.equal(got, want), f"{int((got != want).sum())} entries differ"
    # the row maximum is always kept
    arg = sim.argmax(dim=-1, keepdim=True)
    assert got.gather(-1, arg).all()
    if p == 1.0:
        assert got.all()  # cumsum(w) <= 1 in exact arithmetic: p = 1 prunes nothing


def test_prune_top_p_on_real_similarities(golden_model, golden):
    """On Ŝ of the golden FSA run, pruning keeps roughly a third to 45 % of each row."""
    import torch as _t
    out, det = R.reference_patch_logits(golden_model, _t.from_numpy(golden["pixels"]), _t.from_numpy(golden["text"]),
                                        "proxyclip", feedback=R.RefFeedback(),
                                        proxy_features=_t.from_numpy(golden["proxy"]), return_details=True)
    S = det[0]["S"]
    got = fb.prune_top_p(S[None], 0.45)[0]
    assert torch.equal(got, det[0]["keep"])
    frac = got.double().mean(dim=-1)
    assert (frac > 0.2).all() and (frac < 0.5).all(), (float(frac.min()), float(frac.max()))


@pytest.mark.parametrize("lam", [0.0, 2.3, 3.0, 4.5])
@pytest.mark.parametrize("pruned", [True, False])
def test_adapted_attention(lam, pruned):
    sim = _sim(2, 40, seed=11)
    keep = fb.prune_top_p(sim, 0.45) if pruned else None
    got = fb.adapted_attention(sim, keep, lam)
    assert got.shape == (2, 40, 40)
    want = torch.stack([R.adapted_attention_naive(sim[b], None if keep is None else keep[b], lam) for b in range(2)])
    d = record(f"forms/adapted_attention/lam{lam}/pruned{pruned}", max_abs(got, want))
    assert d <= 1e-14, d
    assert max_abs(got.sum(-1), torch.ones(2, 40, dtype=DT)) <= 1e-12
    assert (got >= 0).all()
    if pruned:
        assert (got[~keep] == 0).all(), "pruned entries must be exactly 0"
        assert (got[keep] > 0).all()


# ---------------------------------------------------------------------------------------------
# ensemble
# ---------------------------------------------------------------------------------------------

def _row_stochastic(*shape, seed, rowsum=1.0):
    g = torch.Generator().manual_seed(seed)
    return rowsum * torch.softmax(3 * torch.randn(*shape, generator=g, dtype=DT), dim=-1)


def _explicit_ensemble(a_new, a0, v, cls_token, ensemble=True):
    """Per image, per head: the explicit L x L matrix (A_new A0 + A0 A_new + A_new)/3 times v."""
    B, H, M, d = v.shape
    out = torch.zeros(B, H, M, d, dtype=DT)
    for b in range(B):
        full = R.embed_cls(a_new[b]) if cls_token else a_new[b]
        assert full.shape == (M, M)
        for h in range(H):
            if a0 is None:
                A0 = torch.eye(M, dtype=DT)
            else:
                A0 = a0[b, h if a0.shape[1] > 1 else 0]
            A = R.ensemble_matrix(full, A0) if ensemble else full
            out[b, h] = A @ v[b, h]
    return out


@pytest.mark.parametrize("cls_token", [True, False])
@pytest.mark.parametrize("a0_kind", ["per_head", "shared", "identity", "sclip_rows2"])
def test_ensemble_apply_vs_explicit(cls_token, a0_kind):
    B, H, N, d = 2, 4, 40, 16
    M = N + 1 if cls_token else N
    a_new = fb.adapted_attention(_sim(B, N, seed=1), fb.prune_top_p(_sim(B, N, seed=1), 0.45), 3.0)
    v = torch.randn(B, H, M, d, generator=torch.Generator().manual_seed(2), dtype=DT)
    if a0_kind == "per_head":
        a0 = _row_stochastic(B, H, M, M, seed=3)
    elif a0_kind == "shared":
        a0 = _row_stochastic(B, 1, M, M, seed=4)
    elif a0_kind == "sclip_rows2":
        a0 = _row_stochastic(B, H, M, M, seed=5) + _row_stochastic(B, H, M, M, seed=6)
    else:
        a0 = None
    got = fb.ensemble_apply(a_new, a0, v, cls_token=cls_token)
    want = _explicit_ensemble(a_new, a0, v, cls_token)
    assert got.shape == (B, H, M, d)
    d_ = record(f"forms/ensemble_apply/{a0_kind}/cls{cls_token}", max_abs(got, want))
    assert d_ <= 1e-12, d_
    if a0 is None:  # A0 = I  =>  A_ens = A_new exactly
        alone = _explicit_ensemble(a_new, None, v, cls_token, ensemble=False)
        assert max_abs(got, alone) <= 1e-12


@pytest.mark.parametrize("cls_token", [True, False])
def test_apply_new_vs_explicit(cls_token):
    B, H, N, d = 2, 3, 24, 8
    M = N + 1 if cls_token else N
    a_new = fb.adapted_attention(_sim(B, N, seed=8), None, 3.0)
    v = torch.randn(B, H, M, d, generator=torch.Generator().manual_seed(9), dtype=DT)
    got = fb.apply_new(a_new, v, cls_token=cls_token)
    want = _explicit_ensemble(a_new, None, v, cls_token, ensemble=False)
    assert max_abs(got, want) <= 1e-12
    if cls_token:  # CLS attends to itself only
        assert torch.equal(got[:, :, 0], v[:, :, 0])
