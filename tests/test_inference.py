"""The shared inference pipeline (fsa.inference) against explicit versions of the published steps."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fsa
from fsa.config import FeedbackConfig, MethodOptions
from fsa.inference import Decision, centred_padding, clip_pixels, decide, resolve_pad_multiple, window_cosines
from fsa.vocabulary import Vocabulary


@pytest.fixture(scope="module")
def clip():
    return fsa.Segmenter("tiny-test", device="cpu").load()


def _published_padsize(h, w, multiple):
    # ProxyCLIP/ClearCLIP `compute_padsize`, written out independently
    l = r = t = b = 0
    if w % multiple:
        lr = multiple - w % multiple
        l, r = lr // 2, lr - lr // 2
    if h % multiple:
        tb = multiple - h % multiple
        t, b = tb // 2, tb - tb // 2
    return l, r, t, b


@pytest.mark.parametrize("h,w,m", [(300, 392, 56), (336, 336, 56), (40, 48, 16), (41, 17, 16), (5, 5, 0), (5, 5, 1)])
def test_centred_padding_is_the_published_rule(h, w, m):
    expect = (0, 0, 0, 0) if m <= 1 else _published_padsize(h, w, m)
    assert centred_padding(h, w, m) == expect
    if m > 1:
        l, r, t, b = expect
        assert (h + t + b) % m == 0 and (w + l + r) % m == 0


def test_pad_multiple_per_method():
    assert resolve_pad_multiple("patch", 14) == 14
    assert resolve_pad_multiple(56, 16) == 56 and resolve_pad_multiple(0, 16) == 0
    with pytest.raises(ValueError):
        resolve_pad_multiple("oops", 16)
    defaults = fsa.METHOD_DEFAULTS
    assert defaults["proxyclip"].pad_to == 56 and defaults["sclip"].pad_to == 0 and defaults["naclip"].pad_to == 0
    assert defaults["clearclip"].pad_to == "patch"
    assert {m: defaults[m].short_side for m in ("proxyclip", "sclip", "naclip", "clearclip")} == {
        "proxyclip": 336, "sclip": 336, "naclip": 336, "clearclip": 448}


def test_clip_pixels_use_the_published_constants():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 7
    out = clip_pixels(rgb, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    mean, std = np.array([122.771, 116.746, 104.094]), np.array([68.501, 66.632, 70.323])
    expect = ((rgb.astype(np.float64) - mean) / std).transpose(2, 0, 1)[None]
    assert out.shape == (1, 3, 2, 3) and np.allclose(out.numpy(), expect, atol=1e-5)
    other = clip_pixels(rgb, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # other statistics: ×255 exactly
    assert np.allclose(other.numpy(), ((rgb - 127.5) / 63.75).transpose(2, 0, 1)[None], atol=1e-5)


@pytest.mark.parametrize("feedback", [None, FeedbackConfig()])
def test_padded_windows_equal_the_explicit_published_loop(clip, feedback):
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 40, 72)
    text = F.normalize(torch.randn(5, clip.model.visual.output_dim), dim=-1)
    got = window_cosines(clip.model, pixels, text, "clearclip", feedback=feedback, options=MethodOptions(), crop=48,
                         stride=32, pad_multiple=16, window_batch=2)
    # the published loop: windows of 40×48 (height clipped), padded 4 above and below to 48×48
    assert got.pads[0] == (0, 0, 4, 4)
    key = "baseline" if feedback is None else "fsa"
    preds, count = torch.zeros(5, 40, 72), torch.zeros(1, 40, 72)
    for x1 in (0, 24):  # ceil((72 - 48) / 32) + 1 = 2 windows, the last shifted back to end at 72
        crop = F.pad(pixels[:, :, :, x1:x1 + 48], (0, 0, 4, 4))
        logits = fsa.patch_logits(clip.model, crop, text, "clearclip", feedback=feedback)
        logits = F.interpolate(logits, size=(48, 48), mode="bilinear", align_corners=False)[0, :, 4:44]
        preds[:, :, x1:x1 + 48] += logits
        count[:, :, x1:x1 + 48] += 1
    assert [(w.x0, w.x1) for w in got.windows] == [(0, 48), (24, 72)]
    assert torch.allclose(got.maps[key], preds / count, atol=1e-5)


def test_whole_image_without_padding_keeps_the_patch_grid(clip):
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 40, 70)  # 70 is not a multiple of 16: the patch embedding drops 6 columns
    text = F.normalize(torch.randn(3, clip.model.visual.output_dim), dim=-1)
    got = window_cosines(clip.model, pixels, text, "sclip", feedback=None, options=MethodOptions(), crop=0,
                         stride=1, pad_multiple=16)
    expect = fsa.patch_logits(clip.model, pixels, text, "sclip")[0]
    assert got.maps["baseline"].shape == (3, 2, 4) and torch.allclose(got.maps["baseline"], expect, atol=1e-6)


def _explicit_decision(cos, size, scale, query_to_class, num_classes, prob_thd=0.0, area_thd=None, background=0):
    """The published postprocess_result (SCLIP's, with the area rule), at full resolution."""
    logits = F.interpolate(cos[None].double(), size=size, mode="bilinear", align_corners=False)[0]
    probs = (scale * logits).softmax(0)
    per_class = torch.stack([probs[[q for q, c in enumerate(query_to_class) if c == k]].max(0).values
                             for k in range(num_classes)])
    if area_thd is not None:
        onehot = F.one_hot(per_class.argmax(0), num_classes).double()
        area = onehot[:, :, 1:].sum((0, 1))
        keep = (area > area_thd * area.sum()).double()
        per_class[1:] *= keep[:, None, None]
    pred = per_class.argmax(0)
    pred[per_class.max(0).values < prob_thd] = background
    return pred.numpy(), per_class.max(0).values.numpy()


@pytest.mark.parametrize("prob_thd,area_thd", [(0.0, None), (0.5, None), (0.0, 0.1), (0.3, 0.25)])
def test_decide_equals_the_published_postprocessing(prob_thd, area_thd):
    torch.manual_seed(2)
    cos = torch.randn(6, 5, 7) * 0.2
    cos[3, :, :3] += 0.3  # a large class ...
    cos[5] = -1.0
    cos[5, 4, 6] = 1.0  # ... and a tiny one the area rule can drop
    vocab = Vocabulary((("bg", "wall"), ("cat",), ("dog", "puppy"), ("tiny",)))
    decision = Decision(vocab, 40.0, background=0, prob_threshold=prob_thd, area_threshold=area_thd)
    labels, confidence = decide(cos, (23, 31), decision)
    expect, best = _explicit_decision(cos, (23, 31), 40.0, vocab.query_to_class, 4, prob_thd, area_thd)
    assert labels.shape == (23, 31) and labels.dtype == np.int64
    assert np.allclose(confidence, best, atol=1e-5)
    assert np.array_equal(labels, expect)
    if area_thd is not None:
        plain, _ = decide(cos, (23, 31), Decision(vocab, 40.0))
        assert (plain == 3).any() and not (labels == 3).any()  # the rule did something


def test_decide_bands_do_not_change_the_answer(monkeypatch):
    import fsa.inference as inference

    torch.manual_seed(3)
    cos = torch.randn(4, 6, 9)
    vocab = Vocabulary((("a",), ("b",), ("c",), ("d",)))
    whole = decide(cos, (50, 70), Decision(vocab, 50.0, area_threshold=0.2))
    real = inference.resized_row_bands
    monkeypatch.setattr(inference, "resized_row_bands", lambda m, h, w: real(m, h, w, max_elements=4 * 70 * 3))
    banded = decide(cos, (50, 70), Decision(vocab, 50.0, area_threshold=0.2))
    assert np.array_equal(whole[0], banded[0]) and np.allclose(whole[1], banded[1])


def test_a_name_in_two_classes_ties_to_the_first_class():
    """The published COCO-Object file lists `bed` among the background prompts and as a class: the two
    identical queries tie, the first class wins (argmax takes the first maximum), as published."""
    torch.manual_seed(4)
    cos = torch.randn(4, 6, 6) * 0.1
    cos[1] += 1.0  # `bed` wins everywhere
    cos[3] = cos[1]  # the same name, the same text feature, the same cosines
    vocab = Vocabulary((("sky", "bed"), ("cat",), ("bed",)))
    labels, _ = decide(cos, (12, 12), Decision(vocab, 40.0))
    assert (labels == 0).all()


def test_non_finite_cosines_never_become_a_mask():
    cos = torch.zeros(2, 3, 3)
    cos[1, 1, 1] = float("nan")
    with pytest.raises(fsa.NumericalError, match="1 NaN"):
        decide(cos, (6, 6), Decision(Vocabulary((("a",), ("b",))), 40.0))
