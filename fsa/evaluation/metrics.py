"""mIoU, aAcc and mAcc exactly as mmsegmentation's IoUMetric computes them.

Per image, over the pixels whose label is not 255: per-class areas of the intersection, the
prediction and the label. The areas are summed over the whole split, then IoU_c = ΣI / (ΣP + ΣL − ΣI)
and Acc_c = ΣI / ΣL; a class with a zero denominator is NaN and left out of the means (a class
predicted but absent from every label has IoU 0 and counts). aAcc = ΣI / ΣL over all classes.
Percentages; the report rounds to 2 decimals as mmseg does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255


def area_stats(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(3, C) int64: per-class areas of intersection, prediction and label over the valid pixels.

    pred, label: (H, W) integer maps of the same shape; pred in 0..C−1, label in 0..C−1 or `ignore_index`.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
    valid = label != ignore_index
    p = pred[valid].astype(np.int64, copy=False)
    t = label[valid].astype(np.int64, copy=False)
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"prediction values outside 0..{num_classes - 1}")
    if t.size and t.max() >= num_classes:
        raise ValueError(f"label values outside 0..{num_classes - 1} (other than {ignore_index})")
    out = np.empty((3, num_classes), dtype=np.int64)
    out[0] = np.bincount(p[p == t], minlength=num_classes)
    out[1] = np.bincount(p, minlength=num_classes)
    out[2] = np.bincount(t, minlength=num_classes)
    return out


@dataclass(frozen=True)
class Scores:
    """Percentages; NaN for classes that are neither labelled nor predicted anywhere."""

    miou: float
    aacc: float
    macc: float
    iou: tuple[float, ...]  #: per class, in label order
    acc: tuple[float, ...]

    def per_class(self, names) -> dict[str, float]:
        return dict(zip(names, self.iou))

    def as_dict(self, names) -> dict:
        """JSON-ready (NaN becomes None), rounded to 2 decimals."""
        return {"mIoU": _round(self.miou), "aAcc": _round(self.aacc), "mAcc": _round(self.macc),
                "per_class": {name: _round(v) for name, v in zip(names, self.iou)}}


def _round(value: float):
    return None if math.isnan(value) else round(float(value), 2)


def scores(stats: np.ndarray) -> Scores:
    """(3, C) summed areas → the scores (see the module docstring)."""
    inter, pred, label = (stats[i].astype(np.float64) for i in range(3))
    union = pred + label - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
        acc = inter / label
        aacc = inter.sum() / label.sum() if label.sum() > 0 else float("nan")

    def mean(v: np.ndarray) -> float:
        finite = v[~np.isnan(v)]
        return float(finite.mean() * 100) if finite.size else float("nan")

    return Scores(mean(iou), float(aacc * 100), mean(acc), tuple(float(v) * 100 for v in iou),
                  tuple(float(v) * 100 for v in acc))
