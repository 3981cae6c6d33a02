"""The page's callbacks (app.DemoApp), called directly with the tiny random model (FSA_MODEL=tiny-test)."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from fsa import visualize as viz
from fsa.demo.forms import MEAN_HEADS, head_choices
from fsa.demo.guards import check_number_inputs, friendly_errors
from fsa.demo.handlers import DemoApp
from fsa.demo.page import EXAMPLES, build_demo
from fsa.demo.server import server_options
from _app_fixtures import VOCAB, count_compare_calls, run, select
import fsa
from fsa.checks import NumericalError
from fsa.config import METHOD_DEFAULTS, METHODS
from fsa.scoring import score_against
from fsa.vocabulary import parse_vocabulary

REPO = Path(__file__).resolve().parents[1]
W, H = 96, 64


@pytest.fixture(scope="module")
def app():
    return DemoApp(short_side=64)


@pytest.fixture(scope="module")
def photo():
    return Image.open(REPO / "examples" / "coffee.jpg").convert("RGB").resize((W, H))


def _fsa_args(fsa_on=True, lam=3.0, p=0.45):
    return [fsa_on, True, True, True, lam, p]


@pytest.fixture(scope="module")
def first_run(app, photo):
    return run(app, photo)


@pytest.fixture
def compare_calls(app, monkeypatch):
    """Counts forward passes (Segmenter.compare) of the app's default segmenter."""
    return count_compare_calls(app, monkeypatch)


# --------------------------------------------------------------------------- app object
def test_app_defaults_and_status(app):
    assert app.default_backbone == fsa.TINY_TEST and app.is_test_model
    assert "random weights" in app.status_markdown()
    assert app.weights_error is None
    assert app.backbone_choices()[0] == fsa.TINY_TEST
    # the tiny model's tower is 64 wide in heads of 16: 4 heads, and the page's head menu lists each
    assert app.num_heads == 4 == app.segmenter().load().model.visual.transformer.resblocks[0].attn.num_heads
    menu = next(b for b in build_demo(app).blocks.values() if getattr(b, "elem_id", None) == "head")
    assert [value for _, value in menu.choices] == ["mean over heads", "head 1", "head 2", "head 3", "head 4"]


def test_method_defaults_follow_config(app):
    published = DemoApp(preload=False)  # no fixed short side: each method's published one
    for method in METHODS:
        d = METHOD_DEFAULTS[method]
        assert published.method_defaults(method) == (d.short_side, d.crop, d.stride, d.logit_scale)
        assert app.method_defaults(method) == (64, d.crop, d.stride, d.logit_scale)  # the app's fixed one
    assert [published.short_side_for(m) for m in ("proxyclip", "sclip", "naclip", "clearclip")] == [336, 336, 336, 448]
    assert published.settings("sclip", True, True, True, True, 3.0, 0.45).resolved_short_side() == 336
    assert DemoApp.backbone_defaults("ViT-H-14") == pytest.approx(2.3)
    assert DemoApp.backbone_defaults("ViT-B-16") == pytest.approx(3.0)


def test_settings_from_fields(app):
    s = app.settings("naclip", True, False, True, False, 4.5, 0.3, 320, 0, 112, 30.0, 0.2)
    assert s.method == "naclip" and s.short_side == 320 and s.crop == 0 and s.stride == 112
    assert s.logit_scale == 30.0 and s.prob_threshold == pytest.approx(0.2)
    assert s.feedback == fsa.FeedbackConfig(lam=4.5, p=0.3, isolation=False, pruning=True, ensemble=False)
    off = app.settings("maskclip", False, True, True, True, 3.0, 0.45)
    assert off.feedback is None and off.short_side == app.default_short_side and off.crop is None


def test_server_options_from_env(monkeypatch):
    for name in ("GRADIO_SERVER_PORT", "PORT", "GRADIO_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert server_options() == {"server_name": None, "server_port": None}
    monkeypatch.setenv("PORT", "8123")
    assert server_options() == {"server_name": "0.0.0.0", "server_port": 8123}
    monkeypatch.setenv("GRADIO_SERVER_PORT", "9001")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "127.0.0.1")
    assert server_options() == {"server_name": "127.0.0.1", "server_port": 9001}


