"""Naive float64 reference of docs/method.md (§1 positional embedding, §2 last-block
variants, §3 FSA, §4 GCLIP), written straight from the text for the verification suite, and of the
FSA switches beyond the paper (FeedbackConfig.similarity, iterations, blocks; their rules are
written out in `divergence_naive` and `feedback_passes`).

Clarity over speed, and deliberately independent of the `fsa` package:
- one image at a time, one head at a time (explicit Python loops);
- every attention matrix is materialised (the uniform attention is a real 1/L' matrix, the FSA
  ensemble is the explicit matrix (A_new A0 + A0 A_new + A_new)/3, the KL is an N x N x K tensor);
- LayerNorm, multi-head attention, patch embedding, bicubic and bilinear resizing are written out
  by hand from the weights (the elementary ones in reference_ops.py; only GELU/QuickGELU is taken
  from the block's own `mlp` module);
- blocks 1..L-1 are run with the model's own modules, except for GCLIP, which needs their
  attention maps and a suppressed copy of the weights, and the feedback re-runs of blocks b0..L-1
  (FeedbackConfig.blocks): there a hand-written block forward is used (tests check it equals the
  module's forward).

Everything is computed in float64 regardless of the model dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F  # only for the deliberate misreadings of test_golden

from reference_ops import (DT, bicubic_resize_scale, bilinear_resize_size, l2_normalize,  # noqa: F401
                           layer_norm, linear, mlp, softmax_rows)

BASELINE_METHODS = ("vanilla", "maskclip", "sclip", "clearclip", "naclip", "proxyclip", "gclip")

#: method -> (residual, ffn) of the last block (docs/method.md §2 table)
LAST_BLOCK_RULE = {
    "vanilla": (True, True),
    "maskclip": (True, True),
    "sclip": (True, True),
    "clearclip": (False, False),
    "naclip": (False, False),
    "proxyclip": (False, False),
    "gclip": (False, False),
}


@dataclass
class RefFeedback:
    """FSA settings (docs/method.md §3), our own copy so the reference does not import `fsa`."""

    lam: float = 3.0
    p: float = 0.45
    isolation: bool = True
    pruning: bool = True
    ensemble: bool = True
    feedback_scale: float = 20.0
    isolation_scale: float = 35.0
    eps: float = 1e-10
    similarity: str = "kl"  #: "kl" (the paper), "sym_kl" or "js" (see divergence_naive)
    iterations: int = 1  #: feedback passes (see feedback_passes)
    blocks: Optional[Sequence[int]] = None  #: 1-based blocks that get the adapted attention; None = the last


@dataclass
class RefOptions:
    naclip_sigma: float = 5.0
    proxy_beta: float = 1.2
    proxy_gamma: float = 3.0
    channel_suppression: bool = True
    attention_fusion: bool = True
    suppression_blocks: Optional[Sequence[int]] = None  # 1-based; None = default_gclip_blocks
    fusion_blocks: Optional[Sequence[int]] = None


def default_gclip_blocks(depth: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """GCLIP block defaults "scaled from 12" (1-based): suppression = b >= ceil(2 depth / 3),
    fusion = (round(7 depth / 12), round(8 depth / 12)). depth 12 -> (8..12), (7, 8)."""
    start = math.ceil(2 * depth / 3)
    suppression = tuple(b for b in range(1, depth + 1) if b >= start)
    fusion = (round(7 * depth / 12), round(8 * depth / 12))
    return suppression, fusion


def feedback_from(cfg) -> Optional[RefFeedback]:
    """Copy any object with the FeedbackConfig field names into a RefFeedback (None stays None)."""
    if cfg is None:
        return None
    return RefFeedback(**{f: getattr(cfg, f) for f in RefFeedback.__dataclass_fields__})


# ----------------------------------------------------------------------------------------------
# vision tower pieces
# ----------------------------------------------------------------------------------------------

def interpolated_pos_embed(visual, gh: int, gw: int) -> torch.Tensor:
    """(1 + gh*gw, D): CLS part unchanged, patch part bicubic with
    scale_factor = ((gh + 0.1) / g0, (gw + 0.1) / g0), no sqrt(N). On the pre-training grid
    itself the embedding is used as is (docs/method.md: "for a grid gh x gw other than g0 x g0")."""
    pe = visual.positional_embedding.detach().to(DT)
    D = pe.shape[1]
    g0h, g0w = visual.grid_size
    assert g0h == g0w, "pre-training grid is square"
    g0 = g0h
    if (gh, gw) == (g0, g0):
        return pe
    patch = pe[1:].reshape(g0, g0, D).permute(2, 0, 1)  # (D, g0, g0), row-major grid
    new = bicubic_resize_scale(patch, (gh + 0.1) / g0, (gw + 0.1) / g0)
    assert new.shape[1:] == (gh, gw), new.shape
    return torch.cat([pe[:1], new.permute(1, 2, 0).reshape(gh * gw, D)], dim=0)


def embed(visual, pixels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Tokens (B, 1 + gh*gw, D) after CLS, positional embedding and ln_pre."""
    pixels = pixels.to(DT)
    B, C, H, W = pixels.shape
    ph, pw = visual.conv1.kernel_size
    gh, gw = H // ph, W // pw
    wconv = visual.conv1.weight.detach().to(DT)  # (D, C, ph, pw)
    patches = pixels[:, :, : gh * ph, : gw * pw].reshape(B, C, gh, ph, gw, pw)
    x = torch.einsum("bcipjq,dcpq->bijd", patches, wconv).reshape(B, gh * gw, -1)
    if visual.conv1.bias is not None:
        x = x + visual.conv1.bias.detach().to(DT)
    cls = visual.class_embedding.detach().to(DT).reshape(1, 1, -1).expand(B, 1, -1)
    x = torch.cat([cls, x], dim=1) + interpolated_pos_embed(visual, gh, gw)
    x = layer_norm(x, visual.ln_pre)
    return x, gh, gw


