"""Compare-all with the shared trunk: every method's result equals the method run alone, bit for bit.

- compute_methods_logits vs compute_patch_logits / compute_sweep_logits per method (torch.equal), the
  trunk's blocks run once per distinct weights (hooks count the calls);
- Segmenter.compare_methods vs Segmenter.compare (or segment without FSA) per settings (np.array_equal of
  labels and confidences), for all seven baselines, other short sides and windows, settings beyond the paper
  and diagnostics; one encoder pass per window batch of each group of settings sharing their windows;
- a proxy model that cannot be loaded costs only the ProxyCLIP outcome.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fsa
from fsa.backbones import WeightsUnavailableError, tiny_test_clip
from fsa.config import METHODS, FeedbackConfig, GClipConfig, MethodOptions, SegmentSettings
from fsa.logits import MethodRun, compute_methods_logits, compute_patch_logits, compute_sweep_logits


@pytest.fixture(scope="module")
def model():
    return tiny_test_clip().eval().requires_grad_(False)


class _Calls:
    """Forward calls of chosen blocks of the vision tower."""

    def __init__(self, model, blocks):
        self.counts = {b: 0 for b in blocks}
        res = model.visual.transformer.resblocks
        self._hooks = [res[b].register_forward_hook(lambda *a, b=b: self._seen(b)) for b in blocks]

    def _seen(self, b):
        self.counts[b] += 1

    def close(self):
        for hook in self._hooks:
            hook.remove()


def _inputs(model, k=5, size=(64, 80), seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, *size, generator=g)
    text = F.normalize(torch.randn(k, model.visual.output_dim, generator=g), dim=-1)
    proxy = torch.randn(2, 12, 6, 7, generator=g)
    return pixels, text, proxy


def test_methods_logits_equal_each_method_alone(model):
    pixels, text, proxy = _inputs(model)
    runs = [MethodRun(m, (FeedbackConfig(),), proxy_features=proxy if m == "proxyclip" else None) for m in METHODS]
    runs.append(MethodRun("clearclip", (FeedbackConfig(blocks=(3, 4)), FeedbackConfig(iterations=2, similarity="js"))))
    runs.append(MethodRun("gclip", (), MethodOptions(gclip=GClipConfig(attention_fusion=False))))
    runs.append(MethodRun("gclip", (FeedbackConfig(),), MethodOptions(gclip=GClipConfig(channel_suppression=False))))
    runs.append(MethodRun("naclip", (FeedbackConfig(),), keep_details=True))
    # depth 4: GCLIP's suppressed rows start at block 3 (0-based 2): blocks 1-2 are shared by every run, block
    # 3 runs twice: with the plain weights (GCLIP without suppression too) and the suppressed ones (both GCLIPs
    # that suppress, whatever their fusion)
    calls = _Calls(model, [0, 2])
    try:
        got = compute_methods_logits(model, pixels, text, runs)
    finally:
        calls.close()
    assert calls.counts == {0: 1, 2: 2}, calls.counts
    for run, out in zip(runs, got):
        if len(run.feedbacks) == 1:
            alone = compute_patch_logits(model, pixels, text, run.method, feedback=run.feedbacks[0],
                                         proxy_features=run.proxy_features, options=run.options,
                                         keep_details=run.keep_details)
            assert torch.equal(out.baseline, alone.baseline) and torch.equal(out.fsa[0], alone.fsa), run.method
            if run.keep_details:
                assert torch.equal(out.details[0].pi, alone.details.pi)
        else:
            alone = compute_sweep_logits(model, pixels, text, run.method, list(run.feedbacks),
                                         proxy_features=run.proxy_features, options=run.options)
            assert torch.equal(out.baseline, alone.baseline), run.method
            assert all(torch.equal(a, b) for a, b in zip(out.fsa, alone.fsa)), run.method
        assert out.grid == alone.grid


@pytest.fixture(scope="module")
def segmenter():
    return fsa.Segmenter("tiny-test", device="cpu")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    img[:, 90:] = [20, 160, 40]
    return img


VOCAB = "cat; kitten, dog, grass, sky"


def _settings():
    every = [SegmentSettings(method=m, keep_diagnostics=False) for m in METHODS]
    return every + [
        SegmentSettings(method="clearclip", feedback=None),
        SegmentSettings(method="vanilla", short_side=96, crop=64, stride=32, keep_diagnostics=False),
        SegmentSettings(method="sclip", feedback=FeedbackConfig(iterations=2, blocks=(3, 4)), keep_diagnostics=False),
        SegmentSettings(method="naclip", prob_threshold=0.3),  # diagnostics kept
        SegmentSettings(method="maskclip", crop=0, keep_diagnostics=False),
    ]


def _same(a, b):
    return np.array_equal(a.labels, b.labels) and np.array_equal(a.confidence, b.confidence)


def test_compare_methods_equals_each_settings_alone(segmenter, image):
    settings = _settings()
    outcomes = segmenter.compare_methods(image, VOCAB, settings)
    assert [o.index for o in outcomes] == list(range(len(settings)))
    for outcome, s in zip(outcomes, settings):
        assert outcome.error is None and outcome.settings is s
        got = outcome.result
        if s.feedback is None:
            assert got.fsa is None and _same(got.baseline, segmenter.segment(image, VOCAB, s)), s.method
            continue
        alone = segmenter.compare(image, VOCAB, s)
        assert _same(got.baseline, alone.baseline) and _same(got.fsa, alone.fsa), s
        assert got.fsa.windows == alone.fsa.windows and got.fsa.working_size == alone.fsa.working_size
        assert (got.fsa.diagnostics is None) == (alone.fsa.diagnostics is None)
    kept = outcomes[len(METHODS) + 3].result.fsa
    again = segmenter.compare(image, VOCAB, settings[len(METHODS) + 3]).fsa.explain(40, 30)
    np.testing.assert_array_equal(kept.explain(40, 30).attn_new, again.attn_new)
    np.testing.assert_array_equal(kept.explain(40, 30).attn_ensemble, again.attn_ensemble)


def test_one_encoder_pass_per_window_batch_of_a_group(segmenter, image):
    """The seven baselines on their default windows form three groups (the 448/224 windows of the image resized
    to 448, the 224/112 and the 336/112 windows of it resized to 336); each batch of a group's windows runs
    block 1 once for the whole group, and once per method when they run one by one."""
    from fsa.images import working_size
    from fsa.inference import resolve_pad_multiple, window_geometry

    model = segmenter.load().model
    settings = [SegmentSettings(method=m, keep_diagnostics=False) for m in METHODS]
    batches, groups = {}, {}
    for s in settings:
        size = working_size(*image.shape[:2], s.resolved_short_side(), min_side=16)
        geo = window_geometry(*size, crop=s.resolved_crop(), stride=s.resolved_stride(),
                              pad_multiple=resolve_pad_multiple(s.defaults.pad_to, 16),
                              with_proxy=s.method == "proxyclip")
        batches[s.method] = -(-len(geo.windows) // s.window_batch)
        groups[(size, geo)] = batches[s.method]
    assert len(groups) == 3
    calls = _Calls(model, [0])
    try:
        segmenter.compare_methods(image, VOCAB, settings)
        shared = calls.counts[0]
        calls.counts[0] = 0
        for s in settings:
            segmenter.compare(image, VOCAB, s)
        alone = calls.counts[0]
    finally:
        calls.close()
    assert (shared, alone) == (sum(groups.values()), sum(batches.values()))


def test_a_missing_proxy_costs_only_proxyclip(segmenter, image, monkeypatch):
    def missing(progress=None):
        raise WeightsUnavailableError("no proxy weights here")

    monkeypatch.setattr(segmenter, "_proxy", missing)
    settings = [SegmentSettings(method=m, keep_diagnostics=False) for m in ("clearclip", "proxyclip", "sclip")]
    seen = list(segmenter.iter_compare_methods(image, VOCAB, settings))
    by_index = {o.index: o for o in seen}
    assert sorted(by_index) == [0, 1, 2]
    assert isinstance(by_index[1].error, WeightsUnavailableError) and by_index[1].result is None
    assert by_index[0].result is not None and by_index[2].result is not None
