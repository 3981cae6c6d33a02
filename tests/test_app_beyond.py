"""The page's "Explore beyond the paper" section (issue 8): the three switches reach FeedbackConfig, bad
values are specific errors, the summary labels non-paper runs, and the "Feedback step by step" view of a
clicked patch (tiny random model, FSA_MODEL=tiny-test; handlers called directly)."""
from __future__ import annotations

import re
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from fsa import visualize as viz
from fsa.demo.forms import MEAN_HEADS
from fsa.demo.handlers import DemoApp
from fsa.demo.page import build_demo
from fsa.demo.views import NO_STEPS_MESSAGE
from _app_fixtures import count_compare_calls, run, select
import fsa

REPO = Path(__file__).resolve().parents[1]
W, H = 96, 64


@pytest.fixture(scope="module")
def app():
    return DemoApp(short_side=64)


@pytest.fixture(scope="module")
def photo():
    return Image.open(REPO / "examples" / "coffee.jpg").convert("RGB").resize((W, H))


@pytest.fixture(scope="module")
def depth(app):
    return len(app.segmenter().load().model.visual.transformer.resblocks)


@pytest.fixture
def compare_calls(app, monkeypatch):
    return count_compare_calls(app, monkeypatch)


def clicked(app, record, x=W * 0.6, y=H * 0.4):
    return app.click_mask(record, MEAN_HEADS, select(x, y))[-1]


# --------------------------------------------------------------------------- the switches
def test_defaults_are_the_paper(app, photo):
    _, _, summary, record, *_ = run(app, photo)
    assert record.key[3].feedback == fsa.FeedbackConfig(lam=3.0, p=0.45)
    assert "beyond the paper" not in summary
    # the paper's values spelled out are the paper too
    _, _, summary, record, *_ = run(app, photo, "kl", 1.0, "last")
    assert record.key[3].feedback == fsa.FeedbackConfig(lam=3.0, p=0.45) and "beyond the paper" not in summary


def test_switch_values_reach_feedback_config(app, photo, depth):
    _, fsa_mask, summary, record, *_ = run(app, photo, "js", 2.0, "last two")
    cfg = record.key[3].feedback
    assert (cfg.similarity, cfg.iterations, cfg.blocks) == ("js", 2, (depth - 1, depth))
    assert type(cfg.iterations) is int and fsa_mask.shape[1] == W
    assert (f"Not the paper's method, beyond the paper: similarity js, 2 iterations, blocks {depth - 1}, {depth}"
            in summary)
    ex = record.explain(10, 10)
    assert len(ex.iterations) == 2 and [b.block for b in ex.iterations[0].blocks] == [depth - 1, depth]
    # block numbers, in any order, with commas or spaces; the last block alone is the paper's setting
    assert app.feedback_switches(None, True, "sym_kl", 3, f"{depth}, 1")["blocks"] == (1, depth)
    assert app.feedback_switches(None, True, "kl", 1, f" {depth} ")["blocks"] is None
    assert app.feedback_switches(None, True, None, None, None) == dict(similarity="kl", iterations=1, blocks=None)
    assert app.feedback_switches(None, False, "js", 9, "nonsense") == {}  # FSA off: not used, not checked
    _, _, summary, _, *_ = run(app, photo, "sym_kl", 1, "")
    assert "beyond the paper: similarity sym_kl**" in summary


@pytest.mark.parametrize("beyond, message", [
    (("kl", 1, "x"), "blocks: 'x' is not a block number; type 1-based block numbers separated by commas"),
    (("kl", 1, "0"), "blocks: block 0 is outside 1..{depth} of this backbone's {depth}-block vision tower"),
    (("kl", 1, "{over}"), "blocks: block {over} is outside 1..{depth}"),
    (("kl", 1, "2, 2"), "blocks: block 2 is listed twice"),
    (("kl", 1, "3.5"), "blocks: '3.5' is not a block number"),
    (("kl", 1, "\u00b2"), "blocks: '\u00b2' is not a block number"),  # a digit to str.isdigit, not to int()
    (("kl", 2.5, ""), "iterations (feedback passes) must be a whole number in [1, 4], got 2.5"),
    (("kl", 5, ""), "iterations (feedback passes) must be a whole number in [1, 4], got 5"),
    (("cosine", 1, ""), "FeedbackConfig.similarity must be one of kl, sym_kl, js, got 'cosine'"),
])
def test_bad_switches_are_specific_errors(app, photo, depth, compare_calls, beyond, message):
    beyond = tuple(b.format(over=depth + 1) if isinstance(b, str) else b for b in beyond)
    message = message.format(depth=depth, over=depth + 1)
    with pytest.raises(gr.Error, match=re.escape(message)) as info:
        run(app, photo, *beyond)
    assert info.value.title == "Check the inputs" and compare_calls == []  # refused before any forward pass


