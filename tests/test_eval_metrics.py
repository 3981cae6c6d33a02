"""The metric against an independent confusion-matrix implementation, and the presets table."""
import math

import numpy as np
import pytest

from _confusion import confusion, reference_scores
from fsa.evaluation.metrics import area_stats, scores
from fsa.evaluation.presets import BENCHMARK_ORDER, published_preset, with_overrides


def test_scores_equal_the_confusion_matrix_over_the_split():
    rng = np.random.default_rng(0)
    c = 6
    preds, labels = [], []
    for shape in [(7, 9), (5, 4), (11, 3)]:
        label = rng.integers(0, 4, shape)  # classes 4 and 5 never labelled ...
        label[0] = 255  # ... ignore pixels on a border
        pred = rng.integers(0, 5, shape)  # ... class 4 predicted but absent: IoU 0, counted; class 5: NaN
        preds.append(pred)
        labels.append(label)
    total = sum(area_stats(p, t, c) for p, t in zip(preds, labels))
    got = scores(total)
    miou, aacc, macc, iou = reference_scores(confusion(preds, labels, c))
    assert got.miou == pytest.approx(miou) and got.aacc == pytest.approx(aacc) and got.macc == pytest.approx(macc)
    assert got.iou[4] == 0.0 and math.isnan(got.iou[5])
    assert np.allclose(got.iou[:5], iou[:5])
    # per image means would differ: the split's areas are summed first
    per_image = np.nanmean([scores(area_stats(p, t, c)).miou for p, t in zip(preds, labels)])
    assert abs(per_image - got.miou) > 1e-6


def test_ignored_pixels_do_not_count_and_bad_values_are_refused():
    label = np.array([[0, 255], [1, 1]])
    pred = np.array([[0, 1], [1, 0]])
    stats = area_stats(pred, label, 2)
    assert stats.tolist() == [[1, 1], [2, 1], [1, 2]]
    with pytest.raises(ValueError, match="outside"):
        area_stats(np.array([[2]]), np.array([[0]]), 2)
    with pytest.raises(ValueError, match="outside"):
        area_stats(np.array([[0]]), np.array([[7]]), 2)
    with pytest.raises(ValueError, match="differ"):
        area_stats(np.zeros((2, 2), int), np.zeros((2, 3), int), 2)


def test_json_rounds_to_two_decimals_and_nan_is_null():
    s = scores(np.array([[1, 0, 0], [3, 0, 1], [1, 0, 0]]))
    d = s.as_dict(["a", "b", "c"])
    assert d["per_class"] == {"a": round(100 / 3, 2), "b": None, "c": 0.0}
    assert d["mIoU"] == round((100 / 3 + 0) / 2, 2)


def test_presets_are_the_published_table():
    p = published_preset("proxyclip", "voc21")
    assert (p.short_side, p.crop, p.stride, p.logit_scale, p.prob_thd) == (336, 336, 112, 40.0, 0.2)
    assert published_preset("proxyclip", "context60", fsa=True).prob_thd == 0.14
    assert published_preset("proxyclip", "coco_object", fsa=True).prob_thd == 0.30
    city, city_fsa = published_preset("proxyclip", "cityscapes"), published_preset("proxyclip", "cityscapes", fsa=True)
    assert (city.short_side, city.crop, city.stride, city_fsa.stride) == (448, 224, 112, 80)
    assert published_preset("proxyclip", "ade20k").short_side == 448
    sclip = published_preset("sclip", "voc21")
    assert (sclip.logit_scale, sclip.prob_thd, sclip.area_thd) == (65.0, 0.1, 0.1)
    assert published_preset("sclip", "cityscapes").short_side == 560
    assert published_preset("naclip", "voc20").crop == 0 and published_preset("naclip", "ade20k").crop == 224
    clear = published_preset("clearclip", "cityscapes")
    assert (clear.short_side, clear.crop, clear.stride, clear.logit_scale) == (448, 224, 224, 50.0)
    for method in ("proxyclip", "clearclip", "sclip", "naclip", "maskclip"):
        for bench in ("voc20", "context59", "coco_stuff", "cityscapes", "ade20k"):
            assert published_preset(method, bench).prob_thd == 0.0  # no background class there
    assert published_preset("maskclip", "voc21").source == "ours"
    assert with_overrides(p, stride=56).stride == 56 and "overrides" in with_overrides(p, stride=56).source
    assert set(BENCHMARK_ORDER) == {"voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff",
                                    "cityscapes", "ade20k"}
    with pytest.raises(ValueError, match="unknown benchmark"):
        published_preset("sclip", "voc")
