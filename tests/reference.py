"""Naive float64 reference of docs/method.md (§1 positional embedding, §2 last-block
variants, §3 FSA, §4 GCLIP), written straight from the text for the verification suite.

Clarity over speed, and deliberately independent of the `fsa` package:
- one image at a time, one head at a time (explicit Python loops);
- every attention matrix is materialised (the uniform attention is a real 1/L' matrix, the FSA
  ensemble is the explicit matrix (A_new A0 + A0 A_new + A_new)/3, the KL is an N x N x K tensor);
- LayerNorm, multi-head attention, patch embedding, bicubic and bilinear resizing are written out
  by hand from the weights (only GELU/QuickGELU is taken from the block's own `mlp` module);
- blocks 1..L-1 are run with the model's own modules, except for GCLIP, which needs their
  attention maps and a suppressed copy of the weights: there a hand-written block forward is used
  (tests check it equals the module's forward).

Everything is computed in float64 regardless of the model dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F  # only for the deliberate misreadings of test_golden

DT = torch.float64

BASELINE_METHODS = ("vanilla", "maskclip", "sclip", "clearclip", "naclip", "proxyclip", "gclip")

#: method -> (residual, ffn) of the last block (method.md §2 table)
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
    """FSA settings (method.md §3), our own copy so the reference does not import `fsa`."""

    lam: float = 3.0
    p: float = 0.45
    isolation: bool = True
    pruning: bool = True
    ensemble: bool = True
    feedback_scale: float = 20.0
    isolation_scale: float = 35.0
    eps: float = 1e-10


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
# elementary operations, written out
# ----------------------------------------------------------------------------------------------

def layer_norm(x: torch.Tensor, ln) -> torch.Tensor:
    w = ln.weight.detach().to(DT)
    b = ln.bias.detach().to(DT)
    mu = x.mean(dim=-1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)  # biased variance, as LayerNorm
    return (x - mu) / torch.sqrt(var + ln.eps) * w + b


def linear(x: torch.Tensor, weight, bias) -> torch.Tensor:
    y = x @ weight.detach().to(DT).T
    if bias is not None:
        y = y + bias.detach().to(DT)
    return y


def softmax_rows(s: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim, written out (rows of -inf only are not expected)."""
    m = s.max(dim=-1, keepdim=True).values
    e = torch.exp(s - m)
    return e / e.sum(dim=-1, keepdim=True)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True))