def qkv_heads(block, y: torch.Tensor):
    """y (L, D) of one image -> lists q[h], k[h], v[h], each (L, d)."""
    attn = block.attn
    D = y.shape[-1]
    H = attn.num_heads
    d = D // H
    packed = linear(y, attn.in_proj_weight, attn.in_proj_bias)  # (L, 3D): q | k | v
    q, k, v = packed[:, :D], packed[:, D:2 * D], packed[:, 2 * D:]
    qs = [q[:, h * d:(h + 1) * d] for h in range(H)]
    ks = [k[:, h * d:(h + 1) * d] for h in range(H)]
    vs = [v[:, h * d:(h + 1) * d] for h in range(H)]
    return qs, ks, vs


def head_attentions(block, x: torch.Tensor) -> list:
    """[softmax(q_h k_hᵀ s)] per head of `block` on the tokens x (L, D) of one image."""
    qs, ks, _ = qkv_heads(block, layer_norm(x, block.ln_1))
    s = qs[0].shape[1] ** -0.5
    return [softmax_rows(q @ k.T * s) for q, k in zip(qs, ks)]


def block_with_attention(block, x: torch.Tensor, attns: list, c_proj_weight=None) -> torch.Tensor:
    """Standard residual block for one image x (L, D) with given per-head attention matrices
    attns[h] (L x L): x + out_proj(concat_h A_h v_h), then + mlp(ln_2(.)), by hand."""
    assert isinstance(block.ls_1, torch.nn.Identity) and isinstance(block.ls_2, torch.nn.Identity), \
        "the reference has no LayerScale"
    _, _, vs = qkv_heads(block, layer_norm(x, block.ln_1))
    outs = [A @ v for A, v in zip(attns, vs)]
    x = x + linear(torch.cat(outs, dim=1), block.attn.out_proj.weight, block.attn.out_proj.bias)
    return x + mlp(block, layer_norm(x, block.ln_2), c_proj_weight)


def block_forward_manual(block, x: torch.Tensor, c_proj_weight=None):
    """Standard residual block for one image x (L, D), by hand. Returns (out, [A_h])."""
    attns = head_attentions(block, x)
    return block_with_attention(block, x, attns, c_proj_weight), attns


