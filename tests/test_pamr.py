"""fsa.pamr against a direct float64 loop formula of the published PAMR (sinahmr/NACLIP pamr.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsa.pamr import pamr


def _loop_pamr(image: np.ndarray, masks: np.ndarray, iterations: int, dilations) -> np.ndarray:
    """Pixel by pixel: 8 neighbours per dilation (clamped to the image), per-channel unbiased std of the
    3x3 grid of every dilation (centre included once per dilation), softmax over neighbours of the
    channel-mean of -|I(q) - I(p)| / (1e-8 + 0.1 std), then ``iterations`` weighted neighbour sums."""
    b_size, channels, h, w = image.shape
    offsets = [(dy, dx) for d in dilations for dy in (-d, 0, d) for dx in (-d, 0, d) if (dy, dx) != (0, 0)]
    weights = np.zeros((b_size, h, w, len(offsets)))
    where = np.zeros((h, w, len(offsets), 2), dtype=int)
    for i in range(h):
        for j in range(w):
            for n, (dy, dx) in enumerate(offsets):
                where[i, j, n] = (min(max(i + dy, 0), h - 1), min(max(j + dx, 0), w - 1))
    for b in range(b_size):
        for i in range(h):
            for j in range(w):
                logits = np.zeros(len(offsets))
                for c in range(channels):
                    grid = [image[b, c, i, j]] * len(dilations) + [image[b, c, y, x] for y, x in where[i, j]]
                    sigma = np.std(grid, ddof=1)
                    for n, (y, x) in enumerate(where[i, j]):
                        logits[n] += -abs(image[b, c, y, x] - image[b, c, i, j]) / (1e-8 + 0.1 * sigma) / channels
                e = np.exp(logits - logits.max())
                weights[b, i, j] = e / e.sum()
    out = masks.astype(np.float64)
    for _ in range(iterations):
        new = np.zeros_like(out)
        for b in range(b_size):
            for i in range(h):
                for j in range(w):
                    for n, (y, x) in enumerate(where[i, j]):
                        new[b, :, i, j] += weights[b, i, j, n] * out[b, :, y, x]
        out = new
    return out


@pytest.mark.parametrize("b, k, h, w, iterations, dilations", [
    (1, 3, 7, 11, 1, (1,)),
    (2, 4, 9, 6, 3, (1, 2)),
    (1, 2, 12, 20, 10, (8, 16)),  # the NACLIP setting: offsets beyond the image are clamped
    (2, 3, 10, 13, 2, (2, 3, 5)),
])
def test_pamr_matches_loop_formula(b, k, h, w, iterations, dilations):
    g = torch.Generator().manual_seed(b * 1000 + h * w)
    image = torch.randn(b, 3, h, w, generator=g, dtype=torch.float64)
    masks = torch.randn(b, k, h, w, generator=g, dtype=torch.float64)
    out = pamr(image, masks, iterations=iterations, dilations=dilations)
    assert out.shape == (b, k, h, w) and out.dtype == torch.float64
    expected = _loop_pamr(image.numpy(), masks.numpy(), iterations, dilations)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    assert np.abs(expected - masks.numpy()).max() > 1e-2  # it is not the identity


def test_pamr_batch_elements_are_independent():
    g = torch.Generator().manual_seed(4)
    image = torch.randn(2, 3, 8, 10, generator=g, dtype=torch.float64)
    masks = torch.randn(2, 5, 8, 10, generator=g, dtype=torch.float64)
    both = pamr(image, masks, iterations=4, dilations=(1, 3))
    for i in range(2):
        alone = pamr(image[i:i + 1], masks[i:i + 1], iterations=4, dilations=(1, 3))
        torch.testing.assert_close(both[i:i + 1], alone, rtol=0, atol=1e-14)


def _neighbour_average(masks: torch.Tensor, dilations) -> torch.Tensor:
    """Mean of the 8·len(dilations) replicate-padded neighbours, by padding and slicing."""
    h, w = masks.shape[-2:]
    total, count = torch.zeros_like(masks), 0
    for d in dilations:
        padded = F.pad(masks, [d] * 4, mode="replicate")
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if (dy, dx) != (0, 0):
                    total += padded[..., d + dy:d + dy + h, d + dx:d + dx + w]
                    count += 1
    return total / count


@pytest.mark.parametrize("iterations", [1, 3])
def test_constant_image_gives_neighbourhood_average(iterations):
    image = torch.full((2, 3, 9, 14), 0.3, dtype=torch.float64)
    masks = torch.randn(2, 4, 9, 14, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = masks
    for _ in range(iterations):
        expected = _neighbour_average(expected, (2, 5))
    out = pamr(image, masks, iterations=iterations, dilations=(2, 5))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)


def test_constant_masks_stay_constant_and_dtypes():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, 16, 24, generator=g)
    flat = torch.full((1, 2, 16, 24), 0.25)
    torch.testing.assert_close(pamr(image, flat), flat)  # the affinity sums to 1 at every pixel
    masks = torch.randn(1, 2, 16, 24, generator=g)
    half = pamr(image.half(), masks.half())
    assert half.dtype == torch.float16  # computed in float32, returned in the masks' dtype
    torch.testing.assert_close(half.float(), pamr(image.half().float(), masks.half().float()), rtol=0, atol=2e-3)
    assert pamr(image, masks, iterations=0) is masks


def test_pamr_follows_image_edges():
    """Two flat halves: a mask value diffuses within its half and hardly across the edge."""
    image = torch.zeros(1, 3, 12, 16, dtype=torch.float64)
    image[..., 8:] = 1.0
    masks = torch.zeros(1, 1, 12, 16, dtype=torch.float64)
    masks[..., 0:8] = 1.0
    out = pamr(image, masks, iterations=10, dilations=(1, 2))
    assert out[..., :8].min() > 0.99 and out[..., 8:].max() < 0.01
    blurred = pamr(torch.zeros_like(image), masks, iterations=10, dilations=(1, 2))  # no edge to stop it
    assert blurred[..., 8].min() > 0.1


def test_pamr_rejects_bad_arguments():
    image, masks = torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"image \(B, 3, H, W\) and masks \(B, K, H, W\)"):
        pamr(image[0], masks)
    with pytest.raises(ValueError, match="must share batch, height and width; resize the masks"):
        pamr(image, torch.rand(1, 2, 8, 9))
    with pytest.raises(ValueError, match="iterations must be an integer >= 0"):
        pamr(image, masks, iterations=-1)
    with pytest.raises(ValueError, match="dilations must be a non-empty sequence of positive integers"):
        pamr(image, masks, dilations=())
    with pytest.raises(ValueError, match="dilations must be a non-empty"):
        pamr(image, masks, dilations=(0, 2))
