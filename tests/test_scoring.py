"""fsa.scoring: reading reference masks (index and colour PNGs) and scoring against an independent
confusion-matrix computation written here."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from PIL import Image

from _confusion import confusion, reference_scores
from fsa import SegmentationResult
from fsa import visualize as viz
from fsa.scoring import read_reference_mask, score_against

NAMES = ["cat", "sofa", "floor", "background"]
H, W = 12, 16


def _labels(seed=0, c=len(NAMES), shape=(H, W)):
    return np.random.default_rng(seed).integers(0, c, shape)


def _result(labels, names=NAMES, method="clearclip", fsa_enabled=False, notes=()):
    h, w = labels.shape
    return SegmentationResult(
        labels=np.asarray(labels, dtype=np.int64), confidence=np.ones((h, w), np.float32), class_names=list(names),
        image=np.full((h, w, 3), 120, np.uint8), method=method, fsa_enabled=fsa_enabled, backbone="tiny-test",
        is_test_model=True, grid=(1, 1), clip_grid=(1, 1), working_size=(h, w), windows=[], notes=list(notes))


# --------------------------------------------------------------------------- reading masks
def test_index_png_round_trip_with_ignore(tmp_path):
    labels = _labels()
    labels[0, :5] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)
    out = read_reference_mask(path, NAMES)
    assert out.dtype == np.int64 and out.shape == (H, W)
    np.testing.assert_array_equal(out, labels)
    assert (out[0, :5] == 255).all()


def test_palette_and_16bit_pngs_are_read_by_their_indices(tmp_path):
    labels = _labels(1)
    labels[-1] = 255
    pal = Image.fromarray(labels.astype(np.uint8), mode="P")
    pal.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, 200)])  # colours don't matter
    pal.save(tmp_path / "p.png")
    Image.fromarray(labels.astype(np.uint16)).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    for name in ("p.png", "i16.png"):
        np.testing.assert_array_equal(read_reference_mask(tmp_path / name, NAMES), labels)
    # a numpy array of indices and a PIL image work too
    np.testing.assert_array_equal(read_reference_mask(labels, NAMES), labels)
    np.testing.assert_array_equal(read_reference_mask(Image.open(tmp_path / "p.png"), NAMES), labels)


def test_colour_png_round_trip_in_the_apps_palette(tmp_path):
    labels = _labels(2)
    colors = viz.class_colors(NAMES)
    assert tuple(colors[3]) == viz.BACKGROUND_COLOR  # the "background" class is grey
    path = tmp_path / "colour.png"
    Image.fromarray(viz.colorize(labels, len(NAMES), colors)).save(path)
    np.testing.assert_array_equal(read_reference_mask(path, NAMES), labels)
    np.testing.assert_array_equal(read_reference_mask(path, NAMES, colors), labels)


def test_colour_mask_black_white_and_transparent_are_ignored(tmp_path):
    labels = _labels(3)
    rgb = viz.colorize(labels, len(NAMES), viz.class_colors(NAMES))
    rgb[0, 0] = (0, 0, 0)
    rgb[0, 1] = (255, 255, 255)
    rgba = np.concatenate([rgb, np.full((H, W, 1), 255, np.uint8)], axis=2)
    rgba[5, 5, 3] = 0  # fully transparent: ignored whatever its colour
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    expected = labels.copy()
    expected[0, 0] = expected[0, 1] = expected[5, 5] = 255
    np.testing.assert_array_equal(read_reference_mask(path, NAMES), expected)


def test_implicit_background_class_has_its_index_and_grey(tmp_path):
    names = ["cat", "sofa", "background"]  # as a result with a threshold and no "background" in the vocabulary
    labels = _labels(4, c=3)
    Image.fromarray(viz.colorize(labels, 3, viz.class_colors(names))).save(tmp_path / "c.png")
    out = read_reference_mask(tmp_path / "c.png", names)
    np.testing.assert_array_equal(out, labels)


def test_values_that_name_no_class_are_named(tmp_path):
    labels = _labels(5)
    labels[0, :3] = 7
    labels[1, 0] = 9
    labels[2, 0] = 255  # fine
    Image.fromarray(labels.astype(np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(ValueError) as info:
        read_reference_mask(tmp_path / "bad.png", NAMES)
    message = str(info.value)
    assert "4 pixels with values 7, 9, not class indices" in message and "0..3" in message
    assert "0 = cat" in message and "3 = background" in message and "255" in message


def test_unknown_colours_are_counted_and_listed(tmp_path):
    rgb = viz.colorize(_labels(6), len(NAMES), viz.class_colors(NAMES))
    rgb[0, :3] = (1, 2, 3)
    rgb[1, 0] = (231, 159, 0)  # one off the "cat" colour: an anti-aliasing fringe is not forgiven
    Image.fromarray(rgb).save(tmp_path / "u.png")
    with pytest.raises(ValueError) as info:
        read_reference_mask(tmp_path / "u.png", NAMES)
    message = str(info.value)
    assert "4 pixels in 2 colours" in message
    assert "(1, 2, 3) × 3" in message and "(231, 159, 0) × 1" in message
    assert "cat = (230, 159, 0)" in message and "black and white mean ignore" in message


def test_jpeg_and_grey_rgb_masks_get_a_hint(tmp_path):
    labels = _labels(7)
    Image.fromarray(viz.colorize(labels, len(NAMES), viz.class_colors(NAMES))).save(tmp_path / "m.jpg", quality=70)
    with pytest.raises(ValueError, match="JPEG compression changes colours: save the mask as PNG"):
        read_reference_mask(tmp_path / "m.jpg", NAMES)
    grey = np.repeat(labels[..., None], 3, axis=2).astype(np.uint8)
    with pytest.raises(ValueError, match=r"single-channel \(L\) PNG"):
        read_reference_mask(grey, NAMES)


def test_unreadable_and_unsupported_masks(tmp_path):
    (tmp_path / "not_an_image.png").write_text("hello")
    with pytest.raises(ValueError, match="cannot read the reference mask not_an_image.png"):
        read_reference_mask(tmp_path / "not_an_image.png", NAMES)
    with pytest.raises(ValueError, match="not found"):
        read_reference_mask(tmp_path / "missing.png", NAMES)
    Image.new("CMYK", (4, 4)).save(tmp_path / "cmyk.tif")
    with pytest.raises(ValueError, match="mode CMYK"):
        read_reference_mask(tmp_path / "cmyk.tif", NAMES)
    with pytest.raises(ValueError, match="integer class indices"):
        read_reference_mask(np.zeros((4, 4), np.float32), NAMES)


# --------------------------------------------------------------------------- scoring
def test_scores_equal_an_independent_confusion_matrix():
    rng = np.random.default_rng(8)
    names = NAMES + ["lamp"]  # class 4: in no reference and no baseline prediction → n/a for the baseline
    reference = rng.integers(0, 3, (H, W))  # class 3 never labelled ...
    reference[:2] = 255
    base = rng.integers(0, 4, (H, W))  # ... but predicted: IoU 0, counted in the mean
    fsa_labels = np.where(rng.random((H, W)) < 0.6, reference % 255, rng.integers(0, 5, (H, W)))
    fsa_labels[fsa_labels == 255] = 0
    report = score_against(_result(base, names), _result(fsa_labels, names, fsa_enabled=True), reference)
    for got, labels in ((report.baseline, base), (report.fsa, fsa_labels)):
        miou, aacc, macc, iou = reference_scores(confusion([labels], [reference], len(names)))
        assert got.miou == pytest.approx(miou) and got.aacc == pytest.approx(aacc) and got.macc == pytest.approx(macc)
        for g, e in zip(got.iou, iou):
            assert (math.isnan(g) and math.isnan(e)) or g == pytest.approx(e)
    assert report.baseline.iou[3] == 0.0 and math.isnan(report.baseline.iou[4])
    assert report.labelled_pixels == (H - 2) * W and report.ignored_pixels == 2 * W
    assert report.class_names == tuple(names)

    table = report.markdown()
    assert table.splitlines()[0] == "| class | ClearCLIP IoU | ClearCLIP + FSA IoU | Δ |"
    row = next(r for r in table.splitlines() if r.startswith("| **mIoU** |"))
    b, f, d = (float(v) for v in re.findall(r"[-+]?\d+\.\d+", row))
    assert b == round(report.baseline.miou, 2) and f == round(report.fsa.miou, 2)
    assert d == pytest.approx(report.fsa.miou - report.baseline.miou, abs=0.006)
    lamp = next(r for r in table.splitlines() if r.startswith("| lamp |"))
    assert lamp.split("|")[2].strip() == "n/a"


def test_fsa_off_reports_the_baseline_only():
    reference = _labels(9)
    report = score_against(_result(reference), None, reference)
    assert report.fsa is None and report.baseline.miou == pytest.approx(100.0)
    table = report.markdown("MaskCLIP")
    assert table.splitlines()[0] == "| class | MaskCLIP IoU |" and "FSA" in table.splitlines()[-1]
    assert "| **mIoU** | 100.00 |" in table


def test_score_errors_name_the_problem():
    labels = _labels(10)
    with pytest.raises(ValueError, match=r"reference mask is 15×12 pixels but the segmented image is 16×12.*"
                                         r"not resized"):
        score_against(_result(labels), None, labels[:, :15])
    with pytest.raises(ValueError, match="downscaled from"):
        score_against(_result(labels, notes=["image downscaled from 9000×6000 to 16×12 (longest side above "
                                             "4096)"]), None, np.zeros((24, 32), int))
    with pytest.raises(ValueError, match="nothing to score"):
        score_against(_result(labels), None, np.full((H, W), 255))
    bad = labels.copy()
    bad[0, 0] = 4
    with pytest.raises(ValueError, match="1 pixel with value 4, not a class index"):
        score_against(_result(labels), None, bad)
    with pytest.raises(ValueError, match="different classes"):
        score_against(_result(labels), _result(labels, NAMES[::-1]), labels)
