"""Every number of the settings is checked (finite, in range) with a message naming the field, the
value and the range; fsa.checks.check_finite stops NaN before it can become a mask."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from fsa.checks import NumericalError, check_finite, check_number
from fsa.config import (
    EPS_MIN,
    LAMBDA_MAX,
    FeedbackConfig,
    GClipConfig,
    MethodOptions,
    SegmentSettings,
)
from fsa.feedback import adapted_attention, output_similarity, prune_top_p
from fsa.sliding import window_layout

NAN, INF = float("nan"), float("inf")
NON_FINITE = [NAN, INF, -INF]

#: (settings class, field, bad values beyond the non-finite ones)
BAD = [
    (FeedbackConfig, "lam", [-0.1, 88.8, 1e6, "3", None, True]),
    (FeedbackConfig, "p", [0.0, -0.1, 1.01, 2.0, None]),
    (FeedbackConfig, "feedback_scale", [0.0, -1.0, 1001.0]),
    (FeedbackConfig, "isolation_scale", [0.0, -1.0, 1e40]),
    (FeedbackConfig, "eps", [0.0, -1e-10, 1e-40, 0.01]),
    (SegmentSettings, "short_side", [0, 15, 2049, -448, 448.5, "448"]),
    (SegmentSettings, "crop", [-1, 8, 15, 100.5]),
    (SegmentSettings, "stride", [0, -1, 1.5]),
    (SegmentSettings, "logit_scale", [0.0, -1.0, 1001.0]),
    (SegmentSettings, "prob_threshold", [-0.01, 1.0, 1.5, None]),
    (SegmentSettings, "window_batch", [0, -1, 1.5, None]),
    (MethodOptions, "naclip_sigma", [0.0, -1.0, 0.001, 1e5]),
    (MethodOptions, "proxy_beta", [101.0, -101.0]),
    (MethodOptions, "proxy_gamma", [0.0, -1.0, 1001.0]),
]
CASES = [(cls, name, value) for cls, name, extra in BAD for value in NON_FINITE + extra]


def _shown(value) -> str:
    """How the message must show the value (written independently of fsa.checks)."""
    if isinstance(value, (str, bool)) or value is None:
        return repr(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:g}"


@pytest.mark.parametrize("cls, name, value", CASES,
                         ids=[f"{c.__name__}.{n}={v!r}" for c, n, v in CASES])
def test_bad_number_is_rejected_naming_field_value_and_range(cls, name, value):
    with pytest.raises(ValueError) as info:
        cls(**{name: value})
    message = str(info.value)
    assert message.startswith(f"{cls.__name__}.{name} must be "), message
    assert f"got {_shown(value)}" in message, message
    assert re.search(r"in [\[(]|≥|>", message), f"no allowed range in: {message}"
    assert "\n" not in message


@pytest.mark.parametrize("value", NON_FINITE)
def test_nan_in_a_nested_option_is_rejected(value):
    with pytest.raises(ValueError, match=r"FeedbackConfig\.lam"):
        SegmentSettings(feedback=FeedbackConfig(lam=value))


def test_the_messages_state_the_ranges():
    cases = [
        (lambda: FeedbackConfig(lam=NAN), "FeedbackConfig.lam must be a finite number in [0, 88], got nan"),
        (lambda: FeedbackConfig(p=2), "FeedbackConfig.p must be a finite number in (0, 1], got 2"),
        (lambda: SegmentSettings(short_side=0), "SegmentSettings.short_side must be a whole number in [16, 2048], "
                                                "got 0"),
        (lambda: SegmentSettings(stride=0), "SegmentSettings.stride must be a whole number ≥ 1, got 0"),
        (lambda: SegmentSettings(prob_threshold=1.0),
         "SegmentSettings.prob_threshold must be a finite number in [0, 1), got 1"),
        (lambda: MethodOptions(proxy_gamma=0.0), "MethodOptions.proxy_gamma must be a finite number in (0, 1000], "
                                                 "got 0"),
    ]
    for make, expected in cases:
        with pytest.raises(ValueError, match=re.escape(expected)):
            make()


def test_limits_and_kinds_that_are_accepted():
    fb = FeedbackConfig(lam=0, p=1, eps=1e-3, feedback_scale=1000, isolation_scale=np.float32(35.0))
    assert fb.lam == 0.0 and type(fb.lam) is float and type(fb.isolation_scale) is float
    assert FeedbackConfig(lam=LAMBDA_MAX, eps=EPS_MIN).lam == LAMBDA_MAX
    s = SegmentSettings(short_side=448.0, crop=0.0, stride=np.int64(1), logit_scale=1000, prob_threshold=0.99)
    assert s.short_side == 448 and type(s.short_side) is int and s.crop == 0 and type(s.stride) is int
    assert SegmentSettings(short_side=16, crop=16, stride=16).resolved_crop() == 16
    assert SegmentSettings(short_side=2048).short_side == 2048
    assert SegmentSettings(short_side=None).short_side is None  # None = the method's default (coming on main)
    opts = MethodOptions(naclip_sigma=0.01, proxy_beta=-100, proxy_gamma=1000)
    assert opts.naclip_sigma == 0.01 and opts.proxy_beta == -100.0
    assert SegmentSettings() == SegmentSettings(options=MethodOptions(), feedback=FeedbackConfig())


def test_settings_from_lists_stay_hashable():
    g = GClipConfig(suppression_blocks=[8, 9, 10], fusion_blocks=[7.0, 8])
    assert g.suppression_blocks == (8, 9, 10) and g.fusion_blocks == (7, 8)
    hash(SegmentSettings(method="gclip", options=MethodOptions(gclip=g)))  # a cache key


@pytest.mark.parametrize("field", ["suppression_blocks", "fusion_blocks"])
@pytest.mark.parametrize("blocks", [(0,), (NAN,), (1.5,), (-1, 2), (7, 7), 7, "78"])
def test_bad_gclip_blocks(field, blocks):
    with pytest.raises(ValueError, match=rf"GClipConfig\.{field}"):
        GClipConfig(**{field: blocks})


def test_nested_settings_must_have_their_types():
    with pytest.raises(ValueError, match=r"SegmentSettings\.feedback must be a FeedbackConfig or None, got float"):
        SegmentSettings(feedback=3.0)
    with pytest.raises(ValueError, match=r"SegmentSettings\.options must be a MethodOptions, got dict"):
        SegmentSettings(options={"naclip_sigma": 5})
    with pytest.raises(ValueError, match=r"MethodOptions\.gclip must be a GClipConfig, got NoneType"):
        MethodOptions(gclip=None)


# --------------------------------------------------------------------------- why the limits are where they are
def test_lambda_bound_is_where_float32_overflows():
    """exp(λŜ) with Ŝ ≤ 1 (Ŝ_ii = 1): finite attention at LAMBDA_MAX, NaN just past ln(float32 max)."""
    assert math.exp(LAMBDA_MAX) < float(np.finfo(np.float32).max) < math.exp(LAMBDA_MAX + 1)
    pi = torch.softmax(torch.randn(1, 30, 5, generator=torch.Generator().manual_seed(0)) * 5, dim=-1)
    sim = output_similarity(pi)
    assert sim.dtype == torch.float32 and float(sim.max()) == 1.0
    for keep in (None, prune_top_p(sim, 0.45)):
        assert torch.isfinite(adapted_attention(sim, keep, LAMBDA_MAX)).all()
        over = math.log(np.finfo(np.float32).max) + 0.1  # 88.82
        assert torch.isnan(adapted_attention(sim, keep, over)).any()
    with pytest.raises(ValueError):
        FeedbackConfig(lam=over)


def test_eps_bound_is_float32_smallest_normal():
    assert EPS_MIN == pytest.approx(float(np.finfo(np.float32).tiny), rel=1e-6)
    assert np.float32(1e-46) == 0.0  # what a smaller ε can become, and log(0 + 0) = -inf


@pytest.mark.parametrize("crop, stride", [(100, None), (40, 100)])
def test_stride_larger_than_crop_is_rejected_because_it_leaves_gaps(crop, stride):
    settings_kwargs = dict(method="clearclip", crop=crop, stride=stride)
    with pytest.raises(ValueError, match=r"SegmentSettings\.stride/crop: the window stride \d+.* larger than the "
                                         rf"crop {crop}"):
        SegmentSettings(**settings_kwargs)
    # the gap is real: some pixel of a 448×672 image would be covered by no window (then 0/0 = NaN)
    used_stride = stride or 224
    covered = np.zeros((448, 672), dtype=bool)
    for w in window_layout(448, 672, crop, used_stride):
        covered[w.y0:w.y1, w.x0:w.x1] = True
    assert not covered.all()
    assert SegmentSettings(method="clearclip", crop=crop, stride=crop).resolved_stride() == crop


# --------------------------------------------------------------------------- check_number / check_finite
def test_check_number_converts_and_reports():
    assert check_number("x", 448.0, low=16, integer=True) == 448
    assert check_number("x", np.float64(0.5), low=0, high=1) == 0.5
    with pytest.raises(ValueError, match=r"^x must be a whole number ≥ 1, got 2.5 \(why\)$"):
        check_number("x", 2.5, low=1, integer=True, why="why")
    with pytest.raises(ValueError, match=r"^y must be a finite number in \(0, 1\), got 1$"):
        check_number("y", 1, low=0, high=1, low_open=True, high_open=True)
    with pytest.raises(ValueError, match=r"^z must be a finite number, got inf$"):
        check_number("z", INF)


def test_check_finite_passes_finite_values_through():
    t = torch.randn(3, 4)
    assert check_finite(t, "probabilities") is t
    a = np.ones((2, 2), dtype=np.float32)
    assert check_finite(a, "probabilities") is a
    labels = torch.zeros(5, dtype=torch.int64)
    assert check_finite(labels, "labels") is labels
    # finite entries whose sum overflows are still finite
    big = torch.full((4,), 3e38)
    assert torch.isinf(big.sum()) and check_finite(big, "big") is big
    big_np = big.numpy()
    assert check_finite(big_np, "big") is big_np


@pytest.mark.parametrize("bad", [[INF, 1.0], [-INF, 3e38, 3e38], [INF, -INF], [NAN, 0.0]])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_check_finite_finds_one_bad_entry_among_many(bad, kind):
    values = torch.rand(50_000)
    values[1234:1234 + len(bad)] = torch.tensor(bad)
    data = values if kind == "torch" else values.numpy()
    with pytest.raises(NumericalError, match=r"out of 50000"):
        check_finite(data, "cosines")


@pytest.mark.parametrize("kind", ["torch", "numpy", "float16"])
def test_check_finite_raises_numerical_error_with_counts(kind):
    values = [[0.1, NAN, 0.3], [INF, NAN, -INF]]
    data = {"torch": torch.tensor(values), "numpy": np.array(values, dtype=np.float32),
            "float16": torch.tensor(values, dtype=torch.float16)}[kind]
    with pytest.raises(NumericalError, match=r"^class probabilities: 2 NaN and 2 infinite values out of 6") as info:
        check_finite(data, "class probabilities")
    assert isinstance(info.value, ValueError) and "default λ" in str(info.value)
