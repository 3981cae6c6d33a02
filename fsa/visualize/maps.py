"""Masks and attention maps over the image: panels, the query patch, heatmaps, error maps, the compare-all grid."""
from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np

from .colors import (DIM_FACTOR, ERROR_COLOR, IGNORE_HATCH, MARKER_COLOR, _as_rgb_uint8, apply_colormap, class_colors,
                     overlay)
from .text import _fit, _font, _left_aligned, _text_strip, _text_width, legend, side_by_side


def segmentation_panel(
    image,
    labels: np.ndarray,
    class_names: Sequence[str],
    alpha: float = 0.55,
    colors: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Mask over the image, the same size as ``image`` (so clicks map 1:1), legend not included."""
    colors = class_colors(class_names) if colors is None else colors
    return overlay(image, labels, len(class_names), alpha=alpha, colors=colors)


def _window_extent(window) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of a Window or a tuple, unclipped (a padded window may pass the border)."""
    if all(hasattr(window, a) for a in ("y0", "x0", "y1", "x1")):
        return int(window.y0), int(window.x0), int(window.y1), int(window.x1)
    y0, x0, y1, x1 = window
    return int(y0), int(x0), int(y1), int(x1)


def _window_box(window, shape) -> tuple[int, int, int, int]:
    """The window's extent clipped to an image of `shape`."""
    y0, x0, y1, x1 = _window_extent(window)
    h, w = shape[:2]
    y0, x0 = max(0, y0), max(0, x0)
    y1, x1 = min(h, y1), min(w, x1)
    if y1 <= y0 or x1 <= x0:
        raise ValueError(f"window {(y0, x0, y1, x1)} is empty for an image of {w}x{h}")
    return y0, x0, y1, x1


def patch_box(window, grid: tuple[int, int], patch: tuple[int, int], shape) -> tuple[int, int, int, int]:
    """Pixel box ``(y0, x0, y1, x1)`` (end-exclusive) of patch ``(row, col)`` of a window's grid.

    The grid spans the window's whole extent (padding included); the box is clipped to the image.
    """
    _window_box(window, shape)  # the window must meet the image
    y0, x0, y1, x1 = _window_extent(window)
    gh, gw = grid
    r, c = patch
    if not (0 <= r < gh and 0 <= c < gw):
        raise ValueError(f"patch {patch} outside the {gh}x{gw} grid")
    ph, pw = (y1 - y0) / gh, (x1 - x0) / gw
    h, w = shape[:2]
    return (
        max(0, y0 + int(round(r * ph))), max(0, x0 + int(round(c * pw))),
        min(h, y0 + int(round((r + 1) * ph))), min(w, x0 + int(round((c + 1) * pw))),
    )


def heatmap_overlay(
    image,
    window,
    grid_map: np.ndarray,
    patch: Optional[tuple[int, int]] = None,
    kept: Optional[np.ndarray] = None,
    alpha: float = 0.6,
    cmap: str = "inferno",
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    marker_color: tuple[int, int, int] = MARKER_COLOR,
) -> np.ndarray:
    """A patch-grid map drawn over its window of ``image``.

    ``grid_map`` ``(gh, gw)`` is upsampled bilinearly to the window, coloured with ``cmap``
    (scaled to its own min..max unless ``vmin``/``vmax``) and blended with weight ``alpha``.
    Pixels outside the window are dimmed. ``kept`` ``(gh, gw) bool``: patches not kept are
    dimmed too (the pruned set of the similarity view). ``patch`` ``(row, col)`` gets a rectangle
    of ``marker_color`` on its border. Returns an image of the same size as ``image``.
    """
    img = _as_rgb_uint8(image)
    grid_map = np.asarray(grid_map, dtype=np.float32)
    if grid_map.ndim != 2:
        raise ValueError(f"grid_map must be (gh, gw), got shape {grid_map.shape}")
    gh, gw = grid_map.shape
    y0, x0, y1, x1 = _window_box(window, img.shape)
    fy0, fx0, fy1, fx1 = _window_extent(window)  # the grid spans the whole (maybe padded) extent
    inside = (slice(y0 - fy0, y1 - fy0), slice(x0 - fx0, x1 - fx0))

    out = img.astype(np.float32) * DIM_FACTOR
    up = cv2.resize(grid_map, (fx1 - fx0, fy1 - fy0), interpolation=cv2.INTER_LINEAR)[inside]
    colored = apply_colormap(up, cmap, vmin=vmin, vmax=vmax).astype(np.float32)
    region = (1.0 - alpha) * img[y0:y1, x0:x1].astype(np.float32) + alpha * colored
    if kept is not None:
        kept = np.asarray(kept, dtype=bool)
        if kept.shape != (gh, gw):
            raise ValueError(f"kept must have the grid's shape {(gh, gw)}, got {kept.shape}")
        mask = cv2.resize(kept.astype(np.uint8), (fx1 - fx0, fy1 - fy0),
                          interpolation=cv2.INTER_NEAREST).astype(bool)[inside]
        region[~mask] *= DIM_FACTOR
    out[y0:y1, x0:x1] = region
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)

    if patch is not None:
        py0, px0, py1, px1 = patch_box((fy0, fx0, fy1, fx1), (gh, gw), patch, img.shape)
        t = max(2, min(py1 - py0, px1 - px0) // 6)
        # grow the box outwards by the thickness so the patch's own pixels stay visible
        by0, bx0 = max(0, py0 - t), max(0, px0 - t)
        by1, bx1 = min(out.shape[0], py1 + t), min(out.shape[1], px1 + t)
        out[by0:py0, bx0:bx1] = marker_color
        out[py1:by1, bx0:bx1] = marker_color
        out[by0:by1, bx0:px0] = marker_color
        out[by0:by1, px1:bx1] = marker_color
    return out


def compare_grid(
    rows: Sequence[Sequence[np.ndarray]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    cell_width: int = 256,
    gap: int = 4,
    footer: Optional[np.ndarray] = None,
    header: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Images in a labelled grid: one row per entry of ``rows``, one column per ``col_labels``.

    Every cell is resized to ``cell_width`` pixels wide (aspect kept; a row takes its tallest
    cell's height). Row labels are drawn as a strip above each row, column labels once on top;
    ``footer`` (e.g. a `legend` strip) is appended, left-aligned (shrunk if wider than the grid); ``header``
    is put above everything the same way.
    """
    if len(rows) != len(row_labels):
        raise ValueError("one label per row")
    ncol = len(col_labels)
    if any(len(r) != ncol for r in rows):
        raise ValueError("every row needs one image per column label")
    width = ncol * cell_width + (ncol + 1) * gap
    white = (255, 255, 255)
    parts = [] if header is None else [_left_aligned(header, width)]
    titles = np.full((28, width, 3), 255, np.uint8)
    for j, label in enumerate(col_labels):
        font = 16
        while font > 9 and _text_width(_font(font), str(label)) > cell_width - 12:
            font -= 1
        cell = _text_strip(str(label), cell_width, font, white)
        x = gap + j * (cell_width + gap)
        titles[: min(28, cell.shape[0]), x : x + cell_width] = cell[:28]
    parts.append(titles)
    for label, row in zip(row_labels, rows):
        parts.append(_text_strip(str(label), width, 14))
        cells = [_fit(_as_rgb_uint8(im), cell_width) for im in row]
        h = max(c.shape[0] for c in cells)
        band = np.full((h + gap, width, 3), 255, np.uint8)
        for j, c in enumerate(cells):
            x = gap + j * (cell_width + gap)
            band[: c.shape[0], x : x + cell_width] = c
        parts.append(band)
    if footer is not None:
        parts.append(_left_aligned(footer, width))
    return np.concatenate(parts, axis=0)


def error_map(image, labels: np.ndarray, reference: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Where a prediction disagrees with a reference mask, ``(H, W, 3) uint8``.

    image ``(H, W, 3)``; labels, reference ``(H, W)`` class indices (reference: ``ignore_index`` =
    ignore). Correct pixels: the image dimmed by `DIM_FACTOR`; wrong pixels: `ERROR_COLOR`; ignored
    pixels: a diagonal hatch of the two `IGNORE_HATCH` greys (4 px stripes).
    """
    img = _as_rgb_uint8(image)
    labels, reference = np.asarray(labels), np.asarray(reference)
    if labels.shape != img.shape[:2] or reference.shape != img.shape[:2]:
        raise ValueError(f"image {img.shape[:2]}, labels {labels.shape} and reference {reference.shape} "
                         "must have the same height and width")
    out = np.clip(img.astype(np.float32) * DIM_FACTOR + 0.5, 0, 255).astype(np.uint8)
    ignored = reference == ignore_index
    out[~ignored & (labels != reference)] = ERROR_COLOR
    yy, xx = np.indices(reference.shape)
    hatch = np.array(IGNORE_HATCH, np.uint8)[((yy + xx) // 4) % 2]
    out[ignored] = hatch[ignored]
    return out


def error_key(width: int, font_size: int = 14) -> np.ndarray:
    """A legend strip ``(h, width, 3)`` for `error_map`: wrong / correct / ignored."""
    dimmed = tuple(int(round(c * DIM_FACTOR)) for c in (200, 200, 200))
    return legend(["wrong", "correct (image dimmed)", "ignored (255)"],
                  np.array([ERROR_COLOR, dimmed, IGNORE_HATCH[0]], np.uint8), width=width, font_size=font_size)


def error_maps(image, predictions: Sequence[np.ndarray], reference: np.ndarray, captions: Sequence[str],
               ignore_index: int = 255) -> np.ndarray:
    """`error_map` of each prediction side by side, captioned, with the `error_key` below."""
    maps = [error_map(image, labels, reference, ignore_index) for labels in predictions]
    size = max(14, round(maps[0].shape[1] / 30)) if maps else 14
    width = sum(m.shape[1] for m in maps) + 6 * (len(maps) - 1)
    return side_by_side(maps, captions, footer=error_key(max(width, 1), size), font_size=size)