def head_features(visual, O: torch.Tensor) -> torch.Tensor:
    """head(O) = normalize(ln_post(O) @ proj)."""
    return l2_normalize(layer_norm(O, visual.ln_post) @ visual.proj.detach().to(DT))


def suppressed_c_proj(weight: torch.Tensor) -> torch.Tensor:
    """Copy of mlp.c_proj.weight (D_out x D_hidden) whose largest-L2-norm row is rescaled to the
    mean L2 norm of the other rows (docs/method.md §4)."""
    w = weight.detach().to(DT).clone()
    norms = torch.sqrt((w * w).sum(dim=1))
    i = int(torch.argmax(norms))
    others = torch.cat([norms[:i], norms[i + 1:]])
    w[i] = w[i] * (others.mean() / norms[i])
    return w


# ----------------------------------------------------------------------------------------------
# last block with an arbitrary attention
# ----------------------------------------------------------------------------------------------

def run_last_block(block, x_res: Optional[torch.Tensor], attns: list, vs: list, residual: bool,
                   ffn: bool) -> torch.Tensor:
    """F(A): O = [x +] out_proj(concat_h A_h v_h) [+ mlp(ln_2(.))] for one image."""
    outs = [A @ v for A, v in zip(attns, vs)]
    o = linear(torch.cat(outs, dim=1), block.attn.out_proj.weight, block.attn.out_proj.bias)
    if residual:
        o = x_res + o
    if ffn:
        o = o + mlp(block, layer_norm(o, block.ln_2))
    return o


# ----------------------------------------------------------------------------------------------
# FSA pieces (docs/method.md §3), naive forms
# ----------------------------------------------------------------------------------------------

def kl_tensor(pi: torch.Tensor, eps: float) -> torch.Tensor:
    """KL_ij = sum_k Pi_ik (G_ik - G_jk), G = log(Pi + eps), as an N x N x K tensor summed."""
    G = torch.log(pi + eps)
    terms = pi[:, None, :] * (G[:, None, :] - G[None, :, :])  # (N, N, K)
    return terms.sum(dim=-1)


def divergence_naive(pi: torch.Tensor, eps: float, kind: str = "kl") -> torch.Tensor:
    """D (N, N) of one image's pi (N, K) from N x N x K tensors, ε inside every logarithm:
    "kl": KL_ij clamped >= 0 (the paper); "sym_kl": ½(KL_ij + KL_ji) of the clamped KL;
    "js": ½ Σ_k Π_ik (log(Π_ik + ε) − log(M_ijk + ε)) + ½ Σ_k Π_jk (log(Π_jk + ε) − log(M_ijk + ε))
    with M_ij = ½(Π_i + Π_j), clamped >= 0."""
    pi = pi.to(DT)
    clamp = lambda t: torch.where(t < 0, torch.zeros_like(t), t)  # noqa: E731
    if kind in ("kl", "sym_kl"):
        kl = clamp(kl_tensor(pi, eps))
        return kl if kind == "kl" else 0.5 * (kl + kl.T)
    assert kind == "js", kind
    G = torch.log(pi + eps)
    M = 0.5 * (pi[:, None, :] + pi[None, :, :])  # (N, N, K)
    GM = torch.log(M + eps)
    first = (pi[:, None, :] * (G[:, None, :] - GM)).sum(dim=-1)  # KL(Π_i ‖ M_ij)
    second = (pi[None, :, :] * (G[None, :, :] - GM)).sum(dim=-1)  # KL(Π_j ‖ M_ij)
    return clamp(0.5 * first + 0.5 * second)


def output_similarity_naive(pi: torch.Tensor, eps: float, kind: str = "kl") -> torch.Tensor:
    """Ŝ = 1 / (1 + D) for one image, pi (N, K), D of `divergence_naive` (the paper: KL)."""
    return 1.0 / (1.0 + divergence_naive(pi, eps, kind))


