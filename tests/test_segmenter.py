"""Segmenter end to end on the tiny model: outputs, decisions, and the per-patch diagnostics."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fsa
import reference as R
from fsa.config import FeedbackConfig, SegmentSettings


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
@pytest.mark.parametrize("ensemble,pruning", [(True, False), (False, True)])
def test_explain_rows_equal_the_reference(segmenter, image, method, ensemble, pruning):
    """The explanation's rows are the reference's matrices (tests/reference.py, float64) of the window's stored
    q, k, Π at the clicked patch. The segmenter runs in float32, where the tiny model's near-uniform Π gives
    similarities tied within rounding: which of them top-p keeps depends on the precision, so with pruning the
    kept set is checked as a top-p set of the reference's row (and the ensemble, which needs every row of
    A_new, is checked with pruning off)."""
    cfg = FeedbackConfig(ensemble=ensemble, pruning=pruning)
    settings = SegmentSettings(method=method, short_side=64, crop=48, stride=32, feedback=cfg)
    res = segmenter.segment(image, "cat; kitten, sofa, sky", settings)
    x, y = 120.0, 20.0
    ex = res.explain(x, y)
    store = res.diagnostics
    index, (row, col) = store.locate(x, y)
    d = store.details[index]
    gh, gw = d.grid
    assert ex.grid == (gh, gw) and ex.patch == (row, col)
    # the query point lies in the reported window and inside the reported grid cell, row and column
    win = ex.window
    assert win.x0 <= x < win.x1 and win.y0 <= y < win.y1
    work = store.windows[index]  # the window in working-image pixels, where the grid lives
    yw, xw = y * store.scale[0], x * store.scale[1]
    assert work.y0 + row * work.height / gh <= yw < work.y0 + (row + 1) * work.height / gh
    assert work.x0 + col * work.width / gw <= xw < work.x0 + (col + 1) * work.width / gw

    opts = R.RefOptions(naclip_sigma=d.options.naclip_sigma, proxy_beta=d.options.proxy_beta,
                        proxy_gamma=d.options.proxy_gamma)
    qs, ks = list(d.q[0].double()), list(d.k[0].double())
    proxy = None if d.proxy_features is None else d.proxy_features[0]
    a0 = torch.stack(R.baseline_a0(d.method, qs, ks, d.clip_grid, opts, proxy, [m[0].double() for m in d.fused_maps]))
    heads, n = a0.shape[0], gh * gw
    p = row * gw + col
    t = p + (1 if d.cls_token else 0)
    sim = R.output_similarity_naive(d.pi[0], cfg.eps)
    kept = torch.from_numpy(ex.kept.reshape(-1))
    if pruning:
        assert int(kept.sum()) == int(R.prune_keep_naive(sim[p:p + 1], cfg.p).sum()) < n
        assert float(sim[p][kept].min()) >= float(sim[p][~kept].max()) - 1e-6
        a_new_p = R.adapted_attention_naive(sim[p:p + 1], kept[None], cfg.lam)[0]
    else:
        assert kept.all()
        a_new = R.adapted_attention_naive(sim, None, cfg.lam)
        a_new_p = a_new[p]
    if ensemble:
        e = R.embed_cls(a_new) if d.cls_token else a_new
        ens_rows = torch.stack([R.ensemble_matrix(e, A)[t, -n:] for A in a0])
    else:  # A_new alone: row t of diag(1, A_new) over the patches is A_new's row p, in every head
        ens_rows = a_new_p.expand(heads, n)
    assert np.allclose(ex.attn_original, a0[:, t, -n:].reshape(heads, gh, gw).numpy(), atol=1e-6)
    assert np.allclose(ex.attn_new, a_new_p.reshape(gh, gw).numpy(), atol=1e-6)
    assert np.allclose(ex.attn_ensemble, ens_rows.reshape(heads, gh, gw).numpy(), atol=1e-5)
    assert np.allclose(ex.similarity, sim[p].reshape(gh, gw).numpy(), atol=1e-6)
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