def test_proxyclip_refuses_earlier_blocks(app, photo):
    with pytest.raises(gr.Error, match="proxyclip: FeedbackConfig.blocks can only be the last block"):
        run(app, photo, "kl", 1, "last two", method="proxyclip")


def test_api_segment_takes_the_switches(app, photo):
    baseline, fsa_mask, summary, record = app.api_segment(None, photo, "cup, table", "naclip", True, True, True, True,
                                                          3.0, 0.45, "js", 2, "", progress=None)
    cfg = record.key[3].feedback
    assert (cfg.similarity, cfg.iterations, cfg.blocks) == ("js", 2, None)
    assert "beyond the paper: similarity js, 2 iterations" in summary and fsa_mask.shape[1] == W
    # without them: the paper
    *_, record = app.api_segment(None, photo, "cup, table", "naclip", True, True, True, True, 3.0, 0.45,
                                 progress=None)
    assert record.key[3].feedback == fsa.FeedbackConfig()


# --------------------------------------------------------------------------- feedback step by step
def _lines(text):
    return [line for line in text.splitlines() if re.match(r"^[1-7]\. ", line)]


def test_step_view_before_a_click(app, photo):
    gallery, text, pass_update = app.feedback_steps(None, "pass 1", MEAN_HEADS)
    assert gallery == [] and text == NO_STEPS_MESSAGE and pass_update["choices"] == ["pass 1"]
    record = run(app, photo)[3]
    assert app.feedback_steps(record, "pass 1", None)[1] == NO_STEPS_MESSAGE  # no point clicked yet
    off = run(app, photo, fsa_on=False)[3]
    assert "FSA is off" in app.feedback_steps(off, "pass 1", None)[1]


def test_step_view_of_a_click_plays_every_pass(app, photo, compare_calls):
    record = clicked(app, run(app, photo, "kl", 2, "")[3])
    assert len(compare_calls) == 1
    ex = record.explain(*record.point)
    for t in (1, 2):
        gallery, text, pass_update = app.feedback_steps(record, f"pass {t}", MEAN_HEADS)
        assert pass_update["choices"] == ["pass 1", "pass 2"] and pass_update["value"] == f"pass {t}"
        assert len(gallery) == viz.FEEDBACK_STEPS == 7
        lines = _lines(text)
        assert len(lines) == 7 and [caption for _, caption in gallery] == lines
        assert f"Pass {t} of 2" in text
        it = ex.iterations[t - 1]
        # the panels are the explanation's data of this pass, drawn over the clicked patch's window
        image, win, patch = record.image, ex.window, ex.patch
        panels = [p for p, _ in gallery]
        np.testing.assert_array_equal(panels[3], viz.heatmap_overlay(image, win, it.similarity, patch))
        np.testing.assert_array_equal(panels[4], viz.heatmap_overlay(image, win, it.similarity, patch, kept=it.kept))
        np.testing.assert_array_equal(panels[5], viz.heatmap_overlay(image, win, it.attn_new, patch))
        np.testing.assert_array_equal(panels[6], viz.heatmap_overlay(image, win, it.attn_ensemble.mean(0), patch))
        colors = viz.class_colors(record.class_names)
        np.testing.assert_array_equal(panels[2], viz.class_bar_chart(ex.class_names, it.class_probs, colors))
        # the lines say what each step is, with this patch's numbers
        assert lines[0].startswith("1. Z = 20·cos: what " + ("the baseline" if t == 1 else "FSA's pass 1"))
        assert lines[1].startswith("2. U = 35·cos under uniform attention") and "everything attends to" in lines[1]
        assert lines[2].startswith("3. Π = softmax(Z − U)")
        best = ex.class_names[int(np.argmax(it.class_probs))]
        assert f"most likely: {best} {it.class_probs.max():.2f}" in lines[2]
        assert lines[3].startswith("4. Ŝ[i] = 1/(1 + KL(Π_i‖Π_j))")
        assert f"keeps the {int(it.kept.sum())} of {it.kept.size} patches" in lines[4]
        assert lines[5].startswith("6. A_new[i]") and lines[6].startswith("7. A_ens[i]")
        assert "what FSA uses" in lines[6] and "mean over heads" in lines[6]
    assert "beyond the paper" in text and "2 iterations" in text  # pass 2 of a non-paper run is labelled
    # one head instead of the mean, and a pass beyond the run's count falls back to its last
    gallery, text, pass_update = app.feedback_steps(record, "pass 4", "head 2")
    np.testing.assert_array_equal(gallery[6][0], viz.heatmap_overlay(
        record.image, ex.window, ex.iterations[1].attn_ensemble[1], ex.patch))
    assert pass_update["value"] == "pass 2" and "head 2" in _lines(text)[6]
    assert len(compare_calls) == 1  # the step view runs no network pass


