"""Sliding-window geometry, canvas accumulation and the banded resize."""
import pytest
import torch
import torch.nn.functional as F

from fsa.sliding import LogitCanvas, Window, nearest_window, resized_row_bands, window_layout


@pytest.mark.parametrize("h,w,crop,stride", [(448, 600, 448, 224), (600, 448, 224, 112), (1000, 333, 336, 112),
                                             (224, 224, 224, 112), (100, 50, 224, 112), (500, 700, 0, 1)])
def test_windows_cover_the_image_with_equal_sizes(h, w, crop, stride):
    wins = window_layout(h, w, crop, stride)
    cover = torch.zeros(h, w)
    for win in wins:
        assert 0 <= win.y0 < win.y1 <= h and 0 <= win.x0 < win.x1 <= w
        cover[win.y0:win.y1, win.x0:win.x1] += 1
    assert cover.min() >= 1
    sizes = {(win.height, win.width) for win in wins}
    assert len(sizes) == 1  # batchable
    expect = (h if crop == 0 else min(crop, h), w if crop == 0 else min(crop, w))
    assert sizes == {expect}


def test_layout_matches_the_mmseg_rule():
    # grids = ceil((size - crop) / stride) + 1, the last window shifted back to the border
    wins = window_layout(448, 600, 224, 112)
    xs = sorted({w.x0 for w in wins})
    ys = sorted({w.y0 for w in wins})
    assert ys == [0, 112, 224]
    assert xs == [0, 112, 224, 336, 376]


def test_nearest_window_prefers_the_closest_centre():
    wins = window_layout(448, 600, 448, 224)  # x0 = 0 and 152
    assert nearest_window(wins, 10, 10) == 0
    assert nearest_window(wins, 590, 10) == 1
    assert nearest_window(wins, 250, 200) == 0  # centres at x=224 and 376
    with pytest.raises(ValueError, match="outside"):
        nearest_window(wins, 700, 10)


def test_canvas_averages_overlapping_windows():
    canvas = LogitCanvas(2, 4, 6)
    canvas.add(Window(0, 0, 4, 4), torch.ones(2, 2, 2))
    canvas.add(Window(0, 2, 4, 6), 3 * torch.ones(2, 2, 2))
    out = canvas.take_mean()
    with pytest.raises(RuntimeError, match="already"):
        canvas.take_mean()
    assert torch.allclose(out[:, :, :2], torch.ones(2, 4, 2))
    assert torch.allclose(out[:, :, 2:4], 2 * torch.ones(2, 4, 2))  # (1 + 3) / 2
    assert torch.allclose(out[:, :, 4:], 3 * torch.ones(2, 4, 2))


def test_canvas_adds_a_few_channels_at_a_time_with_the_same_values(monkeypatch):
    """A padded window upsampled channel-chunk by channel-chunk equals one interpolate of all channels."""
    grid = torch.randn(7, 5, 6)
    window, padding = Window(3, 2, 3 + 36, 2 + 44), (2, 2, 1, 3)  # (left, right, top, bottom)
    whole = F.interpolate(grid[None], size=(40, 48), mode="bilinear", align_corners=False)[0][:, 1:37, 2:46]
    monkeypatch.setattr(LogitCanvas, "MAX_ELEMENTS", 2 * 40 * 48)  # two channels a chunk
    canvas = LogitCanvas(7, 50, 50)
    canvas.add(window, grid, padding=padding)
    assert torch.equal(canvas.sum[:, 3:39, 2:46], whole)
    assert canvas.sum[:, :3].abs().sum() == 0 and canvas.sum[:, 39:].abs().sum() == 0


@pytest.mark.parametrize("size", [(31, 23), (5, 90), (7, 9)])
def test_banded_resize_equals_bilinear_interpolate(size):
    x = torch.randn(5, 7, 9, dtype=torch.float64)
    ref = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    bands = list(resized_row_bands(x, *size, max_elements=5 * size[1] * 3))
    assert len(bands) == -(-size[0] // 3)  # three rows a band
    out = torch.cat([b for _, _, b in bands], dim=1)
    assert torch.allclose(out, ref, atol=1e-12)


@pytest.mark.parametrize("source, size", [((20, 28, 37), (480, 640)), ((3, 50, 40), (17, 90)), ((4, 9, 30), (9, 11)),
                                          ((2, 30, 9), (45, 9)), ((5, 1, 6), (4, 3))])
def test_banded_resize_float32_within_rounding_of_interpolate(source, size):
    """Up- and downsampling, one side unchanged, one source row: float32 within a few ulps of F.interpolate."""
    x = torch.randn(*source, generator=torch.Generator().manual_seed(1))
    ref = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    out = torch.cat([b for _, _, b in resized_row_bands(x, *size, max_elements=source[0] * size[1] * 7)], dim=1)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 4 * torch.finfo(torch.float32).eps * ref.abs().max()


def test_same_size_bands_are_views_of_the_maps():
    x = torch.randn(4, 10, 6)
    bands = list(resized_row_bands(x, 10, 6, max_elements=4 * 6 * 3))
    assert [(y0, y1) for y0, y1, _ in bands] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert all(b.data_ptr() == x[:, y0].data_ptr() for y0, _, b in bands), "no copy for the identity resize"
    assert torch.equal(torch.cat([b for _, _, b in bands], dim=1), x)
