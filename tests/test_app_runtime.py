"""The app's runtime bounds, through its callbacks (no server): our own decoding of uploads, refusals over
the memory budgets, the small per-session record, compare-all one method at a time, the limits' parsing."""
from __future__ import annotations

import gc
import weakref
from pathlib import Path

import cv2
import gradio as gr
import numpy as np
import pytest
from PIL import Image

from fsa import visualize as viz
from fsa.demo.forms import MEAN_HEADS
from fsa.demo.guards import friendly_errors
from fsa.demo.handlers import DemoApp
from fsa.demo.limits import ATTENTION_BUDGET_BYTES, ATTENTION_COPIES, CLASS_BUDGET_PIXELS, RuntimeLimits, class_budget_message, window_batch_for
from fsa.demo.page import build_demo
from fsa.demo.server import prune_empty_dirs
from fsa.demo.views import COMPARE_CELL_WIDTH
from _app_fixtures import run, select, write_bad_images
from fsa.config import METHOD_DEFAULTS, METHODS
from fsa.images import read_bounded, working_size

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app():
    return DemoApp(short_side=64, limits=RuntimeLimits())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths of a good photo, a big photo and the bad inputs the load test found."""
    folder = tmp_path_factory.mktemp("uploads")
    paths = write_bad_images(folder)
    photo = Image.open(REPO / "examples" / "coffee.jpg").convert("RGB")
    paths["big"], paths["big_png"] = folder / "coffee_big.jpg", folder / "big.png"
    photo.resize((1500, 1000), Image.Resampling.BICUBIC).save(paths["big"], quality=92)
    photo.resize((1500, 1000)).save(paths["big_png"])
    return {k: str(v) for k, v in paths.items()}


# --------------------------------------------------------------------------- our own decoding
@pytest.mark.parametrize(
    "name, message",
    [
        ("text", r"cannot read notes.png as an image \(cannot identify image file 'notes.png'\); use a PNG, JPEG"),
        ("empty", r"empty.png is an empty file \(0 bytes\)"),
        ("truncated", r"cannot read cut.jpg as an image \(image file is truncated"),
    ],
)
def test_bad_uploads_are_named_by_our_decoder(app, files, name, message):
    for handler in ("run", "compare_all", "api_attention"):
        with pytest.raises(gr.Error, match=message) as info:
            if handler == "run":
                run(app, files[name])
            elif handler == "compare_all":
                friendly_errors(app.compare_all)(files[name], "cup", None, True, True, True, True, 3.0,
                                                          0.45, 64, 0.0, progress=None)
            else:
                friendly_errors(app.api_attention)(None, files[name], "cup", "clearclip", 3, 3, None,
                                                            progress=None)
        assert "Traceback" not in str(info.value) and "/tmp" not in str(info.value)


def test_a_large_upload_is_segmented_at_the_working_size(app, files):
    baseline, fsa_mask, summary, record, *_ = run(app, files["big"], vocabulary="cup, table")
    wh, ww = working_size(1000, 1500, 64)
    assert record.image.shape == (wh, ww, 3) and record.input_size == (1500, 1000)
    assert fsa_mask.shape[1] == ww and baseline.shape[1] == ww
    # the masks are those of the library on the same decoded picture: nothing is lost on the way
    decoded = read_bounded(files["big"], 64).rgb
    np.testing.assert_array_equal(record.image, decoded)
    d = METHOD_DEFAULTS["clearclip"]
    settings = app.settings("clearclip", True, True, True, True, 3.0, 0.45, 64, d.crop, d.stride, d.logit_scale, 0.0)
    direct = app.segmenter().compare(decoded, "cup, table", settings)
    colors = viz.class_colors(direct.fsa.class_names)
    expected = viz.segmentation_panel(decoded, direct.fsa.labels, direct.fsa.class_names, colors=colors)
    np.testing.assert_array_equal(fsa_mask[:wh], expected)
    # a click given in the upload's pixels lands on the same spot of the working picture
    *_, clicked = app.click_input(record, MEAN_HEADS, select(750, 500))
    assert clicked.point == pytest.approx((750 * ww / 1500, 500 * wh / 1000))


def test_the_session_record_holds_no_full_resolution_maps(app, files):
    import pickle

    # 32-px windows every 16 px over the 96×64 working picture: 3 × 5 = 15 windows of 2×2 patches, in batches
    record = run(app, files["big"], vocabulary="cup, table", crop=32, stride=16)[3]
    h, w = record.image.shape[:2]
    assert (h, w) == (64, 96) and len(record.diagnostics.windows) == 15
    for name in ("baseline", "fsa", "probabilities", "confidence"):
        assert not hasattr(record, name)
    # the label maps scoring needs: one byte a pixel, at the picture's size
    for labels in (record.labels, record.fsa_labels):
        assert labels.dtype == np.uint8 and labels.shape == (h, w)
    # What a click needs, in bytes: the picture and its two label maps; per window the last block's q and k
    # (4 heads × (1 + 4 tokens) × 16, float32: the tiny model is 64 wide in heads of 16) and at most three
    # 4 patches × 2 classes float32 maps (Π, the cosines behind Z and behind U). Pickled (each tensor with all
    # of the storage it keeps alive), the record may add a header of 512 bytes per tensor (5 a window) and
    # 8 KiB for the rest. A (h, w) float32 map more (24 KiB), or q and k kept as views of their batch's qkv
    # (12× their size here), do not fit.
    needed = h * w * 3 + 2 * h * w + 15 * (2 * 4 * 5 * 16 * 4 + 3 * 4 * 2 * 4)
    size, bound = len(pickle.dumps(record)), needed + 15 * 5 * 512 + 8 * 1024
    assert size < bound, f"the record pickles to {size} bytes; what it must hold allows {bound}"
    # a click builds the N×N matrices of its window for itself: the session's store stays lean
    app.click_mask(record, MEAN_HEADS, select(5, 5))
    assert record.diagnostics._cached is None


# --------------------------------------------------------------------------- budgets
def test_over_the_pixel_budget_is_refused(files):
    small_budget = DemoApp(short_side=64, preload=False, limits=RuntimeLimits(max_pixels=100_000))
    # a PNG has no reduced decoding: its full size counts
    with pytest.raises(gr.Error, match=r"big.png is 1500×1000 pixels \(1.5 megapixels\); this server decodes "
                                       r"at most 0.1 megapixels: downscale the image first"):
        run(small_budget, files["big_png"])


def test_too_many_classes_are_refused_with_the_limit(files):
    few = DemoApp(short_side=64, preload=False, limits=RuntimeLimits(max_classes=3))
    with pytest.raises(gr.Error, match=r"has 4 names \(class names and synonyms\); this server takes at most 3\. "
                                       r"Remove some names \(limit FSA_MAX_CLASSES=3\)"):
        run(few, files["photo"], vocabulary="cup; mug, table, saucer")
    run(few, files["photo"], vocabulary="cup; mug, table")  # 3 names: fine


def test_a_large_working_image_allows_fewer_classes(app, files):
    # 96×64 at a 2048-px short side: the long side is capped at 2048 → 2048×1365 working pixels
    wh, ww = working_size(64, 96, 2048, min_side=16)
    allowed = 150 * CLASS_BUDGET_PIXELS // (wh * ww)
    vocabulary = ", ".join(f"thing{i}" for i in range(allowed + 1))
    with pytest.raises(gr.Error, match=rf"takes at most {allowed} for a {ww}×{wh} working image \(lower the short "
                                       rf"side"):
        run(app, files["photo"], vocabulary=vocabulary, short_side=2048)


def test_a_window_over_the_attention_budget_is_refused(app, files):
    wh, ww = working_size(64, 96, 2048, min_side=16)
    tokens = (wh // 16) * (ww // 16)
    with pytest.raises(gr.Error, match=rf"A {ww}×{wh}-pixel window \({tokens} patches\) needs more attention memory "
                                       r"than this server allows\. Lower the window crop"):
        run(app, files["photo"], vocabulary="cup, table", short_side=2048, crop=0)


def test_window_batch_and_class_budget_formulas():
    # heads × (tokens + 1)² float32 matrices, ATTENTION_COPIES of them per window
    per_window = 12 * 785 ** 2 * 4 * ATTENTION_COPIES
    assert window_batch_for(784, 12, 4) == min(4, ATTENTION_BUDGET_BYTES // per_window)
    assert window_batch_for(784, 12, 4) == 4  # ViT-B/16's 448-px windows: the default batch fits
    assert window_batch_for(64 * 64, 16, 4) == 0  # a 1024-px window of ViT-L/14 does not
    assert class_budget_message(150, (448, 597), 150) is None  # a 4:3 photo at the default size
    assert "at most 150." in class_budget_message(151, (448, 597), 150)
    # a 16:9 photo has 448 × 796 working pixels: 150 · 597 · 448 / (448 · 796) = 112.5 → 112 names
    assert "at most 112 for a 796×448 working image" in class_budget_message(113, (448, 796), 150)
    assert class_budget_message(112, (448, 796), 150) is None
    assert "lower the short side" in class_budget_message(1, (4000, 4000), 1)


def test_limits_from_the_environment():
    assert RuntimeLimits.from_env({}) == RuntimeLimits()
    env = {"FSA_SESSION_TTL": "30", "FSA_MAX_PIXELS": "1e6", "FSA_MAX_CLASSES": "20", "FSA_TEMP_TTL": "60",
           "FSA_CONCURRENCY": "2"}
    assert RuntimeLimits.from_env(env) == RuntimeLimits(concurrency=2, session_ttl=30.0, max_pixels=1_000_000,
                                                         max_classes=20, temp_ttl=60.0)
    assert RuntimeLimits(temp_ttl=60.0).temp_sweep_every == 20.0
    for name, value in (("FSA_SESSION_TTL", "soon"), ("FSA_MAX_CLASSES", "0"), ("FSA_MAX_PIXELS", "2.5"),
                        ("FSA_CONCURRENCY", "-1")):
        with pytest.raises(ValueError, match=rf"{name}='{value}' is not a positive"):
            RuntimeLimits.from_env({name: value})


# --------------------------------------------------------------------------- compare all
def test_compare_all_holds_one_methods_results_at_a_time(app, files, monkeypatch):
    """The app draws each outcome's cells and drops it before the next one comes."""
    segmenter = app.segmenter()
    real = segmenter.iter_compare_methods
    earlier: list[weakref.ref] = []

    def tracking(*args, **kwargs):
        for outcome in real(*args, **kwargs):
            gc.collect()
            alive = [ref for ref in earlier if ref() is not None]
            assert not alive, f"{len(alive)} results of earlier baselines are still in memory"
            earlier.extend(weakref.ref(r) for r in (outcome.result, outcome.result.baseline, outcome.result.fsa))
            yield outcome

    monkeypatch.setattr(segmenter, "iter_compare_methods", tracking)
    grid, text = app.compare_all(files["photo"], "cup, table", None, True, True, True, True, 3.0, 0.45, 64, 0.0,
                                 progress=None)
    assert len(earlier) == 3 * len(METHODS)
    assert text.startswith(f"{len(METHODS)} baselines")
    assert grid.shape[1] == len(METHODS) * COMPARE_CELL_WIDTH + (len(METHODS) + 1) * 4