# --------------------------------------------------------------------------- Segment
def test_run_returns_both_masks_and_summary(app, photo, first_run):
    baseline, fsa_mask, summary, record, *cleared = first_run
    for mask in (baseline, fsa_mask):
        assert mask.dtype == np.uint8 and mask.shape[1] == W and mask.shape[0] > H  # legend below the picture
    assert record.diagnostics is not None and record.image.shape[:2] == (H, W)
    assert record.input_size == (W, H)
    # the same pass through the library directly: same grid, same masks
    d = METHOD_DEFAULTS["clearclip"]
    settings = app.settings("clearclip", *_fsa_args(), 64, d.crop, d.stride, d.logit_scale, 0.0)
    direct = app.segmenter().compare(photo, VOCAB, settings)
    gh, gw = direct.fsa.grid
    assert f"{gh}×{gw}" in summary and "ClearCLIP + FSA" in summary and "timings" in summary
    assert "random test weights" in summary
    assert cleared[:5] == [None] * 5 and "Click" in cleared[5]
    assert record.class_names == tuple(direct.fsa.class_names)
    # the picture part of each mask is the class colours over the image
    colors = viz.class_colors(direct.fsa.class_names)
    for mask, result in ((baseline, direct.baseline), (fsa_mask, direct.fsa)):
        expected = viz.segmentation_panel(result.image, result.labels, result.class_names, colors=colors)
        np.testing.assert_array_equal(mask[:H], expected)


def test_run_with_fsa_off(app, photo):
    baseline, fsa_mask, summary, record, *_ = run(app, photo, method="maskclip", fsa_on=False)
    assert baseline.shape[1] == W and fsa_mask is None and record.diagnostics is None
    assert "FSA off" in summary
    with pytest.raises(gr.Error, match="switch FSA on"):
        app.click_mask(record, MEAN_HEADS, select(10, 10))


@pytest.mark.parametrize("kind", ["uint16-gray", "rgba", "gray", "palette", "uint16-array"])
def test_run_accepts_common_image_kinds(app, photo, kind):
    rgb = np.asarray(photo)
    if kind == "uint16-gray":
        image = Image.fromarray(rgb[..., 1].astype(np.uint16) * 257)
        assert image.mode.startswith("I;16")
    elif kind == "rgba":
        image = photo.convert("RGBA")
    elif kind == "gray":
        image = photo.convert("L")
    elif kind == "palette":
        image = photo.convert("P")
    else:
        image = rgb.astype(np.uint16) * 257
    baseline, fsa_mask, summary, record, *_ = run(app, image, vocabulary="cup, table")
    assert record.image.shape == (H, W, 3)
    assert fsa_mask.shape[1] == W
    # a 16-bit image must not come out all white (values above 255 clipped)
    assert record.image.std() > 5


@pytest.mark.parametrize(
    "image, vocabulary, message",
    [
        (None, VOCAB, "Upload an image"),
        ("photo", "", "at least one class name"),
        ("photo", " ,; \n", "at least one class name"),
        ("photo", "cat, dog, cat", "listed twice"),
    ],
)
def test_run_bad_inputs_give_clear_errors(app, photo, image, vocabulary, message):
    image = photo if image == "photo" else image
    with pytest.raises(gr.Error, match=message) as info:
        run(app, image, vocabulary=vocabulary)
    assert "Traceback" not in str(info.value)


def test_unexpected_errors_become_gr_errors_without_traceback():
    def boom():
        raise KeyError("internal detail")

    with pytest.raises(gr.Error, match="Unexpected error") as info:
        friendly_errors(boom)()
    assert "Traceback" not in str(info.value)

    def missing():
        raise fsa.WeightsUnavailableError("ViT-B-16 CLIP weights are not in the cache; run `hf download ...`")

    with pytest.raises(gr.Error, match="hf download"):
        friendly_errors(missing)()


# --------------------------------------------------------------------------- clicked patch
def test_click_before_any_run_is_a_clear_error(app):
    for handler in (app.click_mask, app.click_input):
        with pytest.raises(gr.Error, match="Run a segmentation first"):
            friendly_errors(handler)(None, MEAN_HEADS, select(5, 5))


