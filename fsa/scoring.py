"""Score one segmentation against a reference (ground-truth) mask that a person supplies.

A reference mask comes in one of two forms (`read_reference_mask`):

- an **index mask**: a single-channel PNG (PIL mode L, P, I, I;16 or 1) whose value c means class c
  of the result's `class_names` (vocabulary order, then the implicit trailing "background" when a
  background threshold added one), and 255 means "ignore". A palette (P) PNG is read by its indices,
  the way PASCAL VOC stores its masks.
- a **colour mask**: an RGB(A) PNG painted in the app's palette, `fsa.visualize.class_colors(class_names)`
  (`fsa.visualize.colorize(labels, len(names), class_colors(names))` writes one). Colours must match
  exactly; pure black (0, 0, 0), pure white (255, 255, 255) and fully transparent pixels mean "ignore".
  Any other colour is an error (so a JPEG, whose compression shifts colours, is refused).

`score_against` resizes nothing: the mask must have the segmented image's size. `score_reference` is the
whole path of an uploaded mask (read, brought to the segmented size when it has the size of the image the
user gave, which a server may have segmented reduced, then scored). The scores are those of
`fsa.evaluation.metrics` (mmsegmentation's IoUMetric) on this single image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import METHOD_LABELS
from .evaluation.metrics import IGNORE_INDEX, Scores, area_stats, scores
from .visualize import class_colors

MaskSource = Union[str, Path, np.ndarray, Image.Image]

#: colours of a colour mask read as "ignore" (besides fully transparent pixels)
IGNORE_COLORS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (255, 255, 255))
_INDEX_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N", "1")
_SHOWN = 6  # how many offending values / colours an error message lists


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _class_listing(names: Sequence[str], limit: int = 12) -> str:
    items = [f"{i} = {name}" for i, name in enumerate(names[:limit])]
    if len(names) > limit:
        items.append(f"… {len(names) - 1} = {names[-1]}")
    return ", ".join(items)


def _load(source: MaskSource) -> tuple[np.ndarray, Optional[str]]:
    """The mask's pixel array ((H, W) indices or (H, W, 3|4) colours) and its file format, if known."""
    if isinstance(source, np.ndarray):
        return source, None
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"reference mask file not found: {path.name}")
        try:
            with Image.open(path) as opened:
                opened.load()
                return _from_pil(opened), opened.format
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as exc:
            raise ValueError(f"cannot read the reference mask {path.name} as an image ({exc}); "
                             "give a PNG of class indices or of the app's class colours") from None
    if isinstance(source, Image.Image):
        return _from_pil(source), source.format
    raise ValueError(f"unsupported reference mask type {type(source).__name__}; pass a file path, "
                     "a PIL image or a numpy array")


def _from_pil(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in _INDEX_MODES:
        return np.asarray(image)
    if mode in ("LA", "PA"):  # indices with alpha: transparent pixels are ignored
        values = np.asarray(image.getchannel(0)).astype(np.int64)
        values[np.asarray(image.getchannel("A")) == 0] = IGNORE_INDEX
        return values
    if mode in ("RGB", "RGBA"):
        return np.asarray(image)
    raise ValueError(f"the reference mask is a PIL mode {mode} image; give a single-channel PNG of class "
                     "indices (mode L, P or I) or an RGB PNG in the app's class colours")


def _check_indices(labels: np.ndarray, class_names: Sequence[str]) -> None:
    """ValueError naming the values of `labels` that are neither a class index nor 255."""
    n = len(class_names)
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= n))
    if not bad.any():
        return
    values, counts = np.unique(labels[bad], return_counts=True)
    shown = ", ".join(str(int(v)) for v in values[:_SHOWN]) + (", …" if len(values) > _SHOWN else "")
    raise ValueError(
        f"the reference mask has {_count(int(counts.sum()), 'pixel')} with "
        + (f"value {shown}, not a class index: " if len(values) == 1 else f"values {shown}, not class indices: ")
        + f"there are {n} classes ({_class_listing(class_names)}), so the values must lie in 0..{n - 1}, "
        f"in the order of the vocabulary, with {IGNORE_INDEX} for pixels to ignore")


def _from_indices(array: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"a reference index mask must hold integer class indices, got dtype {array.dtype}")
    labels = array.astype(np.int64)
    _check_indices(labels, class_names)
    return labels


