"""FSA: feedback self-adaptive attention (method.md §3), as pure tensor functions.

Everything here is O(N²) memory for N patches: the KL is one matrix product (the symmetric KL
too; Jensen–Shannon is summed over chunks of classes, N×N each), one N×N attention is shared by
all heads, and the ensemble is applied to values, never formed as a matrix.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .attention import apply_attention, apply_shared
from .config import SIMILARITIES, FeedbackConfig
from .vision import compute_dtype


def class_distribution(z_cos: Tensor, u_cos: Optional[Tensor], cfg: FeedbackConfig) -> Tensor:
    """Π = softmax_K(Z − U) (steps 1-2); Π = softmax(Z) with isolation off.

    z_cos: (B, N, K) cosines of the baseline's patch features with the text; u_cos: the same for
    uniform attention, (B, N, K) or (B, 1, K) (rows are equal without a residual). → (B, N, K).
    """
    dt = compute_dtype(z_cos.dtype)
    logits = cfg.feedback_scale * z_cos.to(dt)
    if cfg.isolation:
        if u_cos is None:
            raise ValueError("isolation needs the uniform-attention cosines")
        logits = logits - cfg.isolation_scale * u_cos.to(dt)
    return logits.softmax(dim=-1)


def kl_divergence(pi: Tensor, eps: float = 1e-10) -> Tensor:
    """KL_ij = Σ_k Π_ik (G_ik − G_jk) with G = log(Π + ε), clamped ≥ 0, diagonal exactly 0.

    pi: (B, N, K) → (B, N, N), float32 or wider. ε enters only the logarithms (the weights are Π
    itself), as in the published code. Exact form: KL_ij = h_i − (Π Gᵀ)_ij with
    h_i = Σ_k Π_ik G_ik, one (N×K)·(K×N) product instead of an N×N×K tensor. The diagonal is 0 in
    exact arithmetic and set so (rounding would otherwise leave Ŝ_ii a hair below 1).
    """
    pi = pi.to(compute_dtype(pi.dtype))
    g = torch.log(pi + eps)
    h = (pi * g).sum(dim=-1, keepdim=True)  # (B, N, 1)
    kl = torch.baddbmm(h, pi, g.transpose(1, 2), beta=1.0, alpha=-1.0)
    kl.diagonal(dim1=-2, dim2=-1).zero_()
    return kl.clamp_(min=0.0)


def symmetric_kl_divergence(pi: Tensor, eps: float = 1e-10) -> Tensor:
    """½(KL_ij + KL_ji) of `kl_divergence` (same ε, each KL clamped ≥ 0): exactly symmetric.

    pi: (B, N, K) → (B, N, N). Exact form: ½(h_i + h_j − (Π Gᵀ)_ij − (Π Gᵀ)_ji), i.e. the KL
    matrix plus its transpose: O(N²) memory. Floating-point addition commutes, so entry (i, j)
    and (j, i) are the same sum bit for bit; the diagonal is exactly 0.
    """
    kl = kl_divergence(pi, eps)
    return (kl + kl.transpose(1, 2)).mul_(0.5)


#: Elements of the (B, N, N, c) chunk `js_divergence` works on at once (16 MiB in float32):
#: bounds its memory by max(B·N², this) elements per temporary, i.e. O(N²).
JS_CHUNK_ELEMENTS = 1 << 22


def js_divergence(pi: Tensor, eps: float = 1e-10, *, chunk_elements: int = JS_CHUNK_ELEMENTS) -> Tensor:
    """Jensen–Shannon JS_ij = ½KL(Π_i‖M_ij) + ½KL(Π_j‖M_ij), M_ij = ½(Π_i + Π_j), clamped ≥ 0.

    pi: (B, N, K) → (B, N, N), float32 or wider; exactly symmetric, diagonal exactly 0.
    With the paper's ε convention (ε inside every logarithm, the weights unchanged):
        JS_ij = ½(h_i + h_j) − c_ij,  h_i = Σ_k Π_ik log(Π_ik + ε),  c_ij = Σ_k M_ijk log(M_ijk + ε).
    x ↦ x·log(x + ε) is convex for ε > 0, so JS ≥ 0 also with ε (Jensen), and JS_ii = 0; the
    bound JS ≤ log 2 (up to ε) makes Ŝ = 1/(1 + JS) lie in about [0.59, 1], narrower than KL's.
    c_ij has no matrix-product form (log M does not factor), so it is summed over chunks of the
    classes: each chunk is a (B, N, N, c) tensor with B·N²·c ≤ max(B·N², chunk_elements), i.e.
    one class at a time for large N. O(N²) memory, O(N²K) time. The upper triangle is mirrored
    onto the lower so that symmetry is exact whatever the reduction order.
    """
    pi = pi.to(compute_dtype(pi.dtype))
    b, n, k = pi.shape
    h = (pi * torch.log(pi + eps)).sum(dim=-1)  # (B, N)
    step = max(1, min(k, chunk_elements // max(1, b * n * n)))
    cross = pi.new_zeros(b, n, n)
    for k0 in range(0, k, step):
        p = pi[..., k0:k0 + step]
        m = (p.unsqueeze(2) + p.unsqueeze(1)).mul_(0.5)  # (B, N, N, c): M_ijk
        cross += m.add(eps).log_().mul_(m).sum(dim=-1)
        del m
    js = (h.unsqueeze(2) + h.unsqueeze(1)).mul_(0.5).sub_(cross)
    del cross
    js = js.triu_()
    js += js.triu(1).transpose(1, 2)
    js.diagonal(dim1=-2, dim2=-1).zero_()
    return js.clamp_(min=0.0)


def output_similarity(pi: Tensor, eps: float = 1e-10, kind: str = "kl") -> Tensor:
    """Ŝ_ij = 1 / (1 + D_ij) ∈ (0, 1], Ŝ_ii = 1 (step 3), D of FeedbackConfig.similarity `kind`.

    pi: (B, N, K) → (B, N, N), float32 or wider. kind "kl" (the paper; not symmetric):
    D = `kl_divergence`; "sym_kl": D = `symmetric_kl_divergence`; "js": D = `js_divergence`.
    All share G = log(Π + ε) with ε only inside the logarithms; none forms an N×N×K tensor.
    """
    if kind == "kl":
        d = kl_divergence(pi, eps)
    elif kind == "sym_kl":
        d = symmetric_kl_divergence(pi, eps)
    elif kind == "js":
        d = js_divergence(pi, eps)
    else:
        raise ValueError(f"unknown similarity {kind!r}; choose one of {', '.join(SIMILARITIES)}")
    return d.add_(1.0).reciprocal_()


def prune_top_p(sim: Tensor, p: float) -> Tensor:
    """Kept mask of the confidence-based pruning (step 4).

    sim: (B, N, N) → bool (B, N, N). Each row is sorted descending; w = softmax(sorted); entries
    are kept while cumsum(w) ≤ p, the first always.
    """
    values, order = torch.sort(sim, dim=-1, descending=True, stable=True)
    # A cumulative probability is at most 1; rounding can push it a hair above, which would prune
    # entries at p = 1.
    keep_sorted = values.softmax(dim=-1).cumsum_(dim=-1).clamp_(max=1.0) <= p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def adapted_attention(sim: Tensor, keep: Optional[Tensor], lam: float) -> Tensor:
    """A_new = softmax_row(Ŝ·exp(λŜ)) over the kept entries, −inf elsewhere (step 5).

    sim: (B, N, N); keep: bool (B, N, N) or None (no pruning) → (B, N, N).
    """
    logits = sim * torch.exp(lam * sim)
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits.softmax(dim=-1)


def apply_new(a_new: Tensor, v: Tensor, *, cls_token: bool) -> Tensor:
    """A_new v with A_new embedded as diag(1, A_new) when token 0 is CLS.

    a_new: (B, N, N); v: (B, H, M, d) with M = N (+1 with CLS) → (B, H, M, d).
    """
    v = v.to(a_new.dtype)
    if not cls_token:
        return apply_shared(a_new, v)
    return torch.cat([v[:, :, :1], apply_shared(a_new, v[:, :, 1:])], dim=2)


def ensemble_apply(
    a_new: Tensor,
    a0: Optional[Tensor],
    v: Tensor,
    *,
    cls_token: bool,
    a0_v: Optional[Tensor] = None,
) -> Tensor:
    """A_ens v = (A_new(A₀v) + A₀(A_new v) + A_new v) / 3 (step 6), never forming A_new A₀.

    Three N×N by N×(H·d) products (A₀v comes from the baseline) instead of N³ matrix products and
    one N×N matrix per head.
    a_new: (B, N, N); a0: (B, H or 1, M, M) or None for the identity (then A_ens = A_new exactly);
    v: (B, H, M, d); a0_v: A₀ v if already computed. → (B, H, M, d) in float32 or wider.
    """
    new_v = apply_new(a_new, v, cls_token=cls_token)
    if a0 is None:
        return new_v
    a0_v = apply_attention(a0, v) if a0_v is None else a0_v.to(new_v.dtype)
    return (apply_new(a_new, a0_v, cls_token=cls_token) + apply_attention(a0, new_v) + new_v) / 3.0


def feedback_attention(pi: Tensor, cfg: FeedbackConfig) -> Tensor:
    """A_new from Π (steps 3-5): Ŝ of cfg.similarity, top-p pruning when on, then the scaling.

    pi: (B, N, K) → (B, N, N); the N×N similarity and mask are freed before returning.
    """
    sim = output_similarity(pi, cfg.eps, cfg.similarity)
    keep = prune_top_p(sim, cfg.p) if cfg.pruning else None
    return adapted_attention(sim, keep, cfg.lam)


def adapt_values(
    a_new: Tensor,
    a0: Optional[Tensor],
    v: Tensor,
    cfg: FeedbackConfig,
    *,
    cls_token: bool,
    a0_v: Optional[Tensor] = None,
) -> Tensor:
    """A_ens v (step 6) with cfg.ensemble on, else A_new v: shapes as in `ensemble_apply`."""
    if cfg.ensemble:
        return ensemble_apply(a_new, a0, v, cls_token=cls_token, a0_v=a0_v)
    return apply_new(a_new, v, cls_token=cls_token)
