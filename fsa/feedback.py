"""FSA: feedback self-adaptive attention (docs/method.md §3), as pure tensor functions.

Everything here is O(N²) memory for N patches: the KL is one matrix product (the symmetric KL
too; Jensen–Shannon is summed over chunks of classes, N×N each), one N×N attention is shared by
all heads, and the ensemble is applied to values, never formed as a matrix.

Exact shortcuts (results equal up to floating-point rounding, the top-p mask equal on every entry):
Ŝ, its top-p pruning (`fsa.top_p`, no full sort) and the scaling are made a block of rows at a time;
subnormal probabilities are zeroed before Π·Gᵀ (`_without_subnormals`); ProxyCLIP's values are an
upsampling of CLIP's, so its ensemble runs on CLIP's grid through the upsampling's adjoint
(`ensemble_apply_upsampled`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .attention import apply_attention, apply_shared
from .config import SIMILARITIES, FeedbackConfig
from .sliding import linear_resize_matrix
from .top_p import Workspace, prune_top_p
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


def _without_subnormals(pi: Tensor) -> Tensor:
    """Π with its subnormal entries (below the dtype's smallest normal number, ~1.2e-38 in float32) set to 0.

    Confident class distributions have many (softmax of logits 90 apart); a product with one runs the
    CPU's slow subnormal path, which made Π·Gᵀ ten times slower. Their terms Π_ik·G_jk (|G| ≤ 24 for
    ε = 1e-10) are below 3e-37: under half an ulp of every partial sum of a KL or of h_i that is not
    itself of that size, so the sums do not move; where h_i and (Π Gᵀ)_ij are both that small, the
    KL is ~1e-37 either way and Ŝ = 1/(1 + KL) rounds to 1 both ways.
    """
    tiny = torch.finfo(pi.dtype).tiny
    small = pi < tiny
    return pi.masked_fill(small, 0.0) if bool(small.any()) else pi


#: Rows of KL / Ŝ / A_new made at a time (4 MiB of float32 per temporary, reused block to block): the full
#: N×N is written once, and top-p's per-block operations are paid on few blocks.
ROW_BLOCK_ELEMENTS = 1 << 20


def _kl_terms(pi: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(Π, G, h) of `kl_divergence`: Π in the compute dtype without subnormals, G = log(Π + ε), h = Σ_k Π G."""
    pi = pi.to(compute_dtype(pi.dtype))
    g = torch.log(pi + eps)
    pi = _without_subnormals(pi)
    return pi, g, (pi * g).sum(dim=-1, keepdim=True)  # h: (B, N, 1)


def _kl_rows(terms: tuple[Tensor, Tensor, Tensor], b: int, r0: int, r1: int, out: Optional[Tensor] = None) -> Tensor:
    """Rows r0..r1 of image b's KL matrix: (r1 − r0, N), clamped ≥ 0, diagonal 0 (written into out when given)."""
    pi, g, h = terms
    kl = torch.addmm(h[b, r0:r1], pi[b, r0:r1], g[b].T, beta=1.0, alpha=-1.0, out=out)
    kl.diagonal(offset=r0).zero_()
    return kl.clamp_(min=0.0)


