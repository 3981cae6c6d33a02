"""Segmenter end to end on the tiny model: outputs, decisions, and the per-patch diagnostics."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fsa
from fsa.attention import attention_weights
from fsa.config import FeedbackConfig, SegmentSettings
from fsa.feedback import adapted_attention, output_similarity, prune_top_p


@pytest.fixture(scope="module")
def segmenter():
    return fsa.Segmenter("tiny-test", device="cpu")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)
    img[:, 70:] = [200, 30, 30]
    return img


def test_compare_shapes_and_probabilities(segmenter, image):
    pair = segmenter.compare(image, "cat; kitten, sofa, sky", SegmentSettings(method="clearclip", short_side=64))
    for res in (pair.baseline, pair.fsa):
        assert res.labels.shape == (90, 140)
        assert res.confidence.shape == (90, 140) and res.confidence.dtype == np.float32
        assert res.class_names == ["cat", "sofa", "sky"]
        assert res.labels.min() >= 0 and res.labels.max() < 3
        # the best of 3 class probabilities (maxima over synonyms of one softmax over 4 names)
        assert np.all(res.confidence <= 1 + 1e-6) and np.all(res.confidence >= 1 / 4 - 1e-6)
    assert not pair.baseline.fsa_enabled and pair.fsa.fsa_enabled
    assert pair.fsa.timings["total"] > 0


def test_segment_without_fsa_equals_the_compare_baseline(segmenter, image):
    settings = SegmentSettings(method="sclip", short_side=64, crop=48, stride=32)
    pair = segmenter.compare(image, "cat, sofa", settings)
    alone = segmenter.segment(image, "cat, sofa", SegmentSettings(method="sclip", short_side=64, crop=48, stride=32,
                                                                  feedback=None))
    assert np.array_equal(alone.labels, pair.baseline.labels)
    assert np.allclose(alone.confidence, pair.baseline.confidence, atol=1e-6)
    assert len(alone.windows) > 1  # the sliding path ran


def test_probabilities_follow_the_decision_rule(segmenter, image):
    """One whole-image window (the published whole-image path): OpenCV bilinear resize of the uint8 image,
    the published 0-255 constants, patch cosines straight to the original size, P = softmax(τ·cos),
    max over synonyms."""
    settings = SegmentSettings(method="clearclip", short_side=64, crop=0, feedback=None, logit_scale=30.0)
    res = segmenter.segment(image, "cat; kitten, sofa", settings)
    clip = segmenter.load()
    text = segmenter.text_cache.encode(clip, ["cat", "kitten", "sofa"])
    wh, ww = res.working_size
    assert (wh, ww) == (64, int(140 * 64 / 90 + 0.5))
    small = cv2.resize(image, (ww, wh), interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(small).permute(2, 0, 1)[None].float()
    mean = torch.tensor([122.771, 116.746, 104.094]).view(1, 3, 1, 1)
    std = torch.tensor([68.501, 66.632, 70.323]).view(1, 3, 1, 1)
    cos = fsa.patch_logits(clip.model, ((x - mean) / std).to(clip.dtype), text, "clearclip")
    cos = F.interpolate(cos, size=image.shape[:2], mode="bilinear", align_corners=False)[0]
    p = (30.0 * cos).softmax(0)
    expect = torch.stack([torch.maximum(p[0], p[1]), p[2]])
    assert np.allclose(res.confidence, expect.max(0).values.numpy(), atol=1e-5)
    decided = (expect[0] - expect[1]).abs().numpy() > 1e-4  # away from ties
    assert np.array_equal(res.labels[decided], expect.argmax(0).numpy()[decided])


def test_background_threshold(segmenter, image):
    vocab = "cat, sofa, background"
    low = segmenter.segment(image, vocab, SegmentSettings(method="maskclip", short_side=64, feedback=None))
    high = segmenter.segment(image, vocab, SegmentSettings(method="maskclip", short_side=64, feedback=None,
                                                           prob_threshold=0.99))
    best = low.confidence
    assert np.all(high.labels[best < 0.99] == 2)
    assert np.array_equal(high.labels[best >= 0.99], low.labels[best >= 0.99])
    implicit = segmenter.segment(image, "cat, sofa", SegmentSettings(method="maskclip", short_side=64,
                                                                     feedback=None, prob_threshold=0.99))
    assert implicit.class_names == ["cat", "sofa", "background"]
    assert np.all(implicit.labels[best < 0.99] == 2)
    assert np.array_equal(implicit.labels[best >= 0.99], low.labels[best >= 0.99])


@pytest.mark.parametrize("method", ["clearclip", "vanilla", "maskclip", "proxyclip", "naclip"])
@pytest.mark.parametrize("ensemble", [True, False])
def test_explain_rows_equal_explicit_matrices(segmenter, image, method, ensemble):
    cfg = FeedbackConfig(ensemble=ensemble)
    settings = SegmentSettings(method=method, short_side=64, crop=48, stride=32, feedback=cfg)
    res = segmenter.segment(image, "cat; kitten, sofa, sky", settings)
    x, y = 120.0, 20.0
    ex = res.explain(x, y)
    store = res.diagnostics
    index, (row, col) = store.locate(x, y)
    d = store.details[index]
    gh, gw = d.grid
    assert ex.grid == (gh, gw) and ex.patch == (row, col)
    # the query patch lies inside the reported window, at the reported grid cell
    win = ex.window
    assert win.x0 <= x < win.x1 and win.y0 <= y < win.y1
    assert int((y - win.y0) / win.height * gh) == row or abs((y - win.y0) / win.height * gh - row) < 1.01

    # explicit matrices for this window (naive: full A_ens per head)
    a0 = attention_weights(d.method, d.q, d.k, d.clip_grid, proxy_features=d.proxy_features,
                           fused_maps=d.fused_maps, options=d.options)
    heads, m = d.q.shape[1], (gh * gw + (1 if d.cls_token else 0))
    a0 = torch.eye(m, dtype=torch.float32).expand(1, heads, m, m) if a0 is None else a0.expand(1, heads, m, m)
    sim = output_similarity(d.pi, cfg.eps)
    keep = prune_top_p(sim, cfg.p)
    a_new = adapted_attention(sim, keep, cfg.lam)[0]
    e = torch.eye(m)
    if d.cls_token:
        e[1:, 1:] = a_new
    else:
        e = a_new
    a_ens = (e @ a0[0] + a0[0] @ e + e) / 3 if ensemble else e.expand(heads, m, m)
    p = row * gw + col
    t = p + (1 if d.cls_token else 0)
    n = gh * gw
    assert np.allclose(ex.attn_original, a0[0, :, t, -n:].reshape(heads, gh, gw).numpy(), atol=1e-6)
    assert np.allclose(ex.attn_new, a_new[p].reshape(gh, gw).numpy(), atol=1e-6)
    assert np.allclose(ex.attn_ensemble, a_ens[:, t, -n:].reshape(heads, gh, gw).numpy(), atol=1e-5)
    assert np.allclose(ex.similarity, sim[0, p].reshape(gh, gw).numpy(), atol=1e-6)
    assert np.array_equal(ex.kept, keep[0, p].reshape(gh, gw).numpy())
    assert ex.similarity.reshape(-1)[p] == pytest.approx(1.0)
    assert ex.kept.reshape(-1)[p]
    pi = d.pi[0, p]
    assert np.allclose(ex.class_probs, [max(pi[0], pi[1]), pi[2], pi[3]], atol=1e-6)
    assert np.allclose(ex.attn_new.sum(), 1.0, atol=1e-5)
    assert ex.head_view(ex.attn_original).shape == (gh, gw)
    assert np.allclose(ex.head_view(ex.attn_original, 1), ex.attn_original[1])


def test_second_click_does_not_rerun_the_network(segmenter, image, monkeypatch):
    res = segmenter.compare(image, "cat, sofa", SegmentSettings(method="clearclip", short_side=64)).fsa
    first = res.explain(10, 10)

    def boom(*a, **k):
        raise AssertionError("the network ran again")

    clip = segmenter.load()
    monkeypatch.setattr(clip.model.visual, "forward", boom)
    for block in clip.model.visual.transformer.resblocks:
        monkeypatch.setattr(block, "forward", boom)
    second = res.explain(130, 80)
    assert second.patch != first.patch


def test_explain_errors(segmenter, image):
    base = segmenter.segment(image, "cat, sofa", SegmentSettings(short_side=64, feedback=None))
    with pytest.raises(ValueError, match="diagnostics"):
        base.explain(5, 5)
    res = segmenter.segment(image, "cat, sofa", SegmentSettings(short_side=64))
    with pytest.raises(ValueError, match="outside"):
        res.explain(500, 5)


@pytest.mark.parametrize("method,short", [("sclip", 336), ("clearclip", 448)])
def test_default_short_side_is_the_methods(segmenter, image, method, short):
    res = segmenter.segment(image, "cat, sofa", SegmentSettings(method=method, feedback=None, keep_diagnostics=False))
    assert res.working_size == (short, int(140 * short / 90 + 0.5))


def test_explain_on_a_padded_window_uses_the_padded_grid(segmenter, image):
    """Short side 40 < crop 48: windows of 40×48 padded by 4 rows above and below to 48×48 (3×3 patches).
    Working row 12.44 lies in padded row 16.44, i.e. grid row 1 (rows 12..28 of the image)."""
    settings = SegmentSettings(method="clearclip", short_side=40, crop=48, stride=32, feedback=FeedbackConfig())
    res = segmenter.segment(image, "cat, sofa", settings)
    assert res.working_size == (40, 62)
    ex = res.explain(10.0, 28.0)  # y = 28 in the 90-row image = 12.44 in the 40-row working image
    assert ex.grid == (3, 3) and ex.patch[0] == 1
    assert ex.window.y0 == round(-4 * 90 / 40) and ex.window.y1 == round(44 * 90 / 40)  # the padded extent