def prune_keep_naive(sim: torch.Tensor, p: float) -> torch.Tensor:
    """Per-row Python loop: sort descending, w = softmax(sorted), keep while cumsum(w) <= p,
    always the first. Returns a bool (N, N) kept mask.

    p >= 1 keeps every entry: the cumsum of a probability vector never exceeds 1 in exact
    arithmetic, so rounding of the last terms (1.0000000000000002) must not prune anything."""
    N = sim.shape[0]
    if p >= 1.0:
        return torch.ones(N, sim.shape[1], dtype=torch.bool)
    keep = torch.zeros(N, sim.shape[1], dtype=torch.bool)
    for i in range(N):
        row = [float(t) for t in sim[i]]
        order = sorted(range(len(row)), key=lambda j: -row[j])  # stable descending
        vals = [row[j] for j in order]
        m = max(vals)
        ex = [math.exp(t - m) for t in vals]
        z = sum(ex)
        c = 0.0
        for r, j in enumerate(order):
            c += ex[r] / z
            if r == 0 or c <= p:
                keep[i, j] = True
            else:
                break
    return keep


def adapted_attention_naive(sim: torch.Tensor, keep: Optional[torch.Tensor], lam: float) -> torch.Tensor:
    """A_new = softmax_row(Ŝ exp(λ Ŝ) on kept entries, -inf elsewhere)."""
    logits = sim * torch.exp(lam * sim)
    if keep is not None:
        logits = torch.where(keep, logits, torch.full_like(logits, float("-inf")))
    return softmax_rows(logits)


def embed_cls(a_new: torch.Tensor) -> torch.Tensor:
    """diag(1, A_new): (N+1) x (N+1), CLS attends to itself [our rule]."""
    N = a_new.shape[0]
    full = torch.zeros(N + 1, N + 1, dtype=DT)
    full[0, 0] = 1.0
    full[1:, 1:] = a_new
    return full


def ensemble_matrix(a_new_full: torch.Tensor, a0: torch.Tensor) -> torch.Tensor:
    """A_ens = (A_new A0 + A0 A_new + A_new) / 3, explicitly."""
    return (a_new_full @ a0 + a0 @ a_new_full + a_new_full) / 3.0


# ----------------------------------------------------------------------------------------------
# the whole thing, one image at a time
# ----------------------------------------------------------------------------------------------

