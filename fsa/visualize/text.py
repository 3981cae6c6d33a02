"""Text and layout: legends, captions, colour bars, images side by side, plain text panels."""
from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Optional, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .colors import ABSENT_TEXT_COLOR, _as_rgb_uint8, apply_colormap


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
