"""Drawing helpers for segmentation masks and attention maps (no UI, no maths).

Every function takes and returns plain numpy arrays: images are ``(H, W, 3) uint8`` RGB.
Text is drawn with Pillow and the DejaVu Sans font that matplotlib ships (so any class name
renders); the logit chart uses matplotlib's object API with the Agg canvas (no pyplot, thread-safe).
"""
from __future__ import annotations

import colorsys
from functools import lru_cache
from typing import Iterable, Optional, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

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
def _font(size: int) -> ImageFont.ImageFont:
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:  # pragma: no cover - matplotlib always ships DejaVu Sans
        return ImageFont.load_default()


def _text_width(font, text: str) -> int:
    return int(np.ceil(font.getlength(text)))


def legend(
    class_names: Sequence[str],
    colors: np.ndarray,
    width: int = 512,
    font_size: int = 14,
    present: Optional[Iterable[int]] = None,
) -> np.ndarray:
    """A white strip ``(h, width, 3)`` with one colour swatch + name per class, wrapped in rows.

    ``present``: indices of classes that occur in the mask; the others are drawn greyed out.
    """
    font = _font(font_size)
    present_set = None if present is None else {int(i) for i in present}
    pad, sw, gap = 6, font_size, 14
    line_h = font_size + 8
    items, x, y = [], pad, pad
    for i, name in enumerate(class_names):
        w = sw + 4 + _text_width(font, str(name))
        if x > pad and x + w > width - pad:
            x, y = pad, y + line_h
        items.append((i, x, y))
        x += w + gap
    height = y + line_h + pad
    canvas = Image.new("RGB", (max(width, 1), height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, x, y in items:
        color = tuple(int(c) for c in colors[i])
        faded = present_set is not None and i not in present_set
        draw.rectangle([x, y + 2, x + sw - 1, y + 2 + sw - 1], fill=color, outline=(0, 0, 0))
        draw.text((x + sw + 4, y), str(class_names[i]), fill=ABSENT_TEXT_COLOR if faded else (0, 0, 0), font=font)
    return np.asarray(canvas)


def with_legend(image, class_names: Sequence[str], colors: np.ndarray, **kwargs) -> np.ndarray:
    """``image`` with a `legend` strip of the same width appended below it."""
    img = _as_rgb_uint8(image)
    strip = legend(class_names, colors, width=img.shape[1], **kwargs)
    return np.concatenate([img, strip], axis=0)


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


def _figure_to_array(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def class_bar_chart(
    class_names: Sequence[str],
    probs: np.ndarray,
    colors: Optional[np.ndarray] = None,
    title: str = "Π_i: class distribution of the query patch",
    width: int = 500,
    font_size: int = 13,
    max_bars: Optional[int] = None,
) -> np.ndarray:
    """Horizontal bars of one probability per class → ``(H, W, 3) uint8``, ``width`` pixels wide.

    Each row: the class name, a bar in the class colour on a 0..1 scale (0..max if a value exceeds
    1), the value. ``max_bars``: with more classes than that, only the most probable ones, in
    descending order, and the title says how many are shown. Drawn with PIL: a click's chart costs
    about a millisecond (a Matplotlib figure took ~40 ms).
    """
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if len(probs) != len(class_names):
        raise ValueError(f"{len(probs)} probabilities for {len(class_names)} classes")
    if max_bars is not None and max_bars < 1:
        raise ValueError(f"max_bars must be ≥ 1, got {max_bars}")
    colors = class_colors(class_names) if colors is None else np.asarray(colors)
    order = np.arange(len(probs))
    if max_bars is not None and len(probs) > max_bars:
        order = np.argsort(-probs, kind="stable")[:max_bars]
        title = f"{title} ({max_bars} most likely of {len(probs)})"
    font, small = _font(font_size), _font(max(8, font_size - 2))
    pad, row_h, bar_h = 10, font_size + 11, font_size + 3
    title_top = pad + 16  # clear of the label an image component draws in its top-left corner
    title_lines = _wrap(title, font, width - 2 * pad)
    top = title_top + len(title_lines) * (font_size + 5) + 6
    names = [str(class_names[i]) for i in order]
    name_w = min(int(0.4 * width), max((_text_width(font, n) for n in names), default=0))
    names = [_ellipsize(n, font, name_w) for n in names]
    value_w = _text_width(small, "0.00") + 8
    x0 = pad + name_w + 8
    x1 = max(x0 + 10, width - pad - value_w)
    scale = max(1.0, float(probs.max(initial=0.0)))
    height = top + len(order) * row_h + small.size + 16
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(title_lines):
        draw.text(((width - _text_width(font, line)) // 2, title_top + k * (font_size + 5)), line, fill=(0, 0, 0),
                  font=font)
    for row, (i, name) in enumerate(zip(order, names)):
        y = top + row * row_h
        yb = y + (row_h - bar_h) // 2
        draw.text((x0 - 8 - _text_width(font, name), y + (row_h - font_size) // 2 - 1), name, fill=(0, 0, 0),
                  font=font)
        draw.rectangle([x0, yb, x1, yb + bar_h - 1], fill=(240, 240, 240))
        end = x0 + int(round((x1 - x0) * max(0.0, float(probs[i])) / scale))
        if end > x0:
            draw.rectangle([x0, yb, end, yb + bar_h - 1], fill=tuple(int(c) for c in colors[i]), outline=(0, 0, 0))
        draw.text((x1 + 6, y + (row_h - small.size) // 2 - 1), f"{probs[i]:.2f}", fill=(0, 0, 0), font=small)
    axis_y = top + len(order) * row_h + 2
    draw.line([x0, axis_y, x1, axis_y], fill=(0, 0, 0))
    for tick in (0.0, 0.5, 1.0):
        tx = x0 + int(round((x1 - x0) * tick))
        label = f"{tick * scale:g}"
        draw.line([tx, axis_y, tx, axis_y + 3], fill=(0, 0, 0))
        draw.text((min(tx - _text_width(small, label) // 2, width - pad - _text_width(small, label)), axis_y + 4),
                  label, fill=(60, 60, 60), font=small)
    return np.asarray(canvas)


def _ellipsize(text: str, font, width: int) -> str:
    """``text``, cut with an ellipsis to fit ``width`` pixels."""
    if _text_width(font, text) <= width:
        return text
    while text and _text_width(font, text + "…") > width:
        text = text[:-1]
    return text + "…"


def _fit(image: np.ndarray, width: int) -> np.ndarray:
    h, w = image.shape[:2]
    if w == width:
        return image
    height = max(1, int(round(h * width / w)))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if w > width else cv2.INTER_LINEAR)


def _text_strip(text: str, width: int, font_size: int = 14, bold_bg=(245, 245, 245)) -> np.ndarray:
    font = _font(font_size)
    canvas = Image.new("RGB", (width, font_size + 10), bold_bg)
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 4), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


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


def _left_aligned(strip, width: int) -> np.ndarray:
    """``strip`` on white, ``width`` pixels wide, left-aligned (shrunk if wider)."""
    foot = _as_rgb_uint8(strip)
    if foot.shape[1] > width:
        foot = _fit(foot, width)
    padded = np.full((foot.shape[0], width, 3), 255, np.uint8)
    padded[:, : foot.shape[1]] = foot
    return padded


def with_colorbar(image, vmin: float, vmax: float, cmap: str = "inferno", font_size: int = 13) -> np.ndarray:
    """``image`` with a horizontal colour bar of ``cmap`` from ``vmin`` to ``vmax`` below it, its two ends
    labelled (the scale a `heatmap_overlay` drawn with those bounds used)."""
    img = _as_rgb_uint8(image)
    w = img.shape[1]
    font = _font(font_size)
    pad = 6
    lo, hi = f"{vmin:.3g}", f"{vmax:.3g}"
    x0 = pad + _text_width(font, lo) + 6
    x1 = max(x0 + 10, w - pad - _text_width(font, hi) - 6)
    bar_h = font_size + 2
    strip = np.full((bar_h + 2 * pad, w, 3), 255, np.uint8)
    ramp = apply_colormap(np.linspace(0.0, 1.0, x1 - x0)[None, :], cmap, vmin=0.0, vmax=1.0)
    strip[pad : pad + bar_h, x0:x1] = ramp
    canvas = Image.fromarray(strip)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), lo, fill=(0, 0, 0), font=font)
    draw.text((x1 + 6, pad), hi, fill=(0, 0, 0), font=font)
    return np.concatenate([img, np.asarray(canvas)], axis=0)


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


def side_by_side(images: Sequence[np.ndarray], captions: Sequence[str], gap: int = 6,
                 footer: Optional[np.ndarray] = None, font_size: Optional[int] = None) -> np.ndarray:
    """Images in one row at their own size, each under a caption strip, on white; ``footer``
    (e.g. `error_key`) appended below, left-aligned (shrunk if wider than the row)."""
    if len(images) != len(captions) or not images:
        raise ValueError("one caption per image, and at least one image")
    cells = [_as_rgb_uint8(im) for im in images]
    size = font_size or max(14, round(max(c.shape[1] for c in cells) / 30))

    def caption(text: str, w: int) -> np.ndarray:
        fit = size  # shrink the font (down to 8 px) until the caption fits the image's width
        while fit > 8 and _text_width(_font(fit), text) > w - 12:
            fit -= 1
        strip = _text_strip(text, w, fit, (255, 255, 255))
        return np.concatenate([strip, np.full((size - fit, w, 3), 255, np.uint8)], axis=0)

    cells = [np.concatenate([caption(str(t), c.shape[1]), c], axis=0) for t, c in zip(captions, cells)]
    height = max(c.shape[0] for c in cells)
    width = sum(c.shape[1] for c in cells) + gap * (len(cells) - 1)
    row = np.full((height, width, 3), 255, np.uint8)
    x = 0
    for c in cells:
        row[: c.shape[0], x : x + c.shape[1]] = c
        x += c.shape[1] + gap
    if footer is None:
        return row
    foot = _as_rgb_uint8(footer)
    if foot.shape[1] > width:
        foot = _fit(foot, width)
    padded = np.full((foot.shape[0], width, 3), 255, np.uint8)
    padded[:, : foot.shape[1]] = foot
    return np.concatenate([row, padded], axis=0)


def error_maps(image, predictions: Sequence[np.ndarray], reference: np.ndarray, captions: Sequence[str],
               ignore_index: int = 255) -> np.ndarray:
    """`error_map` of each prediction side by side, captioned, with the `error_key` below."""
    maps = [error_map(image, labels, reference, ignore_index) for labels in predictions]
    size = max(14, round(maps[0].shape[1] / 30)) if maps else 14
    width = sum(m.shape[1] for m in maps) + 6 * (len(maps) - 1)
    return side_by_side(maps, captions, footer=error_key(max(width, 1), size), font_size=size)


# --------------------------------------------------------------------------- feedback step by step
#: number of panels of `feedback_step_panels`: Z, U, Π, Ŝ, kept set, A_new, A_ens
FEEDBACK_STEPS = 7


def logit_bar_chart(
    names: Sequence[str],
    values: np.ndarray,
    colors: Optional[np.ndarray] = None,
    title: str = "logits of the query patch",
    size: tuple[float, float] = (5.0, 3.0),
    dpi: int = 100,
) -> np.ndarray:
    """Horizontal bars of signed values (e.g. logits, one per text query) from a zero line.

    values ``(K,)``; colors ``(K, 3) uint8`` (default: `palette`). Positive bars go right of the
    black zero line, negative ones left, each labelled with its value. → ``(H, W, 3) uint8``.
    """
    from matplotlib.figure import Figure

    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) != len(names):
        raise ValueError(f"{len(values)} values for {len(names)} names")
    colors = palette(len(names)) if colors is None else np.asarray(colors)
    height = max(size[1], 0.35 * len(names) + 1.0)
    fig = Figure(figsize=(size[0], height), dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(names))
    ax.barh(y, values, color=np.asarray(colors[: len(values)], dtype=np.float64) / 255.0, edgecolor="black")
    ax.axvline(0.0, color="black", linewidth=1.0)
    ax.set_yticks(y, [str(n) for n in names])
    ax.invert_yaxis()
    lo, hi = min(0.0, float(values.min(initial=0.0))), max(0.0, float(values.max(initial=0.0)))
    span = max(hi - lo, 1e-6)
    ax.set_xlim(lo - 0.25 * span * (lo < 0), hi + 0.25 * span)  # room for the value labels
    for yi, v in zip(y, values):
        ax.text(v + (0.01 if v >= 0 else -0.01) * span, yi, f"{v:.2f}", va="center", fontsize=9,
                ha="left" if v >= 0 else "right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _figure_to_array(fig)


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (a long word stays whole)."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = word if not line else f"{line} {word}"
            if line and _text_width(font, candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def text_panel(text: str, width: int = 500, height: int = 300, font_size: int = 16) -> np.ndarray:
    """A light-grey card ``(height, width, 3)`` with ``text`` wrapped to its width, in black."""
    font = _font(font_size)
    canvas = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(_wrap(text, font, width - 24)):
        draw.text((12, 12 + i * (font_size + 6)), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def feedback_step_panels(
    image,
    window,
    patch: tuple[int, int],
    *,
    query_names: Sequence[str],
    feedback_logits: np.ndarray,
    isolation_logits: Optional[np.ndarray],
    class_names: Sequence[str],
    class_probs: np.ndarray,
    similarity: np.ndarray,
    kept: np.ndarray,
    attn_new: np.ndarray,
    attn_ensemble: np.ndarray,
    query_colors: Optional[np.ndarray] = None,
    colors: Optional[np.ndarray] = None,
) -> list[np.ndarray]:
    """The `FEEDBACK_STEPS` pictures of one feedback pass for a query patch (docs/method.md §3), in order:

    1. `logit_bar_chart` of Z_i ``(K,)``; 2. of U_i ``(K,)``, or with isolation off
    (``isolation_logits`` None) a `text_panel` saying so; 3. `class_bar_chart` of Π_i ``(C,)``;
    4. Ŝ[i]; 5. Ŝ[i] with the patches outside ``kept`` dimmed; 6. A_new[i]; 7. A_ens[i] (one 2-D
    map: the head mean or one head). 4-7 are `heatmap_overlay` of ``(gh, gw)`` maps over ``window``
    of ``image`` with ``patch`` framed, each the size of ``image``. query_colors ``(K, 3)``: bar
    colours of the queries (e.g. their class's colour); colors ``(C, 3)``: of the classes.
    """
    colors = class_colors(class_names) if colors is None else colors
    query_colors = palette(len(query_names)) if query_colors is None else query_colors
    z_chart = logit_bar_chart(query_names, feedback_logits, query_colors, title="Z_i: feedback logits")
    if isolation_logits is None:
        h, w = z_chart.shape[:2]
        u_chart = text_panel("Attention isolation is off: no U is subtracted, so Π_i = softmax(Z_i).", w, h)
    else:
        u_chart = logit_bar_chart(query_names, isolation_logits, query_colors,
                                  title="U_i: logits under uniform attention")
    pi_chart = class_bar_chart(class_names, class_probs, colors)
    return [
        z_chart,
        u_chart,
        pi_chart,
        heatmap_overlay(image, window, similarity, patch),
        heatmap_overlay(image, window, similarity, patch, kept=kept),
        heatmap_overlay(image, window, attn_new, patch),
        heatmap_overlay(image, window, attn_ensemble, patch),
    ]


def feedback_steps_figure(
    panels: Sequence[np.ndarray],
    captions: Sequence[str],
    cell_width: int = 320,
    columns: int = 4,
    gap: int = 6,
    font_size: int = 13,
) -> np.ndarray:
    """Panels (e.g. `feedback_step_panels`) tiled on white, ``columns`` per row, each resized to
    ``cell_width`` wide (aspect kept) under its caption wrapped to that width. → ``(H, W, 3) uint8``
    with ``W = columns·cell_width + (columns + 1)·gap``."""
    if len(panels) != len(captions) or not panels:
        raise ValueError("one caption per panel, and at least one panel")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    font = _font(font_size)
    line_h = font_size + 5
    width = columns * cell_width + (columns + 1) * gap
    tiles = []
    for panel, caption in zip(panels, captions):
        lines = _wrap(caption, font, cell_width - 8)
        tiles.append((lines, _fit(_as_rgb_uint8(panel), cell_width)))
    bands = []
    for start in range(0, len(tiles), columns):
        row = tiles[start:start + columns]
        cap_h = max(len(lines) for lines, _ in row) * line_h + 6
        band_h = cap_h + max(p.shape[0] for _, p in row) + gap
        band = Image.new("RGB", (width, band_h), (255, 255, 255))
        draw = ImageDraw.Draw(band)
        for j, (lines, _) in enumerate(row):
            x = gap + j * (cell_width + gap)
            for k, line in enumerate(lines):
                draw.text((x + 4, 3 + k * line_h), line, fill=(0, 0, 0), font=font)
        arr = np.array(band)
        for j, (_, p) in enumerate(row):
            x = gap + j * (cell_width + gap)
            arr[cap_h:cap_h + p.shape[0], x:x + cell_width] = p
        bands.append(arr)
    return np.concatenate(bands, axis=0)


__all__ = [
    "BACKGROUND_COLOR", "ERROR_COLOR", "FEEDBACK_STEPS", "IGNORE_HATCH", "MARKER_COLOR", "apply_colormap",
    "class_bar_chart", "class_colors", "colorize", "compare_grid", "error_key", "error_map", "error_maps",
    "feedback_step_panels", "feedback_steps_figure", "heatmap_overlay", "legend", "logit_bar_chart", "overlay",
    "palette", "patch_box", "segmentation_panel", "side_by_side", "text_panel", "with_legend",
]