def gclip_sets(opts: RefOptions, depth: int, method: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """1-based (suppressed blocks, fused blocks) in effect: GCLIP's with its switches, else none."""
    if method != "gclip":
        return (), ()
    sup_default, fus_default = default_gclip_blocks(depth)
    sup = tuple(opts.suppression_blocks) if opts.suppression_blocks is not None else sup_default
    fus = tuple(opts.fusion_blocks) if opts.fusion_blocks is not None else fus_default
    return (sup if opts.channel_suppression else ()), (fus if opts.attention_fusion else ())


def _tower(visual, x: torch.Tensor, method: str, sup, fus, c_proj: dict):
    """Blocks 1..L-1 of one image: the model's own modules, except for GCLIP (hand-written blocks
    with the suppressed copies of c_proj, head-averaged attention of the fusion blocks captured).
    Returns ({b: tokens entering block b, b = 1..L}, {b: Ā_b})."""
    blocks = visual.transformer.resblocks
    depth = len(blocks)
    entering, captured = {1: x}, {}
    for b in range(1, depth):  # 1-based, blocks 1..L-1
        blk = blocks[b - 1]
        if method == "gclip":
            x, attns = block_forward_manual(blk, x, c_proj_weight=c_proj.get(b))
            if b in fus:
                captured[b] = sum(attns) / len(attns)
        else:  # unchanged, batch-first modules
            x = blk(x[None].to(blk.ln_1.weight.dtype))[0].to(DT)
        entering[b + 1] = x
    return entering, captured


@dataclass
class LastBlock:
    """The last block of one image on given tokens: the baseline's attention A0 (per head), the
    values it attends over (ProxyCLIP: resized to the proxy grid) and what F(A) needs."""

    a0: list
    vs: list
    x_res: Optional[torch.Tensor]
    has_cls: bool
    out_grid: tuple  #: (h, w) of the output: the CLIP grid, or the proxy grid I x J
    info: dict


def baseline_a0(method: str, qs: list, ks: list, grid: tuple, opts: RefOptions, proxy_one=None, fused_maps=(),
                misreadings=frozenset()) -> list:
    """The baseline's last-block attention A0 per head (docs/method.md §2 table) of one image from the
    last block's q, k per head (L x d each); ProxyCLIP's (M x M over the proxy grid) from proxy_one
    (C, I, J); GCLIP fuses `fused_maps` (its blocks' head-averaged attention) when there are any."""
    gh, gw = grid
    L, d = qs[0].shape
    H = len(qs)
    s = d ** -0.5
    if method == "vanilla":
        a0 = [softmax_rows(q @ k.T * s) for q, k in zip(qs, ks)]
    elif method == "maskclip":
        a0 = [torch.eye(L, dtype=DT) for _ in range(H)]
    elif method == "sclip":
        a0 = [softmax_rows(q @ q.T * s) + softmax_rows(k @ k.T * s) for q, k in zip(qs, ks)]
        if "sclip_mean" in misreadings:
            a0 = [A / 2 for A in a0]
    elif method == "clearclip":
        a0 = [softmax_rows(q @ q.T * s) for q in qs]
    elif method == "naclip":
        sigma = opts.naclip_sigma
        omega = torch.zeros(L, L, dtype=DT)
        pos = [(r, c) for r in range(gh) for c in range(gw)]  # row-major patch order
        for i, (ri, ci) in enumerate(pos):
            for j, (rj, cj) in enumerate(pos):
                omega[1 + i, 1 + j] = math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * sigma ** 2))
        a0 = [softmax_rows(k @ k.T * s + omega) for k in ks]
    elif method == "gclip":
        own = [softmax_rows(q @ q.T * s) for q in qs]
        a0 = [(sum(fused_maps) + A) / (len(fused_maps) + 1) for A in own] if len(fused_maps) else own
    elif method == "proxyclip":
        assert proxy_one is not None, "proxyclip needs proxy_features"
        Fp = proxy_one.detach().to(DT)  # (C, I, J)
        C, I, J = Fp.shape
        f = l2_normalize(Fp.reshape(C, I * J).T)  # (M, C), row-major proxy grid
        S_hat = f @ f.T
        mean = S_hat.sum() / S_hat.numel()
        if "proxy_mean_offdiag" in misreadings:
            mean = (S_hat.sum() - torch.diagonal(S_hat).sum()) / (S_hat.numel() - S_hat.shape[0])
        S_p = opts.proxy_gamma * (S_hat - opts.proxy_beta * mean)
        S_p = torch.where(S_p < 0, torch.full_like(S_p, float("-inf")), S_p)
        A = softmax_rows(S_p)
        a0 = [A for _ in range(H)]  # shared by all heads
    else:
        raise AssertionError(method)
    return a0


def last_block(visual, x: torch.Tensor, method: str, opts: RefOptions, grid: tuple, proxy_one, captured: dict,
               fus, misreadings=frozenset()) -> LastBlock:
    """Method.md §2 table on the tokens x (L, D) entering the last block (one image); captured: the
    head-averaged attention of GCLIP's fusion blocks `fus` before the last."""
    gh, gw = grid
    last = visual.transformer.resblocks[-1]
    depth = len(visual.transformer.resblocks)
    qs, ks, vs = qkv_heads(last, layer_norm(x, last.ln_1))
    H, d = len(qs), qs[0].shape[1]
    s = d ** -0.5
    fused = [captured[b] if b != depth else sum(softmax_rows(q @ k.T * s) for q, k in zip(qs, ks)) / H
             for b in fus]  # b == depth: the last block's own head-averaged q k attention
    a0 = baseline_a0(method, qs, ks, grid, opts, proxy_one, fused, misreadings)
    info = {"q": torch.stack(qs), "k": torch.stack(ks), "v": torch.stack(vs)}  # before any resizing
    if method != "proxyclip":
        return LastBlock(a0, vs, x, True, (gh, gw), info)
    # v: patch part only, (N, D) -> (D, gh, gw) -> bilinear to (D, I, J) -> (M, D)
    I, J = proxy_one.shape[-2:]
    newv = []
    for v in vs:
        vp = v[1:].T.reshape(d, gh, gw)
        if "proxy_v_nearest" in misreadings:
            newv.append(F.interpolate(vp[None], size=(I, J), mode="nearest")[0].reshape(d, I * J).T)
        else:
            newv.append(bilinear_resize_size(vp, I, J).reshape(d, I * J).T)
    info["clip_grid_vs"] = [v[1:] for v in vs]
    return LastBlock(a0, newv, None, False, (I, J), info)


