"""FSA: feedback self-adaptive attention (method.md §3), as pure tensor functions.

Everything here is O(N²) memory for N patches: the KL is one matrix product, one N×N attention
is shared by all heads, and the ensemble is applied to values, never formed as a matrix.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .attention import apply_attention, apply_shared
from .config import FeedbackConfig
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


def output_similarity(pi: Tensor, eps: float = 1e-10) -> Tensor:
    """Ŝ_ij = 1 / (1 + max(KL(Π_i ‖ Π_j), 0)) with G = log(Π + ε) (step 3).

    pi: (B, N, K) → (B, N, N), float32 or wider. KL_ij = h_i − (Π Gᵀ)_ij with h_i = Σ_k Π_ik G_ik:
    one (N×K)·(K×N) product instead of an N×N×K tensor. The diagonal is set to exactly 0 (it
    is 0 in exact arithmetic; rounding would otherwise leave Ŝ_ii a hair below 1).
    """
    pi = pi.to(compute_dtype(pi.dtype))
    g = torch.log(pi + eps)
    h = (pi * g).sum(dim=-1, keepdim=True)  # (B, N, 1)
    kl = torch.baddbmm(h, pi, g.transpose(1, 2), beta=1.0, alpha=-1.0)
    kl.diagonal(dim1=-2, dim2=-1).zero_()
    return kl.clamp_(min=0.0).add_(1.0).reciprocal_()


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
