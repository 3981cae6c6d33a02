"""Last-block attention of each baseline (docs/method.md §2, §4): pure tensor functions.

The attention is kept as a matrix `A₀` (or None for MaskCLIP's identity) together with the values
it mixes, so that FSA can reuse it (`A₀ v`, `A₀ (A_new v)`) without ever forming products of
two N×N matrices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import MethodOptions, check_method
from .vision import compute_dtype, softmax_attention

@dataclass
class BaseAttention:
    """A baseline's last-block attention and the values it mixes.

    weights: (B, H or 1, M, M) in float32 or wider, or None for the identity (MaskCLIP); a head
    axis of 1 means one matrix shared by all heads. values: (B, H, M, d). cls_token: token 0 is
    CLS and M = 1 + gh·gw; otherwise M = gh·gw patches. grid: (gh, gw) of the patch tokens.
    """

    weights: Optional[Tensor]
    values: Tensor
    cls_token: bool
    grid: tuple[int, int]

    def apply(self, v: Tensor) -> Tensor:
        """A₀ v for v (B, H, M, d), in float32 or wider."""
        return apply_attention(self.weights, v)


def apply_attention(weights: Optional[Tensor], v: Tensor) -> Tensor:
    """weights @ v per head. weights (B, H or 1, M, M) or None (identity); v (B, H, M, d)."""
    v = v.to(compute_dtype(v.dtype))
    if weights is None:
        return v
    if weights.shape[1] == 1 and v.shape[1] > 1:
        return apply_shared(weights[:, 0], v)
    return torch.matmul(weights, v.to(weights.dtype))


def apply_shared(a: Tensor, v: Tensor) -> Tensor:
    """One (B, M, M) matrix applied to every head of v (B, H, M, d) as a single GEMM.

    Broadcasting `a[:, None] @ v` would copy `a` once per head; folding the heads into the
    columns keeps it one (M×M)·(M×H·d) product.
    """
    b, h, m, d = v.shape
    folded = v.to(a.dtype).permute(0, 2, 1, 3).reshape(b, m, h * d)
    return torch.bmm(a, folded).view(b, m, h, d).permute(0, 2, 1, 3)


def gaussian_neighbourhood(grid: tuple[int, int], sigma: float, *, cls_token: bool, dtype=torch.float32,
                           device=None) -> Tensor:
    """NACLIP's Ω: exp(-‖p_i - p_j‖² / 2σ²) over patch grid positions (in patches).

    Returns (M, M) with M = gh·gw (+1 with a zero CLS row and column when cls_token).
    """
    gh, gw = grid
    rows = torch.arange(gh, device=device, dtype=dtype).repeat_interleave(gw)
    cols = torch.arange(gw, device=device, dtype=dtype).repeat(gh)
    pos = torch.stack([rows, cols], dim=-1)
    omega = torch.exp(-torch.cdist(pos, pos).square() / (2.0 * sigma**2))
    if cls_token:
        omega = F.pad(omega, (1, 0, 1, 0))
    return omega


def proxy_affinity(proxy_features: Tensor, beta: float, gamma: float) -> Tensor:
    """ProxyCLIP's attention from proxy features.

    proxy_features: (B, C, I, J) → (B, 1, I·J, I·J), shared by all heads:
    softmax(γ(Ŝ − β·mean Ŝ)) with Ŝ the cosine similarity, entries below zero set to −inf. The mean
    is per image (the published code takes it over the batch, which makes results depend on how
    windows are batched). A row with no entry left keeps its diagonal, instead of NaN: this only
    happens for (near) constant features, e.g. a flat image, where β·mean Ŝ ≥ 1.
    """
    feats = F.normalize(proxy_features.flatten(2).transpose(1, 2).to(compute_dtype(proxy_features.dtype)), dim=-1)
    sim = torch.bmm(feats, feats.transpose(1, 2))
    sim = gamma * (sim - beta * sim.mean(dim=(1, 2), keepdim=True))
    sim = sim.masked_fill(sim < 0, float("-inf"))
    dead = torch.isinf(sim).all(dim=-1)
    if dead.any():
        diag = torch.diagonal(sim, dim1=-2, dim2=-1)
        diag.copy_(torch.where(dead, torch.zeros_like(diag), diag))
    return sim.softmax(dim=-1).unsqueeze(1)


def resize_patch_values(v: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Patch values on the CLIP grid resized (bilinear, align_corners=False) to the proxy grid.

    v: (B, H, 1 + gh·gw, d) with CLS first → (B, H, I·J, d).
    """
    b, h, _, d = v.shape
    gh, gw = grid
    patches = v[:, :, 1:].reshape(b * h, gh, gw, d).permute(0, 3, 1, 2)
    if (gh, gw) != tuple(size):
        patches = F.interpolate(patches, size=size, mode="bilinear", align_corners=False)
    return patches.permute(0, 2, 3, 1).reshape(b, h, size[0] * size[1], d)


def attention_weights(
    method: str,
    q: Tensor,
    k: Tensor,
    grid: tuple[int, int],
    *,
    proxy_features: Optional[Tensor] = None,
    fused_maps: Sequence[Tensor] = (),
    options: Optional[MethodOptions] = None,
) -> Optional[Tensor]:
    """A₀ of `method` from the last block's q, k (B, H, L, d).

    Returns (B, H, L, L); (B, 1, I·J, I·J) for proxyclip; None for maskclip (identity).
    fused_maps: GCLIP's head-averaged earlier-block maps (B, L, L) to fuse (may be empty).
    """
    method = check_method(method)
    options = options or MethodOptions()
    if method == "vanilla":
        return softmax_attention(q, k)
    if method == "maskclip":
        return None
    if method == "sclip":
        return softmax_attention(q, q) + softmax_attention(k, k)
    if method == "clearclip":
        return softmax_attention(q, q)
    if method == "naclip":
        omega = gaussian_neighbourhood(grid, options.naclip_sigma, cls_token=True, dtype=compute_dtype(k.dtype),
                                       device=k.device)
        return softmax_attention(k, k, omega)
    if method == "proxyclip":
        if proxy_features is None:
            raise ValueError("proxyclip needs proxy_features (B, C, I, J)")
        if proxy_features.shape[0] != q.shape[0]:
            raise ValueError(f"proxy_features batch {proxy_features.shape[0]} != pixels batch {q.shape[0]}")
        return proxy_affinity(proxy_features, options.proxy_beta, options.proxy_gamma)
    # gclip: ClearCLIP's q-q attention, averaged with the fused earlier maps.
    qq = softmax_attention(q, q)
    if not fused_maps:
        return qq
    total = qq
    for m in fused_maps:
        total = total + m.to(qq.dtype).unsqueeze(1)
    return total / (len(fused_maps) + 1)


def baseline_attention(
    method: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: tuple[int, int],
    *,
    proxy_features: Optional[Tensor] = None,
    fused_maps: Sequence[Tensor] = (),
    options: Optional[MethodOptions] = None,
) -> BaseAttention:
    """`BaseAttention` of a method from the last block's q, k, v (B, H, L, d)."""
    method = check_method(method)
    weights = attention_weights(method, q, k, grid, proxy_features=proxy_features, fused_maps=fused_maps,
                                options=options)
    if method == "proxyclip":
        size = (int(proxy_features.shape[-2]), int(proxy_features.shape[-1]))
        return BaseAttention(weights, resize_patch_values(v, grid, size), cls_token=False, grid=size)
    return BaseAttention(weights, v, cls_token=True, grid=grid)
