"""What the page adds around DemoApp (fsa.demo.interactive, the accessible views): inline refusals that keep
the last masks, the patch row / column inputs, the class budget before Segment, HTML legends and alt texts,
and the score's size rule. Tiny random model (FSA_MODEL=tiny-test), called directly."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from fsa import visualize as viz
from fsa.config import METHOD_DEFAULTS
from fsa.demo.handlers import DemoApp
from fsa.demo.interactive import PageEvents
from fsa.demo.limits import CLASS_BUDGET_PIXELS, RuntimeLimits, class_budget
from fsa.demo.views import (
    LEGEND_ABSENT_TEXT, LEGEND_BACKGROUND, LEGEND_TEXT, budget_line, html_legend, mask_alt_text, point_marker,
)
from fsa.scoring import reference_at_size

REPO = Path(__file__).resolve().parents[1]
W, H = 96, 64


def contrast(a, b) -> float:
    """WCAG 2 contrast ratio of two sRGB colours (0-255 triples or #rrggbb)."""
    def rgb(c):
        return [int(c[i:i + 2], 16) for i in (1, 3, 5)] if isinstance(c, str) else list(c)

    def lum(c):
        ch = [v / 255 for v in rgb(c)]
        ch = [v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4 for v in ch]
        return 0.2126 * ch[0] + 0.7152 * ch[1] + 0.0722 * ch[2]

    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_contrast_formula_on_known_pairs():
    assert contrast("#000000", "#ffffff") == pytest.approx(21.0)
    assert contrast((150, 150, 150), (255, 255, 255)) == pytest.approx(2.96, abs=0.01)  # the old greyed names


def test_legend_texts_reach_aa_contrast():
    assert contrast(viz.ABSENT_TEXT_COLOR, (255, 255, 255)) >= 4.5
    assert contrast(LEGEND_ABSENT_TEXT, LEGEND_BACKGROUND) >= 4.5
    assert contrast(LEGEND_TEXT, LEGEND_BACKGROUND) >= 7.0


def test_html_legend_names_every_class_with_its_colour():
    names = ("cup", "table <wood>", "background")
    colors = viz.class_colors(names)
    labels = np.array([[0, 0, 0], [2, 2, 0]])  # "table" absent
    html = html_legend("Baseline (ClearCLIP)", names, colors, labels)
    for c in colors:
        assert "#%02x%02x%02x" % tuple(int(v) for v in c) in html
    assert "cup" in html and "table &lt;wood&gt;" in html and "<wood>" not in html
    assert html.count("(absent)") == 1 and "67%" in html and "33%" in html
    assert 'aria-label="Baseline (ClearCLIP) legend"' in html
    assert "FSA is off" in html_legend("Baseline + FSA", names, colors, None, "FSA is off: tick it")


def test_alt_text_names_the_method_and_the_largest_classes_first():
    names = ("cup", "table", "sky", "floor", "background")
    labels = np.array([0] * 10 + [1] * 50 + [2] * 30 + [4] * 10).reshape(10, 10)
    alt = mask_alt_text("Baseline + FSA (ClearCLIP + FSA)", names, labels)
    assert alt.startswith("Baseline + FSA (ClearCLIP + FSA)")
    assert "table 50%, sky 30%, cup 10%" in alt and "floor" not in alt


def test_class_budget_and_its_line():
    assert class_budget((448, 597), 150) == 150
    assert class_budget((896, 1194), 150) == int(150 * CLASS_BUDGET_PIXELS // (896 * 1194)) == 37
    line = budget_line(37, 40, (896, 1194))
    assert "Up to **37 names**" in line and "1194×896" in line and "remove 3" in line
    assert "The vocabulary has 5." in budget_line(37, 5, (896, 1194))


@pytest.fixture(scope="module")
def app():
    return DemoApp(short_side=64, limits=RuntimeLimits(max_classes=6))


@pytest.fixture(scope="module")
def events(app):
    return PageEvents(app)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("page") / "coffee.png"
    Image.open(REPO / "examples" / "coffee.jpg").convert("RGB").resize((W, H)).save(path)
    return str(path)


def test_budget_before_segment_and_unreadable_upload(events, photo, tmp_path):
    known, line = events.image_budget(photo, "clearclip", 64, "cup, table")
    assert known == (photo, 64, (64, 96))
    assert f"Up to **{class_budget((64, 96), 6)} names**" in line and "The vocabulary has 2." in line
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert "The vocabulary has 3." in events.image_budget(photo, "clearclip", 64, "a, b, c", known)[1]
    assert events.image_budget(str(bad), "clearclip", 64, "cup", known)[0] is None  # another image: decoded
    hw, line = events.image_budget(str(bad), "clearclip", 64, "cup")
    assert hw is None and "cannot be used" in line and str(tmp_path) not in line
    assert "Up to 6 names" in events.budget_text(None, "")


def _segment(events, record, photo, vocabulary, fsa_on=True):
    d = METHOD_DEFAULTS["clearclip"]
    return events.segment_button(record, photo, vocabulary, "clearclip", events.app.default_backbone, fsa_on, True,
                                 True, True, 3.0, 0.45, 64, d.crop, d.stride, d.logit_scale, 0.0, progress=None)


def test_a_refused_run_keeps_the_last_masks_and_says_why_inline(events, photo):
    out = _segment(events, None, photo, "cup, table, background")
    base, fsa_mask, summary, record = out[:4]
    assert base["value"].shape == (H, W, 3) and "segmentation mask" in base["alt_text"] and "patch grid" in summary
    assert fsa_mask["value"].shape == (H, W, 3)  # the legend is the HTML one beside the picture
    assert len(out) == 15 and "fsa-legend" in out[10] and "fsa-legend" in out[11]
    refused = _segment(events, record, photo, ", ".join(f"class {i}" for i in range(8)))
    assert len(refused) == 15
    assert all(v == gr.skip() for i, v in enumerate(refused) if i != 2)  # masks, record, maps: unchanged
    assert "8 names" in refused[2] and "at most 6" in refused[2] and "last run that worked" in refused[2]


def test_fsa_off_says_why_the_right_mask_is_empty(events, photo):
    out = _segment(events, None, photo, "cup, table", fsa_on=False)
    assert out[1]["value"] is None and "FSA is off" in out[1]["alt_text"] and "FSA is off" in out[11]


def test_patch_inputs_choose_the_patch_a_click_would(events, photo):
    record = _segment(events, None, photo, "cup, table, background")[3]
    rows, cols = record.patch_grid()
    ph, pw = record.patch_size()
    assert rows == int(np.ceil(H / ph - 1e-6)) and cols == int(np.ceil(W / pw - 1e-6))
    out = events.pick_patch(record, None, False, 2, 3)
    picked = out[7]
    x, y = picked.point
    assert (x, y) == pytest.approx((2.5 * pw, 1.5 * ph))
    assert out[9:] == (2, 3) and point_marker(picked) == f"{x / W:.5f} {y / H:.5f} {H / W:.5f}"
    clicked = events.click_mask(record, None, False, gr.SelectData(None, {"index": [x, y], "value": None}))
    assert clicked[5] == out[5]  # the same patch description as a click on its centre
    outside = events.pick_patch(record, None, False, rows + 1, 1)
    assert "outside this image's grid" in outside[5] and outside[0] == gr.skip()
    before = events.click_input(None, None, False, gr.SelectData(None, {"index": [1, 1], "value": None}))
    assert "Segment" in before[5] and all(v == gr.skip() for i, v in enumerate(before) if i != 5)


def test_common_scale_shares_the_colour_bar(events, photo):
    record = _segment(events, None, photo, "cup, table, background")[3]
    record = events.pick_patch(record, None, False, 1, 1)[7]
    own = events.redraw(record, None, False)
    shared = events.redraw(record, None, True)
    assert "share one colour scale" in shared[5] and "its own range" in own[5]
    assert own[0].shape == shared[0].shape and own[0].shape[0] > H  # a colour bar under the picture


def test_score_takes_the_uploaded_or_the_segmented_size():
    ref = np.arange(12 * 16).reshape(12, 16) % 3
    same, note = reference_at_size(ref, (12, 16), source_size=(32, 24))
    assert same is ref and "segmented size, 16×12" in note
    big = np.kron(ref, np.ones((2, 2), int))
    small, note = reference_at_size(big, (12, 16), source_size=(32, 24))
    np.testing.assert_array_equal(small, ref)
    assert "uploaded size, 32×24" in note
    with pytest.raises(ValueError, match=r"is 20×10 pixels but the segmented image is 16×12: .*uploaded \(32×24\)"):
        reference_at_size(np.zeros((10, 20), int), (12, 16), source_size=(32, 24))


def test_page_keeps_its_ids_and_explains_each_fsa_part(app):
    from fsa.demo.page import HELP, build_demo

    demo = build_demo(app)
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    for elem_id in ("image-input", "classes", "run", "mask-baseline", "mask-fsa", "attn-original", "attn-adapted"):
        assert elem_id in by_id, elem_id
    for elem_id, key in (("fsa-isolation", "isolation"), ("fsa-pruning", "pruning"), ("fsa-ensemble", "ensemble"),
                         ("fsa-lambda", "lambda"), ("fsa-p", "p")):
        assert by_id[elem_id].info == HELP[key] and len(HELP[key].split(".")) <= 3
    # the steps of the paper's method sit under the clicked patch, not in "Explore beyond the paper"
    accordions = [b.elem_id for b in demo.blocks.values() if isinstance(b, gr.Accordion)]
    assert accordions.index("steps-section") < accordions.index("beyond-section")
    assert not by_id["compare-section"].open  # closed until used
    assert by_id["patch-row"].precision == 0 and by_id["patch-col"].precision == 0