def test_compare_all_cells_equal_the_masks_of_each_method(app, files):
    """The cells drawn from the shared-trunk pass are, in the settings' order, the panels of each method run
    alone, resized as compare_grid does."""
    rgb = read_bounded(files["photo"], 64).rgb
    settings_list = [app.settings(m, True, True, True, True, 3.0, 0.45, 64, None, None, None, 0.0,
                                  keep_diagnostics=False) for m in METHODS]
    names, rows = app._infer_cells_impl(None, rgb, "cup, table", settings_list)
    assert [row[0] for row in rows] == list(METHODS)
    colors = viz.class_colors(names)
    for settings, (method, cells, seconds, error) in zip(settings_list, rows):
        assert error is None and seconds > 0
        out = app.segmenter().compare(rgb, "cup, table", settings)
        for cell, result in zip(cells, (out.baseline, out.fsa)):
            panel = viz.segmentation_panel(rgb, result.labels, names, colors=colors)  # 96×64
            expected = cv2.resize(panel, (256, round(64 * 256 / 96)), interpolation=cv2.INTER_LINEAR)
            np.testing.assert_array_equal(cell, expected, err_msg=method)


# --------------------------------------------------------------------------- the page's wiring
def test_queue_groups_and_progress(app):
    demo = build_demo(app)
    fns = {fn.api_name: fn for fn in demo.fns.values()}
    for name in ("segment_button", "segment", "compare_all"):
        assert (fns[name].concurrency_id, fns[name].concurrency_limit) == ("model", app.limits.concurrency)
    assert fns["attention"].concurrency_id == "attention"  # a cached click never waits behind passes
    for name in ("segment_button", "segment", "compare_all", "attention"):
        assert fns[name].show_progress == "full"  # the queue position and the progress bar
    clicks = [fn for fn in demo.fns.values() if fn.concurrency_id == "click"]
    # image, two masks, the patch button and its two number fields (Enter), head selector, common scale
    assert len(clicks) == 8
    state = next(b for b in demo.blocks.values() if isinstance(b, gr.State))
    assert state.time_to_live == app.limits.session_ttl
    assert demo.delete_cache == (int(app.limits.temp_sweep_every), int(app.limits.temp_ttl))


def test_prune_empty_dirs(tmp_path):
    import os
    import time

    old_empty, fresh_empty, old_full = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder in (old_empty, fresh_empty, old_full):
        folder.mkdir()
    (old_full / "mask.png").write_bytes(b"x")
    past = time.time() - 100
    for folder in (old_empty, old_full):
        os.utime(folder, (past, past))
    assert prune_empty_dirs(tmp_path, older_than=50) == 1
    assert not old_empty.exists() and fresh_empty.exists() and old_full.exists()
    assert prune_empty_dirs(tmp_path / "missing", older_than=50) == 0