def feedback_passes(fb: RefFeedback, visual, method: str, opts: RefOptions, grid: tuple, proxy_one, entering: dict,
                    captured: dict, sup, fus, c_proj: dict, base: LastBlock, logits_of, z0: torch.Tensor,
                    U: Optional[torch.Tensor]):
    """FSA's passes for one image; z0 (N', K) the baseline's cosines, U the isolation logits (None: off).

    Rules beyond the paper (`iterations`, `blocks`; the paper: one pass into the last block):
    - pass t adapts with Π_t = softmax(feedback_scale·Z_{t−1} − U), Z_{t−1} the cosines of pass t−1's
      output (Z_0 the baseline's); U is the baseline's, once;
    - one A_new per pass, shared by every adapted block; A_ens always mixes A_new with the A0 of the
      block on the tokens of this pass (the last block alone: the baseline's A0);
    - b0 = the first adapted block < L: each pass re-runs blocks b0..L from the baseline's tokens
      entering b0. An adapted block b < L uses per head (diag(1, A_new) A0 + A0 diag(1, A_new) +
      diag(1, A_new))/3 (diag(1, A_new) alone with the ensemble off), A0 = softmax(q kᵀ s) on the
      re-run tokens, and keeps its residual and FFN; other blocks run unchanged; the last block is
      the method's (§2) on the re-run tokens. GCLIP keeps its suppressed c_proj in every block and
      fuses the maps of its fusion blocks as computed in the pass (the block's A0, adapted or not).
    Returns (final cosines, [per pass: dict Z, Pi, S, keep, A_new, blocks {b: (A0 list, A_fsa list)}]).
    """
    blocks = visual.transformer.resblocks
    depth = len(blocks)
    adapted = tuple(sorted(fb.blocks)) if fb.blocks else (depth,)
    assert all(1 <= b <= depth for b in adapted), adapted
    assert method != "proxyclip" or adapted == (depth,), "proxyclip adapts the last block only"

    def mix(a_full, a0):
        return [ensemble_matrix(a_full, A) for A in a0] if fb.ensemble else [a_full for _ in a0]

    z, passes = z0, []
    for _ in range(fb.iterations):
        Z = fb.feedback_scale * z
        pi = softmax_rows(Z - U) if U is not None else softmax_rows(Z)
        S = output_similarity_naive(pi, fb.eps, fb.similarity)
        keep = prune_keep_naive(S, fb.p) if fb.pruning else None
        a_new = adapted_attention_naive(S, keep, fb.lam)
        per_block = {}
        lb = base
        if adapted[0] < depth:  # re-run blocks b0..L-1, then the last block on their tokens
            x = entering[adapted[0]]
            maps = {b: m for b, m in captured.items() if b < adapted[0]}
            for b in range(adapted[0], depth):
                a0 = head_attentions(blocks[b - 1], x)
                if b in fus:
                    maps[b] = sum(a0) / len(a0)
                attns = a0
                if b in adapted:
                    attns = mix(embed_cls(a_new), a0)
                    per_block[b] = (a0, attns)
                x = block_with_attention(blocks[b - 1], x, attns, c_proj.get(b))
            lb = last_block(visual, x, method, opts, grid, proxy_one, maps, fus)
        attns = lb.a0
        if depth in adapted:
            attns = mix(embed_cls(a_new) if lb.has_cls else a_new, lb.a0)
            per_block[depth] = (lb.a0, attns)
        z = logits_of(lb, attns)
        passes.append(dict(Z=Z, Pi=pi, S=S, keep=keep, A_new=a_new, A_fsa=attns, blocks=per_block))
    return z, passes