def mlp(block, x: torch.Tensor, c_proj_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    m = block.mlp
    hid = linear(x, m.c_fc.weight, m.c_fc.bias)
    hid = m.gelu(hid)  # GELU or QuickGELU: the model's own activation
    w = m.c_proj.weight if c_proj_weight is None else c_proj_weight
    return linear(hid, w, m.c_proj.bias)


def cubic_weight(t: float, a: float = -0.75) -> float:
    """Keys cubic convolution kernel (PyTorch's bicubic uses a = -0.75)."""
    t = abs(t)
    if t <= 1:
        return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0


def bicubic_resize_scale(img: torch.Tensor, scale_h: float, scale_w: float) -> torch.Tensor:
    """Bicubic resize of (C, Hi, Wi) by *scale factors* (align_corners=False), as
    F.interpolate(scale_factor=(scale_h, scale_w)) does: output size floor(Hi*scale), source
    coordinate (o + 0.5) / scale - 0.5, border indices clamped."""
    C, Hi, Wi = img.shape
    Ho, Wo = int(math.floor(Hi * scale_h)), int(math.floor(Wi * scale_w))

    def matrix(n_in, n_out, scale):
        Wm = torch.zeros(n_out, n_in, dtype=DT)
        for o in range(n_out):
            src = (o + 0.5) / scale - 0.5
            i0 = math.floor(src)
            t = src - i0
            for k in range(-1, 3):
                idx = min(max(i0 + k, 0), n_in - 1)
                Wm[o, idx] += cubic_weight(k - t)
        return Wm

    Rh, Rw = matrix(Hi, Ho, scale_h), matrix(Wi, Wo, scale_w)
    out = torch.zeros(C, Ho, Wo, dtype=DT)
    for c in range(C):
        out[c] = Rh @ img[c].to(DT) @ Rw.T
    return out


def bilinear_resize_size(img: torch.Tensor, Ho: int, Wo: int) -> torch.Tensor:
    """Bilinear resize of (C, Hi, Wi) to (Ho, Wo), align_corners=False (source coordinate
    (o + 0.5) * Hi / Ho - 0.5, clamped at 0 below, neighbour index clamped above)."""
    C, Hi, Wi = img.shape

    def matrix(n_in, n_out):
        Wm = torch.zeros(n_out, n_in, dtype=DT)
        for o in range(n_out):
            src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(math.floor(src)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            t = src - i0
            Wm[o, i0] += 1 - t
            Wm[o, i1] += t
        return Wm

    Rh, Rw = matrix(Hi, Ho), matrix(Wi, Wo)
    out = torch.zeros(C, Ho, Wo, dtype=DT)
    for c in range(C):
        out[c] = Rh @ img[c].to(DT) @ Rw.T
    return out


# ----------------------------------------------------------------------------------------------
# vision tower pieces
# ----------------------------------------------------------------------------------------------

def interpolated_pos_embed(visual, gh: int, gw: int) -> torch.Tensor:
    """(1 + gh*gw, D): CLS part unchanged, patch part bicubic with
    scale_factor = ((gh + 0.1) / g0, (gw + 0.1) / g0), no sqrt(N). On the pre-training grid
    itself the embedding is used as is (method.md: "for a grid gh x gw other than g0 x g0")."""
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


def block_forward_manual(block, x: torch.Tensor, c_proj_weight=None):
    """Standard residual block for one image x (L, D), by hand. Returns (out, [A_h])."""
    y = layer_norm(x, block.ln_1)
    qs, ks, vs = qkv_heads(block, y)
    d = qs[0].shape[1]
    s = d ** -0.5
    attns, outs = [], []
    for q, k, v in zip(qs, ks, vs):
        A = softmax_rows(q @ k.T * s)
        attns.append(A)
        outs.append(A @ v)
    o = linear(torch.cat(outs, dim=1), block.attn.out_proj.weight, block.attn.out_proj.bias)
    x = x + o
    x = x + mlp(block, layer_norm(x, block.ln_2), c_proj_weight)
    return x, attns


def head_features(visual, O: torch.Tensor) -> torch.Tensor:
    """head(O) = normalize(ln_post(O) @ proj)."""
    return l2_normalize(layer_norm(O, visual.ln_post) @ visual.proj.detach().to(DT))


def suppressed_c_proj(weight: torch.Tensor) -> torch.Tensor:
    """Copy of mlp.c_proj.weight (D_out x D_hidden) whose largest-L2-norm row is rescaled to the
    mean L2 norm of the other rows (method.md §4)."""
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
# FSA pieces (method.md §3), naive forms
# ----------------------------------------------------------------------------------------------

def kl_tensor(pi: torch.Tensor, eps: float) -> torch.Tensor:
    """KL_ij = sum_k Pi_ik (G_ik - G_jk), G = log(Pi + eps), as an N x N x K tensor summed."""
    G = torch.log(pi + eps)
    terms = pi[:, None, :] * (G[:, None, :] - G[None, :, :])  # (N, N, K)
    return terms.sum(dim=-1)


def output_similarity_naive(pi: torch.Tensor, eps: float) -> torch.Tensor:
    """Ŝ = 1 / (1 + clamp(KL, >= 0)) for one image, pi (N, K)."""
    kl = kl_tensor(pi.to(DT), eps)
    kl = torch.where(kl < 0, torch.zeros_like(kl), kl)
    return 1.0 / (1.0 + kl)


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

def _gclip_tokens(visual, x: torch.Tensor, opts: RefOptions, depth: int):
    """Blocks 1..L-1 for GCLIP (one image): suppressed copy of c_proj in the suppression blocks
    (if on), head-averaged attention of the fusion blocks captured. Returns (x, {b: Ā_b})."""
    sup_default, fus_default = default_gclip_blocks(depth)
    sup = tuple(opts.suppression_blocks) if opts.suppression_blocks is not None else sup_default
    fus = tuple(opts.fusion_blocks) if opts.fusion_blocks is not None else fus_default
    blocks = visual.transformer.resblocks
    captured = {}
    for b in range(1, depth):  # 1-based, blocks 1..L-1
        blk = blocks[b - 1]
        cw = suppressed_c_proj(blk.mlp.c_proj.weight) if (opts.channel_suppression and b in sup) else None
        x_new, attns = block_forward_manual(blk, x, c_proj_weight=cw)
        if opts.attention_fusion and b in fus:
            captured[b] = sum(attns) / len(attns)
        x = x_new
    return x, captured, fus


def reference_patch_logits(model, pixels: torch.Tensor, text_features: torch.Tensor, method: str,
                           feedback=None, proxy_features: Optional[torch.Tensor] = None,
                           options: Optional[RefOptions] = None, return_details: bool = False,
                           _misreadings: frozenset = frozenset()):
    """(B, K, h, w) cosine similarities (proxy grid I x J for proxyclip), float64.

    `feedback`: None (baseline) or anything with FeedbackConfig's field names.
    `options`: RefOptions (GCLIP blocks explicit or None = default_gclip_blocks(depth)).
    With return_details, also a list (per image) of dicts of intermediates.
    `_misreadings` is for test_golden only: deliberately wrong readings of method.md, to show that
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

    with torch.no_grad():
        tokens, gh, gw = embed(visual, pixels)
        B = tokens.shape[0]
        results, details = [], []
        for bidx in range(B):
            x = tokens[bidx]  # (L, D)
            captured = {}
            if method == "gclip":
                x, captured, fus = _gclip_tokens(visual, x, opts, depth)
            else:
                for blk in list(blocks)[:-1]:  # unchanged, batch-first modules
                    x = blk(x[None].to(blk.ln_1.weight.dtype))[0].to(DT)
            L = x.shape[0]
            y = layer_norm(x, last.ln_1)
            qs, ks, vs = qkv_heads(last, y)
            v_raw = torch.stack(vs)  # (H, L, d), before any ProxyCLIP resizing
            H = len(qs)
            d = qs[0].shape[1]
            s = d ** -0.5

            # ---- baseline attention A0 (per head) over L' tokens, values, residual input ----
            has_cls = True
            x_res = x
            if method == "vanilla":
                a0 = [softmax_rows(q @ k.T * s) for q, k in zip(qs, ks)]
            elif method == "maskclip":
                a0 = [torch.eye(L, dtype=DT) for _ in range(H)]
            elif method == "sclip":
                a0 = [softmax_rows(q @ q.T * s) + softmax_rows(k @ k.T * s) for q, k in zip(qs, ks)]
                if "sclip_mean" in _misreadings:
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
                a0 = []
                for q in qs:
                    own = softmax_rows(q @ q.T * s)
                    if opts.attention_fusion:
                        maps = []
                        for b in fus:
                            if b == depth:  # the last block's own head-averaged q k attention
                                maps.append(sum(softmax_rows(qq @ kk.T * s) for qq, kk in zip(qs, ks)) / H)
                            else:
                                maps.append(captured[b])
                        a0.append((sum(maps) + own) / (len(maps) + 1))
                    else:
                        a0.append(own)
            elif method == "proxyclip":
                has_cls = False
                assert proxy_features is not None, "proxyclip needs proxy_features"
                Fp = proxy_features[bidx].detach().to(DT)  # (C, I, J)
                C, I, J = Fp.shape
                f = l2_normalize(Fp.reshape(C, I * J).T)  # (M, C), row-major proxy grid
                S_hat = f @ f.T
                mean = S_hat.sum() / S_hat.numel()
                if "proxy_mean_offdiag" in _misreadings:
                    mean = (S_hat.sum() - torch.diagonal(S_hat).sum()) / (S_hat.numel() - S_hat.shape[0])
                S_p = opts.proxy_gamma * (S_hat - opts.proxy_beta * mean)
                S_p = torch.where(S_p < 0, torch.full_like(S_p, float("-inf")), S_p)
                A = softmax_rows(S_p)
                a0 = [A for _ in range(H)]  # shared by all heads
                # v: patch part only, (N, D) -> (D, gh, gw) -> bilinear to (D, I, J) -> (M, D)
                newv = []
                for v in vs:
                    vp = v[1:].T.reshape(d, gh, gw)
                    if "proxy_v_nearest" in _misreadings:
                        newv.append(F.interpolate(vp[None], size=(I, J), mode="nearest")[0].reshape(d, I * J).T)
                    else:
                        newv.append(bilinear_resize_size(vp, I, J).reshape(d, I * J).T)
                clip_grid_vs = [v[1:] for v in vs]
                vs = newv
                x_res = None
            Lp = vs[0].shape[0]  # L' tokens attended over
            off = 1 if has_cls else 0  # patch rows start here

            def logits_of(attns):
                O = run_last_block(last, x_res, attns, vs, residual, ffn)
                return head_features(visual, O)[off:] @ T.T  # (N', K)

            base = logits_of(a0)
            info = {"A0": a0, "baseline": base, "grid": (gh, gw), "has_cls": has_cls,
                    "q": torch.stack(qs), "k": torch.stack(ks), "v": v_raw,
                    "values": torch.stack(vs)}
            if fb is None:
                out = base
            else:
                Z = fb.feedback_scale * base
                A_u = torch.full((Lp, Lp), 1.0 / Lp, dtype=DT)  # a real uniform matrix
                if "uniform_over_clip_grid" in _misreadings and not has_cls:
                    mean_v = [v.mean(dim=0, keepdim=True).expand(Lp, -1) for v in clip_grid_vs]
                    O_u = run_last_block(last, x_res, [torch.eye(Lp, dtype=DT)] * H, mean_v, residual, ffn)
                    U = fb.isolation_scale * (head_features(visual, O_u) @ T.T)
                else:
                    U = fb.isolation_scale * logits_of([A_u for _ in range(H)])
                pi = softmax_rows(Z - U) if fb.isolation else softmax_rows(Z)
                S = output_similarity_naive(pi, fb.eps)
                keep = prune_keep_naive(S, fb.p) if fb.pruning else None
                a_new = adapted_attention_naive(S, keep, fb.lam)
                a_new_full = embed_cls(a_new) if has_cls else a_new
                if fb.ensemble:
                    attns = [ensemble_matrix(a_new_full, A0h) for A0h in a0]
                else:
                    attns = [a_new_full for _ in range(H)]
                out = logits_of(attns)
                info.update(Z=Z, U=U, Pi=pi, S=S, keep=keep, A_new=a_new, A_fsa=attns)
            if has_cls:
                out = out.T.reshape(K, gh, gw)
            else:
                out = out.T.reshape(K, I, J)
            results.append(out)
            details.append(info)
        res = torch.stack(results, dim=0)
    return (res, details) if return_details else res