def test_click_reuses_the_sessions_forward_pass(app, photo, compare_calls):
    *_, record = run(app, photo)[:4]
    assert len(compare_calls) == 1
    outs = app.click_mask(record, MEAN_HEADS, select(W * 0.7, H * 0.4))
    original, new, adapted, similarity, chart, text, head_update, record2 = outs
    for img in (original, new, adapted, similarity):
        assert img.shape == (H, W, 3) and img.dtype == np.uint8
    assert chart.ndim == 3 and chart.shape[2] == 3
    assert "Query patch" in text and "mean over heads" in text
    assert record2.point == pytest.approx((W * 0.7, H * 0.4)) and record2.diagnostics is record.diagnostics
    # the marker is drawn where the query patch is
    exp = record.explain(W * 0.7, H * 0.4)
    y0, x0, y1, x1 = viz.patch_box(exp.window, exp.grid, exp.patch, original.shape)
    assert tuple(original[max(0, y0 - 1), (x0 + x1) // 2]) == viz.MARKER_COLOR
    # clicking again (another point, the input image, another head) runs no network pass
    app.click_mask(record2, "head 1", select(3, 3))
    app.click_input(record2, MEAN_HEADS, select(W - 1, H - 1))
    assert len(compare_calls) == 1
    assert head_update["choices"] == head_choices(exp.num_heads)


def test_click_on_a_padded_window_reports_the_window_inside_the_image(app):
    """100 px wide at short side 64: one window of 64×100, padded by 6 px left and right to 7 patches."""
    wide = Image.open(REPO / "examples" / "coffee.jpg").convert("RGB").resize((100, 64))
    record = run(app, wide)[3]
    outputs = app.click_mask(record, MEAN_HEADS, select(50, 30))
    text = outputs[5]
    assert "of a 4×7 grid, in the window x 0–100, y 0–64; its grid also covers the zero padding" in text


def test_click_on_input_image_scales_to_result_pixels(app, first_run):
    record = replace(first_run[3], input_size=(2 * W, 2 * H))  # as if the user's image was twice as large
    *_, new_record = app.click_input(record, MEAN_HEADS, select(2 * 10, 2 * 20))
    assert new_record.point == pytest.approx((10, 20))


def test_click_on_legend_or_outside_is_rejected(app, first_run):
    record = first_run[3]
    with pytest.raises(gr.Error, match="legend"):
        app.click_mask(record, MEAN_HEADS, select(5, H + 3))
    with pytest.raises(gr.Error, match="outside"):
        app.click_input(record, MEAN_HEADS, select(W + 5, 3))


def test_head_selector_redraws_without_a_run(app, first_run, compare_calls):
    record = first_run[3]
    assert app.change_head(record, "head 1") == (gr.skip(),) * 7  # nothing clicked yet
    *_, clicked = app.click_mask(record, MEAN_HEADS, select(W // 2, H // 2))
    mean_maps = app.change_head(clicked, MEAN_HEADS)
    head_maps = app.change_head(clicked, "head 2")
    assert not np.array_equal(mean_maps[0], head_maps[0]), "one head's A₀ row should differ from the mean"
    np.testing.assert_array_equal(mean_maps[1], head_maps[1])  # A_new is shared by all heads
    assert head_maps[6]["value"] == "head 2"
    assert compare_calls == []
    with pytest.raises(gr.Error, match="unknown head"):
        app.change_head(clicked, "head x")


# --------------------------------------------------------------------------- API handlers
def test_api_attention_runs_once_then_reuses(app, photo, compare_calls):
    outs = app.api_attention(None, photo, "cup, table", "sclip", 40, 30, MEAN_HEADS, progress=None)
    record = outs[-1]
    assert len(outs) == 7 and outs[0].shape == (H, W, 3)
    app.api_attention(record, photo, "cup, table", "sclip", 10, 10, "head 1", progress=None)
    assert len(compare_calls) == 1
    app.api_attention(record, photo, "cup, table", "naclip", 10, 10, "head 1", progress=None)  # new method
    assert len(compare_calls) == 2
    with pytest.raises(gr.Error, match="x and y"):
        app.api_attention(record, photo, "cup, table", "naclip", None, 10, None, progress=None)


def test_api_segment(app, photo):
    baseline, fsa_mask, summary, record = app.api_segment(None, photo, "cup, table", "gclip", True, True, False,
                                                          True, 3.0, 0.45, progress=None)
    assert baseline.shape[1] == W and fsa_mask.shape[1] == W and "GCLIP" in summary
    assert record.key[3].feedback.pruning is False


# --------------------------------------------------------------------------- score against a reference mask
def _reference_png(tmp_path, num_classes, size=(W, H)):
    """An index PNG: left half class 0, right half the last class, a middle band class 1, top rows ignored."""
    w, h = size
    ref = np.zeros((h, w), np.uint8)
    ref[:, w // 2:] = num_classes - 1
    ref[h // 3: h // 2] = 1
    ref[:4] = 255
    path = tmp_path / f"reference_{w}x{h}.png"
    Image.fromarray(ref).save(path)
    return str(path), ref.astype(np.int64)


def _miou_row(table):
    row = next(r for r in table.splitlines() if r.startswith("| **mIoU** |"))
    return [float(v) for v in row.split("|")[2:-1] if v.strip()]


def test_score_before_any_run_is_a_clear_error(app, tmp_path):
    path, _ = _reference_png(tmp_path, 3)
    with pytest.raises(gr.Error, match="Run a segmentation first"):
        friendly_errors(app.score)(None, path)


def test_score_the_sessions_last_run(app, first_run, tmp_path, compare_calls):
    record = first_run[3]
    path, ref = _reference_png(tmp_path, len(record.class_names))
    table, maps = app.score(record, path)
    expected = score_against(*record.masks(), ref)
    assert table.splitlines()[0] == "| class | ClearCLIP IoU | ClearCLIP + FSA IoU | Δ |"
    assert _miou_row(table)[:2] == [round(expected.baseline.miou, 2), round(expected.fsa.miou, 2)]
    # the two error maps side by side under their captions (14 px font + 10 px strip), the key below
    assert maps.dtype == np.uint8 and maps.shape[1] == 2 * W + 6 and maps.shape[0] > 24 + H
    for labels, x0 in ((record.labels, 0), (record.fsa_labels, W + 6)):
        panel = maps[24: 24 + H, x0: x0 + W]
        wrong = (labels != ref) & (ref != 255)
        assert (panel[wrong] == viz.ERROR_COLOR).all()
        assert not (panel[~wrong] == viz.ERROR_COLOR).all(axis=1).any()
    assert compare_calls == []  # scoring reuses the session's forward pass
    with pytest.raises(gr.Error, match="Upload a reference mask"):
        friendly_errors(app.score)(record, None)
    small, _ = _reference_png(tmp_path, 3, size=(W - 1, H))
    with pytest.raises(gr.Error, match=f"reference mask is {W - 1}×{H} pixels but the segmented image is {W}×{H}"):
        friendly_errors(app.score)(record, small)


def test_score_with_fsa_off_shows_the_baseline_only(app, photo, tmp_path):
    record = run(app, photo, method="maskclip", fsa_on=False)[3]
    path, ref = _reference_png(tmp_path, len(record.class_names))
    table, maps = app.score(record, path)
    assert table.splitlines()[0] == "| class | MaskCLIP IoU |"
    assert _miou_row(table) == [round(score_against(record.masks()[0], None, ref).baseline.miou, 2)]
    assert maps.shape[1] == W


def test_score_a_large_upload_reduces_the_reference_and_says_so(app, tmp_path):
    """A large upload is segmented at the working size; its full-size reference is brought to that size with
    nearest-neighbour sampling, and the table says so."""
    big = Image.open(REPO / "examples" / "coffee.jpg").convert("RGB").resize((2 * W, 2 * H))
    big_path = tmp_path / "big.png"
    big.save(big_path)
    record = run(app, str(big_path))[3]
    assert record.image.shape[:2] == (H, W) and record.input_size == (2 * W, 2 * H)
    path, ref = _reference_png(tmp_path, len(record.class_names), size=(2 * W, 2 * H))
    table, _ = app.score(record, path)
    assert f"given at the uploaded size, {2 * W}×{2 * H} pixels" in table and "reduced to that size" in table
    small = ref[::2, ::2]  # nearest neighbour by 2 keeps every other pixel
    assert _miou_row(table)[:2] == [round(score_against(*record.masks(), small).baseline.miou, 2),
                                    round(score_against(*record.masks(), small).fsa.miou, 2)]


def test_api_score_runs_once_then_reuses(app, photo, tmp_path, compare_calls):
    path, _ = _reference_png(tmp_path, 2)
    table, maps, record = app.api_score(None, photo, "cup, table", "sclip", path, progress=None)
    assert "SCLIP + FSA" in table and maps.shape[1] == 2 * W + 6
    app.api_score(record, photo, "cup, table", "sclip", path, progress=None)
    assert len(compare_calls) == 1
    with pytest.raises(gr.Error, match="reference mask"):
        app.api_score(record, photo, "cup, table", "sclip", None, progress=None)


# --------------------------------------------------------------------------- compare all
def test_compare_all_renders_every_baseline(app, photo):
    grid, text = app.compare_all(photo, "cup, table", None, True, True, True, True, 3.0, 0.45, 64, 0.0,
                                 progress=None)
    assert grid.dtype == np.uint8 and grid.shape[1] == len(METHODS) * 256 + (len(METHODS) + 1) * 4
    assert text.startswith(f"{len(METHODS)} baselines")
    # baselines as columns: two rows (without, with FSA) of 256-px-wide cells of the 96×64 image (256×171),
    # the legend and the labels on top
    assert 2 * 171 < grid.shape[0] < 3 * 171 + 200
    assert "λ = 3, p = 0.45" in text and "isolation on" in text
    with pytest.raises(gr.Error, match="Upload an image"):
        friendly_errors(app.compare_all)(None, "cup", None, True, True, True, True, 3.0, 0.45, 64, 0.0,
                                                  progress=None)


def test_examples_exist_with_licences():
    sources = (REPO / "examples" / "SOURCES.md").read_text()
    assert len(EXAMPLES) >= 5
    for name, vocabulary, method in EXAMPLES:
        assert (REPO / "examples" / name).is_file(), name
        assert name in sources, f"{name} has no entry in examples/SOURCES.md"
        assert method in METHODS and vocabulary.strip()
        parse_vocabulary(vocabulary)  # the vocabulary parses


def test_gpu_function_results_are_picklable(app, photo):
    """On ZeroGPU the forward pass runs in a forked worker and its result comes back pickled."""
    import pickle

    settings = app.settings("clearclip", True, True, True, True, 3.0, 0.45)
    direct = app._infer_impl(None, photo, "cup, table", settings)
    baseline, fsa_result = pickle.loads(pickle.dumps(direct))
    np.testing.assert_array_equal(baseline.labels, direct[0].labels)
    np.testing.assert_array_equal(fsa_result.labels, direct[1].labels)
    # the unpickled diagnostics explain a patch as the originals do, per head of the tiny model's 4
    before, after = direct[1].explain(10, 10), fsa_result.explain(10, 10)
    assert after.num_heads == 4 and after.attn_original.shape[0] == 4
    for name in ("attn_original", "attn_new", "attn_ensemble", "similarity", "class_probs"):
        np.testing.assert_array_equal(getattr(after, name), getattr(before, name))


# --------------------------------------------------------------------------- user errors vs bugs in the log
def _records(caplog):
    return [r for r in caplog.records if r.name == "fsa.app"]


@pytest.mark.parametrize(
    "error, shown",
    [
        (ValueError("FeedbackConfig.lam must be a finite number in [0, 88], got nan\n(λ)"),
         "FeedbackConfig.lam must be a finite number in [0, 88], got nan\n(λ)"),
        (gr.Error("Upload an image first.", title="No image"), "Upload an image first."),
        (FileNotFoundError("image file not found: x.png"), "image file not found: x.png"),
        (fsa.WeightsUnavailableError("ViT-B-16 CLIP weights are not in the cache"),
         "Model weights unavailable: ViT-B-16 CLIP weights are not in the cache"),
        (MemoryError(), "Out of memory"),
    ],
)
def test_a_user_error_is_one_log_line_without_traceback(error, shown, caplog):
    def callback():
        raise error

    caplog.set_level("INFO", logger="fsa.app")
    with pytest.raises(gr.Error) as info:
        friendly_errors(callback)()
    assert info.value.message.startswith(shown)
    assert info.value.print_exception is False  # or Gradio prints the traceback itself
    records = _records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    line = records[0].getMessage()
    assert records[0].exc_info is None and "\n" not in line and "Traceback" not in caplog.text
    assert line.startswith("callback: ") and " ".join(shown.split()) in line


@pytest.mark.parametrize("error", [RuntimeError("index 7 is out of bounds"), KeyError("internal"),
                                   NumericalError("class probabilities: 3 NaN and 0 infinite values out of 6")])
def test_a_bug_logs_its_traceback(error, caplog):
    def callback():
        raise error

    with pytest.raises(gr.Error) as info:
        friendly_errors(callback)()
    assert info.value.print_exception is False  # logged once, by us
    records = _records(caplog)
    assert len(records) == 1 and records[0].levelname == "ERROR"
    assert records[0].exc_info is not None and "Traceback" in caplog.text and type(error).__name__ in caplog.text
    if isinstance(error, NumericalError):
        assert info.value.message.startswith("class probabilities: 3 NaN")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lam", float("nan"), "FeedbackConfig.lam must be a finite number in [0, 88], got nan"),
        ("lam", 1e6, "FeedbackConfig.lam must be a finite number in [0, 88], got 1e+06"),
        ("lam", None, "FeedbackConfig.lam must be a finite number in [0, 88], got None"),
        ("p", float("inf"), "FeedbackConfig.p must be a finite number in (0, 1], got inf"),
        ("short_side", float("nan"), "SegmentSettings.short_side must be a whole number in [16, 2048], got nan"),
        ("short_side", 1e9, "SegmentSettings.short_side must be a whole number in [16, 2048], got 1e+09"),
        ("crop", float("nan"), "SegmentSettings.crop must be a whole number ≥ 16"),
        ("stride", float("inf"), "SegmentSettings.stride must be a whole number ≥ 1, got inf"),
        ("stride", -5, "SegmentSettings.stride must be a whole number ≥ 1, got -5"),
        ("logit_scale", float("-inf"), "SegmentSettings.logit_scale must be a finite number in (0, 1000], got -inf"),
        ("bg_threshold", float("nan"), "SegmentSettings.prob_threshold must be a finite number in [0, 1), got nan"),
    ],
)
def test_bad_numbers_in_the_fields_give_specific_errors(app, photo, field, value, message, compare_calls, caplog):
    fields = dict(lam=3.0, p=0.45, short_side=64, crop=224, stride=112, logit_scale=40.0, bg_threshold=0.0)
    fields[field] = value
    with pytest.raises(gr.Error, match=re.escape(message)) as info:
        run(app, photo, **fields)
    assert info.value.title == "Check the inputs" and compare_calls == []  # no forward pass, so no mask
    assert "Traceback" not in caplog.text


def test_number_inputs_are_checked_before_gradio_converts_them():
    with gr.Blocks() as demo:
        side = gr.Number(448, label="Short side (pixels)", precision=0, minimum=16, maximum=2048)
        lam = gr.Slider(0.0, 10.0, value=3.0, label="λ")
        free = gr.Number(label="x")
    check_number_inputs(demo)
    assert side.preprocess(448.0) == 448 and lam.preprocess(2.5) == 2.5 and free.preprocess(None) is None
    cases = [(side, float("nan"), "Short side (pixels) must be a finite number in [16, 2048], got nan"),
             (side, float("inf"), "Short side (pixels) must be a finite number in [16, 2048], got inf"),
             (side, 8, "Short side (pixels) must be a finite number in [16, 2048], got 8"),
             (lam, float("nan"), "λ must be a finite number in [0, 10], got nan"),
             (lam, 1e6, "λ must be a finite number in [0, 10], got 1e+06"),
             (lam, "3", "λ must be a finite number in [0, 10], got '3'"),
             (free, float("-inf"), "x must be a finite number, got -inf")]
    for component, payload, message in cases:
        with pytest.raises(gr.Error, match=re.escape(message)) as info:
            component.preprocess(payload)
        assert info.value.print_exception is False
