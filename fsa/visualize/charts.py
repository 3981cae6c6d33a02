"""Charts: the class-share and logit bars, and the feedback step by step (docs/method.md §3)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .colors import _as_rgb_uint8, class_colors, palette
from .text import _ellipsize, _fit, _font, _text_width, _wrap, text_panel
from .maps import heatmap_overlay


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
