"""The segmentation metric written independently of `fsa`: a confusion matrix and the mmseg scores from it,
for the tests of fsa.evaluation.metrics, fsa.scoring and the evaluation harness."""
from __future__ import annotations

import math

import numpy as np


def confusion(preds, labels, c: int) -> np.ndarray:
    """(c, c) int64 pixel counts over every (prediction, label) pair of arrays: label row, prediction column,
    label 255 ignored."""
    m = np.zeros((c, c), dtype=np.int64)
    for pred, label in zip(preds, labels):
        pred, label = np.asarray(pred).ravel(), np.asarray(label).ravel()
        valid = label != 255
        np.add.at(m, (label[valid].astype(np.int64), pred[valid].astype(np.int64)), 1)
    return m


def reference_scores(m: np.ndarray) -> tuple[float, float, float, list[float]]:
    """(mIoU, aAcc, mAcc, per-class IoU), all in %: a class's IoU is NaN where its union is empty and left out
    of the mean; mAcc averages over the classes with labelled pixels."""
    inter = np.diag(m).astype(float)
    pred, true = m.sum(0), m.sum(1)
    iou = [100 * inter[i] / (pred[i] + true[i] - inter[i]) if pred[i] + true[i] > 0 else math.nan
           for i in range(len(m))]
    acc = [100 * inter[i] / true[i] for i in range(len(m)) if true[i] > 0]
    valid = [v for v in iou if not math.isnan(v)]
    return sum(valid) / len(valid), 100 * inter.sum() / m.sum(), sum(acc) / len(acc), iou
