"""Colours: the class palette, masks painted and blended over the image, colour maps."""
from __future__ import annotations

import colorsys
from functools import lru_cache
from typing import Optional, Sequence

import cv2
import numpy as np


#: colour of the query-patch rectangle in `heatmap_overlay` (absent from the colour maps used)
MARKER_COLOR: tuple[int, int, int] = (0, 255, 255)
#: colour given to a class named "background" by `class_colors`
BACKGROUND_COLOR: tuple[int, int, int] = (128, 128, 128)
#: factor applied to patches outside the kept set and to pixels outside the window
DIM_FACTOR = 0.35
#: colour of wrongly labelled pixels in `error_map` (brighter than any dimmed pixel, so never ambiguous)
ERROR_COLOR: tuple[int, int, int] = (255, 0, 0)
#: the two greys of the diagonal hatch over ignored pixels in `error_map` (both above any dimmed pixel)
IGNORE_HATCH: tuple[tuple[int, int, int], tuple[int, int, int]] = ((150, 150, 150), (205, 205, 205))

# Colour-blind-safe first colours: Okabe & Ito's seven (orange, sky blue, bluish green, yellow, blue,
# vermillion, reddish purple), then Paul Tol's "muted" and "dark" sets; none is red then green at the start,
# none is grey (the background's), black or white (ignore colours of a reference mask). More are generated.
_BASE_COLORS = np.array(
    [
        (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
        (213, 94, 0), (204, 121, 167), (51, 34, 136), (136, 204, 238), (68, 170, 153),
        (17, 119, 51), (153, 153, 51), (221, 204, 119), (204, 102, 119), (136, 34, 85),
        (170, 68, 153), (102, 51, 0), (255, 170, 187), (0, 68, 136),
    ],
    dtype=np.uint8,
)
#: colour of the names of classes absent from a mask in `legend`: 5.9:1 against white (WCAG AA needs 4.5)
ABSENT_TEXT_COLOR: tuple[int, int, int] = (100, 100, 100)


def palette(n: int) -> np.ndarray:
    """``n`` distinct colours, ``(n, 3) uint8``; the first 19 are fixed, the rest spread in hue."""
    if n < 0:
        raise ValueError("palette size must be >= 0")
    if n <= len(_BASE_COLORS):
        return _BASE_COLORS[:n].copy()
    extra = []
    golden = 0.618033988749895
    for i in range(n - len(_BASE_COLORS)):
        h = (0.11 + i * golden) % 1.0
        s = 0.55 + 0.4 * ((i // 7) % 2)
        v = 0.95 - 0.25 * ((i // 3) % 2)
        extra.append(tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v)))
    return np.concatenate([_BASE_COLORS, np.array(extra, dtype=np.uint8)], axis=0)


def class_colors(class_names: Sequence[str]) -> np.ndarray:
    """Palette for ``class_names`` with a class named "background" drawn grey."""
    colors = palette(len(class_names))
    for i, name in enumerate(class_names):
        if str(name).strip().lower() == "background":
            colors[i] = BACKGROUND_COLOR
    return colors


def _as_rgb_uint8(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.clip(arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0), 0, 255)
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def colorize(labels: np.ndarray, num_classes: int, colors: Optional[np.ndarray] = None) -> np.ndarray:
    """Label map ``(H, W)`` of indices in ``[0, num_classes)`` → ``(H, W, 3) uint8`` colours."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    colors = palette(num_classes) if colors is None else np.asarray(colors, dtype=np.uint8)
    if len(colors) < num_classes:
        raise ValueError(f"{len(colors)} colours for {num_classes} classes")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels outside [0, {num_classes})")
    return colors[labels.astype(np.intp)]


def overlay(
    image,
    labels: np.ndarray,
    num_classes: int,
    alpha: float = 0.5,
    colors: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Class colours blended over ``image`` with weight ``alpha`` (labels resized if needed)."""
    img = _as_rgb_uint8(image)
    labels = np.asarray(labels)
    if labels.shape != img.shape[:2]:
        labels = cv2.resize(
            labels.astype(np.int32), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST
        )
    color = colorize(labels, num_classes, colors).astype(np.float32)
    out = (1.0 - alpha) * img.astype(np.float32) + alpha * color
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


@lru_cache(maxsize=8)
def _lut(cmap: str) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


def apply_colormap(values: np.ndarray, cmap: str = "inferno", vmin=None, vmax=None) -> np.ndarray:
    """Scalar map → ``(..., 3) uint8`` through a matplotlib colour map (min-max scaled by default)."""
    v = np.asarray(values, dtype=np.float32)
    finite = v[np.isfinite(v)]
    lo = float(finite.min()) if vmin is None and finite.size else float(vmin or 0.0)
    hi = float(finite.max()) if vmax is None and finite.size else float(1.0 if vmax is None else vmax)
    scaled = np.zeros_like(v) if hi <= lo else (v - lo) / (hi - lo)
    idx = np.clip(np.nan_to_num(scaled) * 255 + 0.5, 0, 255).astype(np.intp)
    return _lut(cmap)[idx]