def reference_patch_logits(model, pixels: torch.Tensor, text_features: torch.Tensor, method: str,
                           feedback=None, proxy_features: Optional[torch.Tensor] = None,
                           options: Optional[RefOptions] = None, return_details: bool = False,
                           _misreadings: frozenset = frozenset()):
    """(B, K, h, w) cosine similarities (proxy grid I x J for proxyclip), float64.

    `feedback`: None (baseline) or anything with FeedbackConfig's field names (similarity,
    iterations and blocks as in `divergence_naive` and `feedback_passes`).
    `options`: RefOptions (GCLIP blocks explicit or None = default_gclip_blocks(depth)).
    With return_details, also a list (per image) of dicts of intermediates (those of the last pass,
    and "passes": every pass's).
    `_misreadings` is for test_golden only: deliberately wrong readings of docs/method.md, to show that
    the golden file tells them apart ("sclip_mean", "maskclip_no_residual_ffn",
    "proxy_mean_offdiag", "uniform_over_clip_grid", "proxy_v_nearest").
    """
    assert method in BASELINE_METHODS, method
    fb = feedback_from(feedback)
    opts = options if options is not None else RefOptions()
    visual = model.visual
    T = l2_normalize(text_features.detach().to(DT))  # already normalised; harmless
    K = T.shape[0]
    blocks = visual.transformer.resblocks
    depth = len(blocks)
    last = blocks[-1]
    residual, ffn = LAST_BLOCK_RULE[method]
    if method == "maskclip" and "maskclip_no_residual_ffn" in _misreadings:
        residual, ffn = False, False
    sup, fus = gclip_sets(opts, depth, method)
    c_proj = {b: suppressed_c_proj(blocks[b - 1].mlp.c_proj.weight) for b in sup if b < depth}

    def logits_of(lb: LastBlock, attns):
        """F(A) -> head -> cosines (N', K) of the patch tokens."""
        O = run_last_block(last, lb.x_res, attns, lb.vs, residual, ffn)
        return head_features(visual, O)[1 if lb.has_cls else 0:] @ T.T

    with torch.no_grad():
        tokens, gh, gw = embed(visual, pixels)
        B = tokens.shape[0]
        results, details = [], []
        for bidx in range(B):
            proxy_one = proxy_features[bidx] if method == "proxyclip" else None
            entering, captured = _tower(visual, tokens[bidx], method, sup, fus, c_proj)
            lb = last_block(visual, entering[depth], method, opts, (gh, gw), proxy_one, captured, fus, _misreadings)
            base = logits_of(lb, lb.a0)
            info = {"A0": lb.a0, "baseline": base, "grid": (gh, gw), "has_cls": lb.has_cls,
                    "q": lb.info["q"], "k": lb.info["k"], "v": lb.info["v"], "values": torch.stack(lb.vs)}
            if fb is None:
                out = base
            else:
                Lp = lb.vs[0].shape[0]  # L' tokens attended over
                H = len(lb.vs)
                if not fb.isolation:
                    U = None
                elif "uniform_over_clip_grid" in _misreadings and not lb.has_cls:
                    mean_v = [v.mean(dim=0, keepdim=True).expand(Lp, -1) for v in lb.info["clip_grid_vs"]]
                    O_u = run_last_block(last, lb.x_res, [torch.eye(Lp, dtype=DT)] * H, mean_v, residual, ffn)
                    U = fb.isolation_scale * (head_features(visual, O_u) @ T.T)
                else:
                    A_u = torch.full((Lp, Lp), 1.0 / Lp, dtype=DT)  # a real uniform matrix
                    U = fb.isolation_scale * logits_of(lb, [A_u for _ in range(H)])
                out, passes = feedback_passes(fb, visual, method, opts, (gh, gw), proxy_one, entering, captured,
                                              sup, fus, c_proj, lb, logits_of, base, U)
                info.update({k: v for k, v in passes[-1].items() if k != "blocks"}, U=U, passes=passes)
            results.append(out.T.reshape(K, *lb.out_grid))
            details.append(info)
        res = torch.stack(results, dim=0)
    return (res, details) if return_details else res
