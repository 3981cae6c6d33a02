"""Elementary operations of the naive float64 reference (tests/reference.py), written out by hand:
LayerNorm, linear maps, softmax, L2 normalisation, the MLP, bicubic and bilinear resizing.
No `fsa` import; everything in float64."""
from __future__ import annotations

import math
from typing import Optional

import torch

DT = torch.float64


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