def _rgb_code(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _from_colours(array: np.ndarray, class_names: Sequence[str], colors: np.ndarray,
                  file_format: Optional[str]) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ValueError(f"a reference colour mask must be uint8 RGB, got dtype {array.dtype}")
    colors = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    if len(colors) < len(class_names):
        raise ValueError(f"{len(colors)} colours for {len(class_names)} classes")
    class_codes = _rgb_code(colors[: len(class_names)])
    if len(np.unique(class_codes)) < len(class_codes):
        raise ValueError("two classes share a colour, so a colour mask cannot tell them apart; use an index mask")
    codes = _rgb_code(array[..., :3])
    order = np.argsort(class_codes)
    slot = np.clip(np.searchsorted(class_codes[order], codes), 0, len(order) - 1)
    matched = class_codes[order][slot] == codes
    labels = np.full(codes.shape, IGNORE_INDEX, dtype=np.int64)
    labels[matched] = order[slot][matched]  # a class colour wins over the ignore colours
    ignored = ~matched & np.isin(codes, _rgb_code(np.array(IGNORE_COLORS)))
    if array.shape[-1] == 4:
        transparent = array[..., 3] == 0
        labels[transparent] = IGNORE_INDEX
        ignored |= transparent
    unknown = ~matched & ~ignored
    if unknown.any():
        values, counts = np.unique(codes[unknown], return_counts=True)
        top = np.argsort(-counts, kind="stable")[:_SHOWN]
        shown = ", ".join(f"({v >> 16}, {(v >> 8) & 255}, {v & 255}) × {c}"
                          for v, c in zip(values[top].tolist(), counts[top].tolist()))
        palette = ", ".join(f"{name} = {tuple(int(x) for x in colors[i])}" for i, name in enumerate(class_names[:12]))
        palette += ", …" if len(class_names) > 12 else ""
        hints = []
        if (file_format or "").upper() == "JPEG":
            hints.append("JPEG compression changes colours: save the mask as PNG")
        grey = [(v >> 16) == ((v >> 8) & 255) == (v & 255) for v in values.tolist()]
        if all(grey):
            hints.append("if these are class indices saved as RGB, save the mask as a single-channel (L) PNG")
        raise ValueError(
            f"the reference mask has {_count(int(counts.sum()), 'pixel')} in {_count(len(values), 'colour')} "
            f"that are not class colours: {shown}{', …' if len(values) > _SHOWN else ''} (colour × pixels). "
            f"A colour mask must use exactly the app's colours ({palette}); black and white mean ignore"
            + "".join(f". {h[0].upper()}{h[1:]}" for h in hints))
    return labels


def read_reference_mask(source: MaskSource, class_names: Sequence[str],
                        colors: Optional[np.ndarray] = None) -> np.ndarray:
    """A reference mask (file path, PIL image or array) → ``(H, W) int64`` class indices, 255 = ignore.

    source: an index mask ((H, W) integers, or a single-channel PNG) or a colour mask ((H, W, 3|4)
    uint8, or an RGB(A) PNG); see the module docstring for the rules. class_names: the result's
    `class_names`; colors: ``(C, 3) uint8``, by default ``fsa.visualize.class_colors(class_names)``.
    Pure black, pure white and fully transparent pixels of a colour mask are read as 255 (ignore).
    ValueError (with what to fix) for an unreadable file, an unsupported image mode, index values
    that name no class, and colours that are no class's colour.
    """
    names = [str(n) for n in class_names]
    if not names:
        raise ValueError("no class names to read the reference mask with")
    array, file_format = _load(source)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.size == 0:
        raise ValueError(f"the reference mask is empty (shape {array.shape})")
    if array.ndim == 2:
        return _from_indices(array, names)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        colors = class_colors(names) if colors is None else colors
        return _from_colours(array, names, colors, file_format)
    raise ValueError(f"a reference mask must be (H, W) indices or (H, W, 3) colours, got shape {array.shape}")


@dataclass(frozen=True)
class ScoreReport:
    """Scores of the baseline and of baseline + FSA (None when the run had FSA off) on one reference.

    Percentages. A class absent from both a method's prediction and the reference has IoU NaN ("n/a")
    and is left out of that method's means; one predicted but absent from the reference has IoU 0.
    """

    class_names: tuple[str, ...]
    method: str  #: the baseline's name, e.g. "clearclip"
    baseline: Scores
    fsa: Optional[Scores]
    labelled_pixels: int  #: reference pixels that are not 255
    ignored_pixels: int

    def markdown(self, baseline_label: Optional[str] = None) -> str:
        """Per-class IoU (baseline, + FSA, Δ), then mIoU, aAcc and mAcc, as a markdown table.

        baseline_label names the baseline in the header (default: the method's display name).
        """
        base = baseline_label or METHOD_LABELS.get(self.method, self.method)
        rows = [(name, self.baseline.iou[i], None if self.fsa is None else self.fsa.iou[i])
                for i, name in enumerate(self.class_names)]
        summary = [(f"**{key}**", getattr(self.baseline, attr), None if self.fsa is None else getattr(self.fsa, attr))
                   for key, attr in (("mIoU", "miou"), ("aAcc", "aacc"), ("mAcc", "macc"))]
        if self.fsa is None:
            lines = [f"| class | {base} IoU |", "|---|---:|"]
            lines += [f"| {_cell_text(name)} | {_pct(b)} |" for name, b, _ in rows + summary]
        else:
            lines = [f"| class | {base} IoU | {base} + FSA IoU | Δ |", "|---|---:|---:|---:|"]
            lines += [f"| {_cell_text(name)} | {_pct(b)} | {_pct(f)} | {_delta(b, f)} |"
                      for name, b, f in rows + summary]
        note = (f"\n\n{self.labelled_pixels} labelled pixels, {self.ignored_pixels} ignored. IoU and accuracies "
                "in %, mmseg's rules: n/a = class neither in the reference nor predicted (left out of the means); "
                "a class predicted but absent from the reference has IoU 0 and counts.")
        if self.fsa is None:
            note += " FSA was off in this run: baseline only."
        return "\n".join(lines) + note


def _cell_text(name: str) -> str:
    return str(name).replace("|", "\\|")


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


def _delta(before: float, after: Optional[float]) -> str:
    if after is None or math.isnan(before) or math.isnan(after):
        return ""
    return f"{after - before:+.2f}"


def score_against(baseline, fsa_result, reference: np.ndarray) -> ScoreReport:
    """Score ``baseline`` and ``fsa_result`` (`fsa.SegmentationResult`s of one run; ``fsa_result`` may be
    None) against ``reference`` ``(H, W)`` int (class indices of their ``class_names``, 255 = ignore).

    ValueError when the sizes differ (both are named; nothing is resized), when the two results have
    different classes, when a value names no class, or when every reference pixel is ignored.
    """
    names = tuple(str(n) for n in baseline.class_names)
    if fsa_result is not None and tuple(str(n) for n in fsa_result.class_names) != names:
        raise ValueError("the baseline and FSA results have different classes; score results of one run")
    reference = np.asarray(reference)
    if reference.ndim != 2:
        raise ValueError(f"the reference must be an (H, W) label map, got shape {reference.shape}")
    h, w = baseline.labels.shape
    if reference.shape != (h, w):
        rh, rw = reference.shape
        downscaled = [n for n in getattr(baseline, "notes", []) if "downscaled" in n]
        raise ValueError(
            f"the reference mask is {rw}×{rh} pixels but the segmented image is {w}×{h}: give a mask of "
            f"exactly {w}×{h} (masks are not resized)" + "".join(f"; note: {n}" for n in downscaled))
    reference = reference.astype(np.int64, copy=False)
    _check_indices(reference, names)
    labelled = int((reference != IGNORE_INDEX).sum())
    if labelled == 0:
        raise ValueError(f"every pixel of the reference mask is {IGNORE_INDEX} (ignore): there is nothing to score")
    n = len(names)
    fsa_scores = None if fsa_result is None else scores(area_stats(fsa_result.labels, reference, n))
    return ScoreReport(class_names=names, method=str(baseline.method),
                       baseline=scores(area_stats(baseline.labels, reference, n)), fsa=fsa_scores,
                       labelled_pixels=labelled, ignored_pixels=int(reference.size - labelled))


def reference_at_size(reference: np.ndarray, size: tuple[int, int],
                      source_size: Optional[tuple[int, int]] = None) -> tuple[np.ndarray, str]:
    """A reference ``(H, W)`` at the segmented `size` (h, w) is used as it is; one at the user's image size
    `source_size` (width, height) is brought to the segmented size (nearest neighbour). The note says which
    size was used. Any other size: without `source_size` it is returned as it is (and left to
    `score_against`); with it, a ValueError names both accepted sizes."""
    h, w = size
    rh, rw = reference.shape
    if (rh, rw) == (h, w):
        same = source_size is not None and tuple(source_size) == (w, h)
        return reference, ("" if source_size is None else
                           f"The reference was used at the {'uploaded and ' if same else ''}segmented size, "
                           f"{w}×{h} pixels.")
    if source_size is None:
        return reference, ""
    sw, sh = source_size
    if (rw, rh) != (sw, sh):
        raise ValueError(f"the reference mask is {rw}×{rh} pixels but the segmented image is {w}×{h}: give it "
                         f"at that size or at the size of the image you uploaded ({sw}×{sh})")
    small = cv2.resize(reference.astype(np.uint16), (w, h), interpolation=cv2.INTER_NEAREST)
    return small.astype(np.int64), (f"The reference was given at the uploaded size, {rw}×{rh} pixels; the image "
                                    f"was segmented at {w}×{h}, so the reference was reduced to that size "
                                    f"(nearest-neighbour sampling) before scoring.")


def score_reference(source: MaskSource, baseline, fsa_result=None, *, colors: Optional[np.ndarray] = None,
                    source_size: Optional[tuple[int, int]] = None) -> tuple[ScoreReport, np.ndarray, str]:
    """Read a reference mask (`read_reference_mask`, with the results' classes and `colors`), bring it to the
    results' size when it has the size `source_size` (width, height) of the image the user gave
    (`reference_at_size`), and score both results (`score_against`) → (report, reference labels, note).
    """
    names = tuple(str(n) for n in baseline.class_names)
    reference = read_reference_mask(source, names, colors)
    reference, note = reference_at_size(reference, baseline.labels.shape, source_size)
    return score_against(baseline, fsa_result, reference), reference, note


__all__ = ["IGNORE_COLORS", "MaskSource", "ScoreReport", "read_reference_mask", "reference_at_size",
           "score_against", "score_reference"]
