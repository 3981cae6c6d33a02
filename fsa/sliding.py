"""Sliding-window inference geometry and accumulation (docs/method.md §1 "Sliding window")."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Window:
    """A crop [y0, y1) × [x0, x1) in pixels of the image it was laid out on."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) of the centre."""
        return (self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0

    def contains(self, x: float, y: float) -> bool:
        return self.x0 <= x < self.x1 and self.y0 <= y < self.y1

    def padded(self, padding: tuple[int, int, int, int]) -> "Window":
        """The window grown by (left, right, top, bottom) pixels: the extent a padded window's grid covers
        (it may reach past the image border)."""
        left, right, top, bottom = padding
        return Window(self.y0 - top, self.x0 - left, self.y1 + bottom, self.x1 + right)

    def scaled(self, sy: float, sx: float) -> "Window":
        """The same window in an image scaled by (sy, sx)."""
        return Window(round(self.y0 * sy), round(self.x0 * sx), round(self.y1 * sy), round(self.x1 * sx))


def _starts(size: int, crop: int, stride: int) -> list[int]:
    """Window starts along one axis; the last window is shifted back to end at the border."""
    if crop <= 0 or crop >= size:
        return [0]
    count = (size - crop + stride - 1) // stride + 1
    return sorted({min(i * stride, size - crop) for i in range(count)})


def window_layout(height: int, width: int, crop: int, stride: int) -> list[Window]:
    """Windows of side min(crop, image side) covering an image; crop 0 = one window over all.

    All windows have the same size, so they can be batched.
    """
    if height < 1 or width < 1:
        raise ValueError(f"cannot lay windows on a {height}×{width} image")
    ch = height if crop <= 0 else min(crop, height)
    cw = width if crop <= 0 else min(crop, width)
    return [Window(y, x, y + ch, x + cw) for y in _starts(height, ch, stride) for x in _starts(width, cw, stride)]


def nearest_window(windows: list[Window], x: float, y: float) -> int:
    """Index of the window containing (x, y) whose centre is nearest; ValueError if none does."""
    inside = [i for i, w in enumerate(windows) if w.contains(x, y)]
    if not inside:
        raise ValueError(f"point ({x:.1f}, {y:.1f}) is outside the image")
    return min(inside, key=lambda i: (windows[i].center[0] - x) ** 2 + (windows[i].center[1] - y) ** 2)


class LogitCanvas:
    """Sum of per-window maps upsampled to their window, and the count of windows per pixel."""

    #: Upsampled values `add` holds at once (16 MB of float32), whatever the number of channels.
    MAX_ELEMENTS = 1 << 22

    def __init__(self, channels: int, height: int, width: int, dtype=torch.float32, device=None):
        self.sum = torch.zeros(channels, height, width, dtype=dtype, device=device)
        self.count = torch.zeros(1, height, width, dtype=dtype, device=device)

    def add(self, window: Window, grid_map: Tensor, padding: tuple[int, int, int, int] = (0, 0, 0, 0)) -> None:
        """grid_map: (K, h, w) on the patch grid of the window padded by (left, right, top, bottom):
        bilinearly upsampled to the padded window, then cropped back to the window."""
        left, right, top, bottom = padding
        size = (window.height + top + bottom, window.width + left + right)
        target = self.sum[:, window.y0:window.y1, window.x0:window.x1]
        # Channels are resized independently: a few at a time keeps the upsampled copy small.
        step = max(1, self.MAX_ELEMENTS // (size[0] * size[1]))
        for k in range(0, grid_map.shape[0], step):
            up = F.interpolate(grid_map[None, k:k + step].to(self.sum.dtype), size=size, mode="bilinear",
                               align_corners=False)[0]
            target[k:k + step] += up[:, top:top + window.height, left:left + window.width]
        self.count[:, window.y0:window.y1, window.x0:window.x1] += 1

    def take_mean(self) -> Tensor:
        """(K, H, W) sum / count, computed in the sum's own memory (no second (K, H, W) map), so the
        canvas is spent. Every pixel is covered by the layout, so count ≥ 1."""
        if self.sum is None:
            raise RuntimeError("take_mean was already called on this canvas")
        mean = self.sum.div_(self.count)
        self.sum = self.count = None
        return mean


def linear_resize_matrix(src: int, dst: int, dtype=torch.float32, device=None) -> Tensor:
    """(dst, src) matrix of 1-D linear interpolation with align_corners=False.

    Bilinear resizing is separable: F.interpolate(x, (H, W)) == Ry @ x @ Rxᵀ, which lets the
    resize to the original size run on a band of output rows at a time.
    """
    eye = torch.eye(src, dtype=dtype, device=device)[None]  # (1, src, src): row i = basis vector i
    return F.interpolate(eye, size=dst, mode="linear", align_corners=False)[0].T.contiguous()


def linear_taps(src: int, dst: int, dtype=torch.float32, device=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The two taps of each output of a 1-D linear resize src → dst (align_corners=False): (i0, i1, w0, w1),
    each (dst,), with output_y = w0·x[i0] + w1·x[i1]; read off `linear_resize_matrix`, so the weights are
    F.interpolate's own. At the border (i0 = src − 1) the one weight is w0 and w1 = 0."""
    m = linear_resize_matrix(src, dst, dtype, device)
    i0 = (m > 0).to(torch.uint8).argmax(dim=1)  # w0 = 1 − w1 > 0: the first nonzero is i0
    i1 = (i0 + 1).clamp(max=src - 1)
    w0 = m.gather(1, i0[:, None])[:, 0]
    w1 = torch.where(i1 != i0, m.gather(1, i1[:, None])[:, 0], 0.0)
    return i0, i1, w0, w1


def resized_row_bands(maps: Tensor, height: int, width: int, *, max_elements: int = 1 << 22):
    """Yield (y0, y1, band) with band = bilinear resize of maps (K, h, w) to (K, height, width)[:, y0:y1].

    Holds at most about `max_elements` output values at once (16 MB of float32), whatever the image
    size. A resize to the same size is the identity: its bands are views of `maps`. Each band resizes
    the rows of `maps` it needs along x (F.interpolate's 1-D kernel), then mixes the two taps of each
    output row: a few passes over the band (dense resize matrices cost 2·h + 2·w multiply-adds per value).
    """
    k, h, w = maps.shape
    rows = max(1, max_elements // max(1, k * width))
    if (h, w) == (height, width):
        for y0 in range(0, height, rows):
            yield y0, min(height, y0 + rows), maps[:, y0:y0 + rows]
        return
    i0, i1, w0, w1 = linear_taps(h, height, maps.dtype, maps.device)
    w0, w1 = w0[:, None], w1[:, None]
    for y0 in range(0, height, rows):
        y1 = min(height, y0 + rows)
        r0, r1 = int(i0[y0]), int(i1[y1 - 1]) + 1  # the source rows this band reads
        src = maps[:, r0:r1]
        if w != width:
            src = F.interpolate(src.reshape(1, k * (r1 - r0), w), size=width, mode="linear",
                                align_corners=False).view(k, r1 - r0, width)
        band = src.index_select(1, i0[y0:y1] - r0).mul_(w0[y0:y1])
        yield y0, y1, band.add_(src.index_select(1, i1[y0:y1] - r0).mul_(w1[y0:y1]))