def test_step_view_follows_the_switches(app, photo):
    record = clicked(app, run(app, photo, "js", 1, "", isolation=False, pruning=False, ensemble=False)[3])
    gallery, text, _ = app.feedback_steps(record, "pass 1", None)
    lines = _lines(text)
    assert len(lines) == 7 and len(gallery) == 7
    assert "isolation is off" in lines[1] and lines[2].startswith("3. Π = softmax(Z):")
    assert lines[3].startswith("4. Ŝ[i] = 1/(1 + JS(Π_i, Π_j))") and "beyond the paper" in lines[3]
    assert "pruning is off" in lines[4] and "ensemble is off" in lines[6]
    assert "Not the paper's method, beyond the paper: similarity js" in text
    assert tuple(gallery[1][0][0, 0]) == (245, 245, 245)  # step 2: a card saying isolation is off
    paper = clicked(app, run(app, photo)[3])
    _, text, _ = app.feedback_steps(paper, "pass 1", None)
    assert "beyond the paper" not in text and "Pass 1 of 1" in text


def test_page_has_the_section_closed_with_labelled_switches(app):
    demo = build_demo(app)
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    section = by_id["beyond-section"]
    assert section.label == "Explore beyond the paper" and section.open is False
    similarity = by_id["beyond-similarity"]
    assert similarity.value == "kl"
    labels = dict((value, label) for label, value in similarity.choices)
    assert "(the paper)" in labels["kl"] and all("(beyond the paper)" in labels[v] for v in ("sym_kl", "js"))
    assert by_id["beyond-iterations"].value == 1 and "beyond the paper" in by_id["beyond-iterations"].label
    assert by_id["beyond-blocks"].value == "" and "beyond the paper" in by_id["beyond-blocks"].label
    assert {"steps-gallery", "steps-text", "steps-pass"} <= set(by_id)
    # the section comes after the existing ones
    order = [b.elem_id for b in demo.blocks.values() if isinstance(b, gr.Accordion)]
    assert order[-1] == "beyond-section"


def test_steps_are_drawn_only_while_their_section_is_open(app, monkeypatch):
    drawn = []
    monkeypatch.setattr(app, "feedback_steps", lambda *args: drawn.append(args) or ("g", "t", "p"))
    assert app.feedback_steps_if_shown("rec", "pass 1", None, False) == (gr.skip(),) * 3
    assert drawn == []
    assert app.feedback_steps_if_shown("rec", "pass 1", None, True) == ("g", "t", "p")
    assert drawn == [("rec", "pass 1", None)]
    demo = build_demo(app)
    section = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "steps-section")
    triggers = {(t[0], t[1]) for dep in demo.fns.values() for t in dep.targets}
    assert (section._id, "expand") in triggers and (section._id, "collapse") in triggers
