"""Per-session data of the demo: what a session's `gr.State` keeps of its last forward pass (`RunRecord`)
and the key that says whether a later request may reuse it (`run_key`, `image_digest`). No Gradio here."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

import fsa
from ..diagnostics import DiagnosticsStore


@dataclass(frozen=True)
class RunRecord:
    """What one session keeps in its `gr.State`: what a click on its last forward pass needs.

    Grid-level data and the picture only (no full-resolution label or score maps): a few MB.
    """

    key: tuple  #: (image digest, vocabulary, backbone, settings) that produced the pass
    image: np.ndarray  #: (h, w, 3) uint8: the picture the masks and maps are drawn on
    class_names: tuple[str, ...]
    diagnostics: Optional[DiagnosticsStore]  #: per-window data of the FSA pass; None when FSA was off
    input_size: tuple[int, int]  #: (width, height) of the image the user gave
    method: str = "clearclip"
    #: (h, w) uint8 labels of the baseline and of baseline + FSA (None with FSA off), for scoring
    labels: Optional[np.ndarray] = None
    fsa_labels: Optional[np.ndarray] = None
    point: Optional[tuple[float, float]] = None  #: last query point, in pixels of `image`

    def masks(self) -> tuple["MaskView", Optional["MaskView"]]:
        """The baseline's and FSA's label maps as `fsa.scoring.score_against` takes them."""
        def view(labels):
            return None if labels is None else MaskView(self.class_names, labels, self.method)

        return view(self.labels), view(self.fsa_labels)

    def patch_size(self) -> tuple[float, float]:
        """(height, width) of one attention patch in pixels of `image` (the first window's grid)."""
        d = self.diagnostics
        win, (gh, gw) = d.windows[0], d.details[0].grid
        sy, sx = d.scale
        return (win.y1 - win.y0) / gh / sy, (win.x1 - win.x0) / gw / sx

    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of patches covering `image`: what the page's row and column inputs number."""
        ph, pw = self.patch_size()
        h, w = self.image.shape[:2]
        return max(1, math.ceil(h / ph - 1e-6)), max(1, math.ceil(w / pw - 1e-6))

    def patch_at(self, x: float, y: float) -> tuple[int, int]:
        """(row, column) of `patch_grid` under the point (x, y) of `image`, 1-based."""
        ph, pw = self.patch_size()
        rows, cols = self.patch_grid()
        return min(rows, int(y // ph) + 1), min(cols, int(x // pw) + 1)

    def patch_center(self, row: int, col: int) -> tuple[float, float]:
        """(x, y) in pixels of `image` of the centre of patch (row, col) of `patch_grid` (1-based), kept on
        the image; ValueError naming the grid when the patch is outside it."""
        rows, cols = self.patch_grid()
        if not (1 <= row <= rows and 1 <= col <= cols):
            raise ValueError(f"Patch row {row}, column {col} is outside this image's grid of {rows} rows and "
                             f"{cols} columns (numbered from 1).")
        ph, pw = self.patch_size()
        h, w = self.image.shape[:2]
        return min(w - 0.5, (col - 0.5) * pw), min(h - 0.5, (row - 0.5) * ph)

    def explain(self, x: float, y: float) -> "fsa.PatchExplanation":
        """Attention rows of the patch under (x, y) (pixels of `image`).

        A fresh store each time: the N×N matrices it builds for a window live for this click only,
        not for the session's lifetime (~35 MB per window of ViT-B/16).
        """
        d = self.diagnostics
        return DiagnosticsStore(d.windows, d.details, d.scale, d.vocabulary).explain(x, y)


@dataclass(frozen=True)
class MaskView:
    """A label map of a session's pass, with what scoring needs to know about it."""

    class_names: tuple[str, ...]
    labels: np.ndarray  #: (h, w) class indices
    method: str
    notes: tuple[str, ...] = ()


def compact_labels(labels: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """int64 labels → uint8 (the vocabulary budget keeps classes far below 256): 8× less session memory."""
    if labels is None:
        return None
    return labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)


def image_digest(image) -> str:
    """Content hash of an image: a file's bytes, a file object's bytes, a PIL image or an array."""
    h = hashlib.sha1()
    if isinstance(image, (str, Path)):
        with open(image, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return "file:" + h.hexdigest()
    if hasattr(image, "getvalue"):
        h.update(image.getvalue())
        return "file:" + h.hexdigest()
    if isinstance(image, Image.Image):
        meta, data = f"{image.mode}{image.size}", image.tobytes()
    else:
        arr = np.ascontiguousarray(image)
        meta, data = f"{arr.dtype}{arr.shape}", arr.tobytes()
    h.update(meta.encode() + data)
    return h.hexdigest()


def run_key(image, vocabulary: str, backbone: str, settings, proxy: Optional[str] = None) -> tuple:
    """What a `RunRecord` was made for: a later request with the same key may reuse its pass. proxy: ProxyCLIP's
    proxy (part of the key when given)."""
    key = (image_digest(image), vocabulary, backbone, settings)
    return key if proxy is None else key + (proxy,)
