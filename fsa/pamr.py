"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as NACLIP uses it.

The rule of the published implementation that NACLIP ships (sinahmr/NACLIP ``pamr.py``, taken from
visinf/1-stage-wseg ``models/mods/pamr.py``), for a guide image ``I`` (B, C, H, W) and masks ``M``:

- Neighbours of a pixel p: for each dilation d, the 8 pixels p + (dy, dx) with dy, dx in {-d, 0, d},
  not both 0 (the pixel itself is not a neighbour); outside the image the border pixel is used
  (``F.pad(mode="replicate")``). With dilations (8, 16) that is 16 neighbours.
- Per channel c, ``σ_c(p)`` = the standard deviation (unbiased, torch's default) of the 9 values of
  ``I_c`` on each dilation's 3×3 grid, p included, all dilations pooled (9·|D| values).
- Affinity ``a(p, q) = softmax_q( mean_c( −|I_c(q) − I_c(p)| / (1e-8 + 0.1·σ_c(p)) ) )`` over the
  neighbours q of p; computed once from the image.
- Each iteration replaces every mask value by the affinity-weighted sum of its neighbours' values:
  ``M(p) ← Σ_q a(p, q) M(q)``.

The affinity is invariant to a per-channel affine change of the guide (up to the 1e-8), so a
normalised and a 0-255 guide give the same result except on flat regions.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

#: The published constants: ``-|ΔI| / (_STD_EPS + _STD_SCALE · σ)``.
_STD_EPS = 1e-8
_STD_SCALE = 0.1


def _neighbour_shifts(x: Tensor, dilations: Sequence[int]):
    """Yield (B, C, H, W) views of ``x`` moved so that pixel p holds x(p + offset), one per neighbour
    (8 per dilation, in a fixed order), with replicated borders (indices clamped to the image)."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    for d in dilations:
        for dy in (-d, 0, d):
            shifted_rows = x.index_select(-2, (rows + dy).clamp(0, h - 1))
            for dx in (-d, 0, d):
                if dy == 0 and dx == 0:
                    continue
                yield shifted_rows.index_select(-1, (cols + dx).clamp(0, w - 1))


def _affinity(image: Tensor, dilations: Sequence[int] = (8, 16)) -> Tensor:
    """(B, C, H, W) guide image -> (B, 8·len(dilations), H, W) affinity to each neighbour (sums to 1
    over dim 1; neighbours in :func:`_neighbour_shifts`' order). Computed in the image's dtype."""
    neighbours = torch.stack(list(_neighbour_shifts(image, dilations)), dim=2)  # (B, C, P, H, W)
    centre = image.unsqueeze(2)
    grid_values = torch.cat([centre.expand(-1, -1, len(dilations), -1, -1), neighbours], dim=2)
    sigma = grid_values.std(dim=2, keepdim=True)  # (B, C, 1, H, W), the centre once per dilation
    logits = (-(neighbours - centre).abs() / (_STD_EPS + _STD_SCALE * sigma)).mean(dim=1)  # (B, P, H, W)
    return logits.softmax(dim=1)


def pamr(image: Tensor, masks: Tensor, *, iterations: int = 10, dilations: Sequence[int] = (8, 16)) -> Tensor:
    """Pixel-adaptive mask refinement of ``masks`` guided by ``image`` (see the module docstring).

    image: (B, 3, H, W) guide (any channel count works; NACLIP passes its normalised CLIP input);
    masks: (B, K, H, W) per-class maps at the same size (NACLIP: the cosine logits).
    Returns (B, K, H, W) in ``masks``' dtype; computed in float32 or wider (float64 inputs stay
    float64). Memory O(B·H·W·neighbours + B·K·H·W): the neighbours of the masks are summed one by one.
    ``iterations=0`` returns the masks unchanged.
    """
    if image.ndim != 4 or masks.ndim != 4:
        raise ValueError(f"expected image (B, 3, H, W) and masks (B, K, H, W), got shapes "
                         f"{tuple(image.shape)} and {tuple(masks.shape)}")
    if image.shape[0] != masks.shape[0] or image.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and masks {tuple(masks.shape)} must share batch, height and "
                         "width; resize the masks to the image first")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
    dilations = tuple(dilations)
    if not dilations or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dilations):
        raise ValueError(f"dilations must be a non-empty sequence of positive integers, got {dilations!r}")
    if iterations == 0:
        return masks
    work = torch.promote_types(torch.promote_types(image.dtype, masks.dtype), torch.float32)
    affinity = _affinity(image.to(work), dilations).unsqueeze(1)  # (B, 1, P, H, W)
    refined = masks.to(work)
    for _ in range(iterations):
        total = torch.zeros_like(refined)
        for i, shifted in enumerate(_neighbour_shifts(refined, dilations)):
            total += affinity[:, :, i] * shifted
        refined = total
    return refined.to(masks.dtype)