def _row_blocks(n: int):
    step = max(1, ROW_BLOCK_ELEMENTS // max(1, n))
    return [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]


def kl_divergence(pi: Tensor, eps: float = 1e-10) -> Tensor:
    """KL_ij = Σ_k Π_ik (G_ik − G_jk) with G = log(Π + ε), clamped ≥ 0, diagonal exactly 0.

    pi: (B, N, K) → (B, N, N), float32 or wider. ε enters only the logarithms (the weights are Π
    itself), as in the published code. Exact form: KL_ij = h_i − (Π Gᵀ)_ij with
    h_i = Σ_k Π_ik G_ik, one (N×K)·(K×N) product instead of an N×N×K tensor (made a block of rows at a
    time, as `feedback_attention` makes it). The diagonal is 0 in exact arithmetic and set so (rounding
    would otherwise leave Ŝ_ii a hair below 1).
    """
    terms = _kl_terms(pi, eps)
    b_count, n = pi.shape[:2]
    out = terms[0].new_empty(b_count, n, n)
    for b in range(b_count):
        for r0, r1 in _row_blocks(n):
            out[b, r0:r1] = _kl_rows(terms, b, r0, r1)
    return out


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


def adapted_attention(sim: Tensor, keep: Optional[Tensor], lam: float) -> Tensor:
    """A_new = softmax_row(Ŝ·exp(λŜ)) over the kept entries, −inf elsewhere (step 5).

    sim: (B, N, N); keep: bool (B, N, N) or None (no pruning) → (B, N, N).
    """
    return _scaled_softmax(sim, None if keep is None else ~keep, lam)


def _scaled_softmax(sim: Tensor, pruned: Optional[Tensor], lam: float, out: Optional[Tensor] = None,
                    logits: Optional[Tensor] = None) -> Tensor:
    """softmax_row(Ŝ·exp(λŜ)), −inf where pruned; the same arithmetic as `adapted_attention`, in one buffer
    (`logits`, of sim's shape, when given), written into out when given."""
    logits = torch.mul(sim, lam, out=logits).exp_().mul_(sim)  # Ŝ·exp(λŜ): the product commutes, bit for bit
    if pruned is not None:
        # the pruned entries minus the dtype's largest value: below every kept entry (Ŝ·exp(λŜ) ∈ [0, 1.7e38] for
        # λ ≤ 88), so their exps are exactly 0 as with −inf and the softmax is the same bit for bit; the add runs
        # about 3× faster than masked_fill_
        logits.add_(pruned, alpha=-torch.finfo(logits.dtype).max)
    if out is None:
        return logits.softmax(dim=-1)
    return torch.ops.aten._softmax.out(logits, -1, False, out=out)  # softmax's own kernel, no copy


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


@dataclass(frozen=True)
class UpsampledValues:
    """Values that are a bilinear upsampling v = R·v_c of values on a coarser grid (ProxyCLIP's: CLIP's
    values resized to the proxy grid, `fsa.attention.resize_patch_values`).

    coarse: (B, H, gh·gw, d); coarse_grid: (gh, gw); grid: (I, J) of v. R = R_y ⊗ R_x, each the 1-D
    linear resize (align_corners=False), so F.interpolate(x) = R_y·x·R_xᵀ.
    """

    coarse: Tensor
    coarse_grid: tuple[int, int]
    grid: tuple[int, int]


def upsampling_adjoint(a: Tensor, coarse_grid: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """A·R for A (B, M, I·J) and R the bilinear upsampling from coarse_grid (gh, gw) to grid (I, J).

    Row m of A·R is R_yᵀ·A_m·R_x with A_m the row as an I×J map: a batch of (gh×I)·(I×J) products, then one
    (B·M·gh, J)·(J, gw), instead of an (I·J × gh·gw) matrix. → (B, M, gh·gw).
    """
    b, m, _ = a.shape
    (gh, gw), (i, j) = coarse_grid, grid
    rx = linear_resize_matrix(gw, j, a.dtype, a.device)  # (J, gw)
    ry = linear_resize_matrix(gh, i, a.dtype, a.device)  # (I, gh)
    t = torch.matmul(ry.T, a.reshape(b * m, i, j))  # (B·M, gh, J): R_yᵀ·A_m for every row m
    return (t.reshape(b * m * gh, j) @ rx).view(b, m, gh * gw)


def coarse_mixing(a_new: Tensor, a0: Optional[Tensor], values: UpsampledValues) -> Tensor:
    """M (B, N, gh·gw) with A_ens v = M·v_c for upsampled values v = R·v_c and one attention shared by all heads:
    M = (A_new·(A₀R) + A₀·(A_new R) + A_new R) / 3, or A_new R with a0 None (the identity: A_ens = A_new).

    A₀R and A_new R are the adjoint of the upsampling applied to each row (`upsampling_adjoint`), so the two
    N×N products run over the gh·gw coarse cells instead of H·d channels. Every row of M sums to 1 (rows of
    attention and of bilinear weights do). a_new: (B, N, N); a0: (B, 1, N, N) or None.
    """
    a_new_r = upsampling_adjoint(a_new, values.coarse_grid, values.grid)
    if a0 is None:
        return a_new_r
    a0 = a0[:, 0]
    mixed = torch.baddbmm(a_new_r, a_new, upsampling_adjoint(a0, values.coarse_grid, values.grid))
    mixed.baddbmm_(a0, a_new_r)
    return mixed.div_(3.0)


def ensemble_apply_upsampled(a_new: Tensor, a0: Optional[Tensor], values: UpsampledValues) -> Tensor:
    """`ensemble_apply` for upsampled values and one attention shared by all heads, no CLS (ProxyCLIP):
    `coarse_mixing` applied to v_c, the same sum as `ensemble_apply` in exact arithmetic.
    a_new: (B, N, N); a0: (B, 1, N, N) or None (identity) → (B, H, N, d).
    """
    return _apply_coarse(coarse_mixing(a_new, a0, values), values.coarse)


def _apply_coarse(a: Tensor, v: Tensor) -> Tensor:
    """(B, N, C) applied to every head of v (B, H, C, d) as one GEMM → (B, H, N, d)."""
    b, h, c, d = v.shape
    folded = v.to(a.dtype).permute(0, 2, 1, 3).reshape(b, c, h * d)
    return torch.bmm(a, folded).view(b, a.shape[1], h, d).permute(0, 2, 1, 3)


def feedback_attention(pi: Tensor, cfg: FeedbackConfig) -> Tensor:
    """A_new from Π (steps 3-5): Ŝ of cfg.similarity, top-p pruning when on, then the scaling.

    pi: (B, N, K) → (B, N, N); the N×N similarity and mask are freed before returning.
    """
    if cfg.similarity != "kl":
        sim = output_similarity(pi, cfg.eps, cfg.similarity)
        pruned = prune_top_p(sim, cfg.p).logical_not_() if cfg.pruning else None
        return _scaled_softmax(sim, pruned, cfg.lam)
    # Ŝ_ij = 1/(1 + KL_ij), the pruning and the scaling only need row i: a block of rows at a time, the
    # same arithmetic (and the same Ŝ as `output_similarity`) as on the whole matrix
    terms = _kl_terms(pi, cfg.eps)
    b_count, n = pi.shape[:2]
    out = terms[0].new_empty(b_count, n, n)
    ws = Workspace()  # the blocks' temporaries, reused: fresh ones would page-fault on every block
    dt, dev = out.dtype, out.device
    for b in range(b_count):
        for r0, r1 in _row_blocks(n):
            shape = (r1 - r0, n)
            sim = _kl_rows(terms, b, r0, r1, out=ws.take("sim", shape, dt, dev)).add_(1.0).reciprocal_()
            pruned = prune_top_p(sim, cfg.p, ws).logical_not_() if cfg.pruning else None
            _scaled_softmax(sim, pruned, cfg.lam, out=out[b, r0:r1], logits=ws.take("logits", shape, dt, dev))
    return out


def adapted_mixing(a_new: Tensor, a0: Optional[Tensor], cfg: FeedbackConfig, *, cls_token: bool,
                   upsampled: Optional[UpsampledValues]) -> Optional[Tensor]:
    """`coarse_mixing` M (B, N, gh·gw) with `adapt_values`(…) = M·v_c, where adapt_values works on the coarse
    grid (upsampled values, a0 shared by all heads or None, no CLS token); None elsewhere."""
    if upsampled is None or cls_token or (a0 is not None and a0.shape[1] != 1):
        return None
    return coarse_mixing(a_new, a0 if cfg.ensemble else None, upsampled)


def adapt_values(
    a_new: Tensor,
    a0: Optional[Tensor],
    v: Tensor,
    cfg: FeedbackConfig,
    *,
    cls_token: bool,
    a0_v: Optional[Tensor] = None,
    upsampled: Optional[UpsampledValues] = None,
) -> Tensor:
    """A_ens v (step 6) with cfg.ensemble on, else A_new v: shapes as in `ensemble_apply`.

    upsampled: v as an upsampling of coarser values (ProxyCLIP), with a0 shared by all heads (or None)
    and no CLS token: then the products run on the coarse values (`ensemble_apply_upsampled`).
    """
    mixing = adapted_mixing(a_new, a0, cfg, cls_token=cls_token, upsampled=upsampled)
    if mixing is not None:
        return _apply_coarse(mixing, upsampled.coarse.to(a_new.dtype))
    if cfg.ensemble:
        return ensemble_apply(a_new, a0, v, cls_token=cls_token, a0_v=a0_v)
    return apply_new(a_new, v, cls_token=cls_token)
