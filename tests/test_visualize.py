"""fsa.visualize: pure drawing, checked pixel by pixel on small synthetic inputs."""
from __future__ import annotations

import colorsys

import cv2
import numpy as np
import pytest

from fsa import visualize as viz


def _image(h=64, w=96, value=100):
    return np.full((h, w, 3), value, np.uint8)


def test_palette_distinct_and_deterministic():
    for n in (0, 1, 5, 19, 20, 60):
        colors = viz.palette(n)
        assert colors.shape == (n, 3) and colors.dtype == np.uint8
        assert len({tuple(c) for c in colors}) == n, f"duplicate colours in palette({n})"
    # a longer palette starts with the shorter one: a class keeps its colour when classes are added
    np.testing.assert_array_equal(viz.palette(30)[:7], viz.palette(7))
    with pytest.raises(ValueError):
        viz.palette(-1)


def test_class_colors_background_is_grey():
    colors = viz.class_colors(["cat", "Background", "sky"])
    assert tuple(colors[1]) == viz.BACKGROUND_COLOR
    assert tuple(colors[0]) != viz.BACKGROUND_COLOR and tuple(colors[2]) != viz.BACKGROUND_COLOR


def test_colorize_maps_each_label_to_its_colour():
    labels = np.array([[0, 1], [2, 1]])
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    out = viz.colorize(labels, 3, colors)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [0, 255, 0])
    np.testing.assert_array_equal(out[1, 0], [0, 0, 255])
    with pytest.raises(ValueError):
        viz.colorize(np.array([[3]]), 3)
    with pytest.raises(ValueError):
        viz.colorize(np.zeros((2, 2, 2), int), 3)


def test_overlay_blends_with_alpha():
    img = _image(4, 4, 100)
    labels = np.zeros((4, 4), int)
    colors = np.array([[200, 0, 50]], np.uint8)
    out = viz.overlay(img, labels, 1, alpha=0.5, colors=colors)
    np.testing.assert_array_equal(out[0, 0], [150, 50, 75])
    np.testing.assert_array_equal(viz.overlay(img, labels, 1, alpha=0.0, colors=colors), img)
    # grayscale and RGBA images are accepted, and labels of another size are resized (nearest)
    assert viz.overlay(np.zeros((8, 6), np.uint8), labels, 1).shape == (8, 6, 3)
    assert viz.overlay(np.zeros((4, 4, 4), np.uint8), labels, 1).shape == (4, 4, 3)


def test_legend_draws_one_swatch_per_class():
    colors = np.array([[255, 0, 0], [0, 0, 255], [0, 200, 0]], np.uint8)
    strip = viz.legend(["cat", "dog", "sky ☁"], colors, width=300)
    assert strip.ndim == 3 and strip.shape[1] == 300 and strip.dtype == np.uint8
    for c in colors:
        assert np.all(strip == c, axis=-1).sum() > 20, f"swatch {c} missing"
    # many classes wrap onto more rows
    many = viz.legend([f"class {i}" for i in range(30)], viz.palette(30), width=300)
    assert many.shape[0] > strip.shape[0]


def test_with_legend_appends_below():
    img = _image(50, 120)
    out = viz.with_legend(img, ["a", "b"], viz.palette(2))
    assert out.shape[1] == 120 and out.shape[0] > 50
    np.testing.assert_array_equal(out[:50], img)


def test_patch_box_covers_the_window_grid():
    win = (10, 20, 74, 116)  # y0, x0, y1, x1: 64 × 96 pixels, 4 × 6 patches of 16 px
    assert viz.patch_box(win, (4, 6), (0, 0), (100, 200)) == (10, 20, 26, 36)
    assert viz.patch_box(win, (4, 6), (3, 5), (100, 200)) == (58, 100, 74, 116)
    with pytest.raises(ValueError):
        viz.patch_box(win, (4, 6), (4, 0), (100, 200))


def test_heatmap_overlay_marks_patch_and_dims_outside_window():
    img = _image(100, 200, 200)
    grid_map = np.zeros((4, 6), np.float32)
    grid_map[0:2, 4:6] = 1.0  # a hot 2 × 2 block: bilinear upsampling is exactly 1 at its centre
    win = (10, 20, 74, 116)
    out = viz.heatmap_overlay(img, win, grid_map, patch=(2, 1), alpha=0.6)
    assert out.shape == img.shape and out.dtype == np.uint8
    # outside the window the image is dimmed, not coloured
    np.testing.assert_array_equal(out[90, 190], np.round(np.full(3, 200 * viz.DIM_FACTOR)).astype(np.uint8))
    # the border just outside the query patch (rows 42..58, cols 36..52) has the marker colour
    y0, x0, y1, x1 = viz.patch_box(win, (4, 6), (2, 1), img.shape)
    assert (y0, x0, y1, x1) == (42, 36, 58, 52)
    assert tuple(out[y0 - 1, (x0 + x1) // 2]) == viz.MARKER_COLOR
    assert tuple(out[y1, (x0 + x1) // 2]) == viz.MARKER_COLOR
    assert tuple(out[(y0 + y1) // 2, x0 - 1]) == viz.MARKER_COLOR
    assert tuple(out[(y0 + y1) // 2, x1]) == viz.MARKER_COLOR
    # ... and the patch itself is not painted over
    assert tuple(out[(y0 + y1) // 2, (x0 + x1) // 2]) != viz.MARKER_COLOR
    # the hot block's centre gets the top of the colour map, a cold patch the bottom
    lut_hi = viz.apply_colormap(np.array([1.0]), vmin=0, vmax=1)[0].astype(float)
    lut_lo = viz.apply_colormap(np.array([0.0]), vmin=0, vmax=1)[0].astype(float)
    hot = out[10 + 16, 20 + 5 * 16].astype(float)
    cold = out[10 + 56, 20 + 8].astype(float)
    np.testing.assert_allclose(hot, 0.4 * 200 + 0.6 * lut_hi, atol=2)
    np.testing.assert_allclose(cold, 0.4 * 200 + 0.6 * lut_lo, atol=2)
    # the colour map never produces the marker colour
    assert not np.any(np.all(viz.apply_colormap(np.linspace(0, 1, 256)) == viz.MARKER_COLOR, axis=-1))


def test_heatmap_overlay_dims_pruned_patches():
    img = _image(64, 96, 200)
    grid_map = np.ones((4, 6), np.float32)
    kept = np.zeros((4, 6), bool)
    kept[1, 2] = True
    full = viz.heatmap_overlay(img, (0, 0, 64, 96), grid_map)
    pruned = viz.heatmap_overlay(img, (0, 0, 64, 96), grid_map, kept=kept)
    np.testing.assert_array_equal(pruned[16 + 8, 32 + 8], full[16 + 8, 32 + 8])  # kept: unchanged
    dimmed = full[40, 80].astype(float) * viz.DIM_FACTOR
    np.testing.assert_allclose(pruned[40, 80].astype(float), dimmed, atol=1)
    with pytest.raises(ValueError):
        viz.heatmap_overlay(img, (0, 0, 64, 96), grid_map, kept=np.ones((3, 3), bool))


def test_heatmap_overlay_accepts_window_objects_and_constant_maps():
    class Win:
        y0, x0, y1, x1 = 0, 0, 32, 32

    out = viz.heatmap_overlay(_image(32, 32), Win(), np.full((2, 2), 0.3, np.float32), patch=(1, 1))
    assert out.shape == (32, 32, 3)
    with pytest.raises(ValueError):
        viz.heatmap_overlay(_image(32, 32), (0, 0, 0, 10), np.ones((2, 2)))


def test_class_bar_chart_uses_class_colours():
    colors = np.array([[230, 25, 75], [0, 130, 200]], np.uint8)
    chart = viz.class_bar_chart(["cat", "dog"], np.array([0.8, 0.2]), colors, width=420)
    assert chart.ndim == 3 and chart.shape[1] == 420 and chart.dtype == np.uint8
    red = np.all(chart == colors[0], axis=-1)
    blue = np.all(chart == colors[1], axis=-1)
    # bars are as long as their probabilities: 0.8 vs 0.2 of the same scale
    red_len, blue_len = red.sum(axis=1).max(), blue.sum(axis=1).max()
    assert abs(red_len / blue_len - 4.0) < 0.25
    assert red.any(axis=1).nonzero()[0].max() < blue.any(axis=1).nonzero()[0].min(), "vocabulary order, top down"
    with pytest.raises(ValueError):
        viz.class_bar_chart(["cat"], np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="max_bars"):
        viz.class_bar_chart(["cat"], np.array([1.0]), max_bars=0)


def test_class_bar_chart_shows_the_most_probable_when_there_are_many():
    names = [f"class {i}" for i in range(40)]
    probs = np.full(40, 0.5 / 37)
    probs[[7, 30, 2]] = [0.25, 0.15, 0.1]
    colors = viz.palette(40)
    full = viz.class_bar_chart(names, probs, colors)
    top = viz.class_bar_chart(names, probs, colors, max_bars=3)
    assert top.shape[0] < full.shape[0] / 5, "three rows, not forty"

    def first_row(chart, i):
        rows = np.all(chart == colors[i], axis=-1).any(axis=1).nonzero()[0]
        return rows.min() if rows.size else None

    assert first_row(top, 7) < first_row(top, 30) < first_row(top, 2), "descending probability"
    assert all(first_row(top, i) is None for i in range(40) if i not in (7, 30, 2))
    assert all(first_row(full, i) is not None for i in range(40))


def test_compare_grid_layout():
    a, b = _image(40, 60, 10), _image(40, 60, 250)
    grid = viz.compare_grid([[a, b], [b, a], [a, a]], ["m1", "m2", "m3"], ["baseline", "+ FSA"], cell_width=120,
                            footer=viz.legend(["x", "y"], viz.palette(2), width=200))
    assert grid.shape[1] == 2 * 120 + 3 * 4
    # each cell is resized to 120 × 80, so three rows plus labels are taller than 240
    assert grid.shape[0] > 3 * 80
    with pytest.raises(ValueError):
        viz.compare_grid([[a]], ["m1"], ["baseline", "+ FSA"])
    with pytest.raises(ValueError):
        viz.compare_grid([[a, b]], [], ["baseline", "+ FSA"])


# --------------------------------------------------------------------------- error maps
def test_error_map_marks_wrong_correct_and_ignored_pixels():
    img = np.random.default_rng(0).integers(0, 256, (8, 12, 3)).astype(np.uint8)
    reference = np.zeros((8, 12), np.int64)
    reference[:, 6:] = 1
    reference[7, :] = 255
    labels = reference.copy()
    labels[7, :] = 0  # under ignore: not an error
    labels[2, 3] = 1  # wrong
    labels[5, 9] = 0  # wrong
    out = viz.error_map(img, labels, reference)
    assert out.shape == (8, 12, 3) and out.dtype == np.uint8
    for y, x in ((2, 3), (5, 9)):
        assert tuple(out[y, x]) == viz.ERROR_COLOR
    correct = (labels == reference) & (reference != 255)
    expected = np.clip(img.astype(np.float32) * viz.DIM_FACTOR + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out[correct], expected[correct])
    assert not (out[correct] == viz.ERROR_COLOR).all(axis=1).any()
    hatch = {tuple(c) for c in out[7]}
    assert hatch == set(viz.IGNORE_HATCH)  # both greys of the stripes, nothing else
    for x in range(12):  # diagonal stripes 4 px wide: grey number ((y + x) // 4) % 2
        assert tuple(out[7, x]) == viz.IGNORE_HATCH[((7 + x) // 4) % 2]
    with pytest.raises(ValueError, match="same height and width"):
        viz.error_map(img, labels[:, :5], reference)


def test_error_maps_side_by_side_with_captions_and_key():
    img = _image(32, 40)
    reference = np.zeros((32, 40), np.int64)
    wrong = reference + 1
    out = viz.error_maps(img, [reference, wrong], reference, ["baseline: 0.0% wrong", "+ FSA: 100.0% wrong"])
    caption_h = 14 + 10  # `_text_strip` height at the smallest font
    assert out.shape[1] == 2 * 40 + 6
    left = out[caption_h: caption_h + 32, :40]
    right = out[caption_h: caption_h + 32, 46:86]
    np.testing.assert_array_equal(left, viz.error_map(img, reference, reference))
    assert (right == viz.ERROR_COLOR).all(axis=2).all()
    assert (out[caption_h: caption_h + 32, 40:46] == 255).all()  # white gap
    assert out.shape[0] > caption_h + 32  # the key below
    assert (out[:caption_h, :40] < 128).any()  # caption text drawn
    single = viz.error_maps(img, [reference], reference, ["baseline"])
    assert single.shape[1] == 40
    with pytest.raises(ValueError, match="one caption per image"):
        viz.side_by_side([img], ["a", "b"])


def test_heatmap_of_a_window_past_the_border_is_cropped_not_squeezed():
    img = np.zeros((4, 8, 3), np.uint8)
    grid = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)
    out = viz.heatmap_overlay(img, (-2, 0, 6, 8), grid, alpha=1.0, vmin=0.0, vmax=3.0)
    full = viz.apply_colormap(cv2.resize(grid, (8, 8), interpolation=cv2.INTER_LINEAR), vmin=0.0, vmax=3.0)
    assert np.abs(out.astype(int) - full[2:6].astype(int)).max() <= 1
    assert viz.patch_box((-2, 0, 6, 8), (2, 2), (0, 0), img.shape) == (0, 0, 2, 4)  # rows -2..2, clipped at 0


# --------------------------------------------------------------------------- feedback step by step
def _colour_pixels(chart, colour):
    """(ys, xs) of the pixels of exactly ``colour``."""
    return np.nonzero(np.all(chart == np.asarray(colour, np.uint8), axis=-1))


def test_logit_bar_chart_draws_signed_bars_from_zero():
    colors = np.array([[230, 25, 75], [0, 130, 200], [60, 180, 75]], np.uint8)
    chart = viz.logit_bar_chart(["cat", "dog", "sky"], np.array([2.0, -1.0, 0.5]), colors, title="Z_i")
    assert chart.dtype == np.uint8 and chart.ndim == 3 and chart.shape[1] >= 400
    _, red_x = _colour_pixels(chart, colors[0])
    _, blue_x = _colour_pixels(chart, colors[1])
    _, green_x = _colour_pixels(chart, colors[2])
    assert red_x.size and blue_x.size and green_x.size
    # the positive bars start right of the zero line where the negative one ends
    assert blue_x.max() < red_x.min() and abs(int(red_x.min()) - int(green_x.min())) <= 1
    assert int(red_x.min()) - int(blue_x.max()) <= 4  # only the zero line and the bar edges in between
    # bar lengths follow the values: 2 : 1 : 0.5
    lengths = [np.ptp(x) + 1 for x in (red_x, blue_x, green_x)]
    assert lengths[0] == pytest.approx(2 * lengths[1], rel=0.08) and lengths[2] == pytest.approx(lengths[1] / 2,
                                                                                                 rel=0.15)
    assert viz.logit_bar_chart(["a"], np.zeros(1)).ndim == 3  # all zero: no division by zero
    with pytest.raises(ValueError, match="2 values for 1 names"):
        viz.logit_bar_chart(["a"], np.zeros(2))


def test_text_panel_wraps_its_text():
    short = viz.text_panel("isolation off", 200, 120, font_size=14)
    long = viz.text_panel("isolation off: " + "word " * 40, 200, 120, font_size=14)
    assert short.shape == long.shape == (120, 200, 3) and short.dtype == np.uint8
    assert tuple(short[0, 0]) == (245, 245, 245)
    dark_rows = lambda im: np.nonzero((im < 100).all(axis=-1).any(axis=1))[0]  # noqa: E731
    assert dark_rows(short).size and dark_rows(short).max() < 12 + 20  # one line
    assert dark_rows(long).max() > 12 + 3 * 20  # wrapped onto several lines
    assert (long[:, 190:] >= 240).all()  # nothing drawn past the right margin


def _step_inputs(isolation=True):
    rng = np.random.default_rng(0)
    gh, gw = 4, 6
    kept = np.zeros((gh, gw), bool)
    kept[1, 1:4] = True
    return dict(
        query_names=["cat", "kitten", "sky"],
        feedback_logits=np.array([3.0, 2.0, -1.0]),
        isolation_logits=np.array([1.0, 1.5, 0.5]) if isolation else None,
        class_names=["cat", "sky"],
        class_probs=np.array([0.7, 0.3]),
        similarity=rng.random((gh, gw)).astype(np.float32),
        kept=kept,
        attn_new=rng.random((gh, gw)).astype(np.float32),
        attn_ensemble=rng.random((gh, gw)).astype(np.float32),
        query_colors=np.array([[230, 25, 75], [230, 25, 75], [0, 130, 200]], np.uint8),
        colors=np.array([[230, 25, 75], [0, 130, 200]], np.uint8),
    )


def test_feedback_step_panels_are_the_seven_steps():
    img = np.random.default_rng(1).integers(0, 256, (100, 200, 3)).astype(np.uint8)
    win, patch = (10, 20, 74, 116), (1, 2)
    kw = _step_inputs()
    panels = viz.feedback_step_panels(img, win, patch, **kw)
    assert len(panels) == viz.FEEDBACK_STEPS == 7
    z, u, pi, sim, pruned, new, ens = panels
    # 1-2: one bar per query in its class colour, Z and U of different lengths
    for chart in (z, u):
        assert _colour_pixels(chart, kw["query_colors"][0])[0].size and _colour_pixels(chart, kw["query_colors"][2])[
            0].size
    assert not np.array_equal(z, u)
    np.testing.assert_array_equal(pi, viz.class_bar_chart(kw["class_names"], kw["class_probs"], kw["colors"]))
    # 4-7: the maps over the window, exactly heatmap_overlay's pictures
    np.testing.assert_array_equal(sim, viz.heatmap_overlay(img, win, kw["similarity"], patch))
    np.testing.assert_array_equal(pruned, viz.heatmap_overlay(img, win, kw["similarity"], patch, kept=kw["kept"]))
    np.testing.assert_array_equal(new, viz.heatmap_overlay(img, win, kw["attn_new"], patch))
    np.testing.assert_array_equal(ens, viz.heatmap_overlay(img, win, kw["attn_ensemble"], patch))
    for panel in (sim, pruned, new, ens):
        assert panel.shape == img.shape
        y0, x0, y1, x1 = viz.patch_box(win, (4, 6), patch, img.shape)
        assert tuple(panel[y0 - 1, (x0 + x1) // 2]) == viz.MARKER_COLOR
    # the kept set: a pruned patch (row 3, col 5: pixels 58..74, 100..116) dimmed, a kept one (row 1, col 2) not
    np.testing.assert_allclose(pruned[66, 108].astype(float), sim[66, 108] * viz.DIM_FACTOR, atol=1)
    np.testing.assert_array_equal(pruned[34, 60], sim[34, 60])
    # isolation off: step 2 is a card that says so, no U bars
    off = viz.feedback_step_panels(img, win, patch, **_step_inputs(isolation=False))
    assert off[1].shape == off[0].shape and tuple(off[1][0, 0]) == (245, 245, 245)
    assert not _colour_pixels(off[1], kw["query_colors"][0])[0].size
    np.testing.assert_array_equal(off[0], z)


def test_feedback_steps_figure_tiles_panels_under_captions():
    colours = viz.palette(7)
    sizes = [(40, 60), (30, 60), (60, 40), (50, 100), (20, 20), (64, 96), (10, 80)]
    panels = [np.broadcast_to(c, (h, w, 3)).copy() for c, (h, w) in zip(colours, sizes)]
    captions = [f"{i + 1}. step" for i in range(7)]
    fig = viz.feedback_steps_figure(panels, captions, cell_width=120, columns=4, gap=6)
    assert fig.dtype == np.uint8 and fig.shape[1] == 4 * 120 + 5 * 6
    for i, (colour, (h, w)) in enumerate(zip(colours, sizes)):
        x = 6 + (i % 4) * (120 + 6)
        column = np.all(fig[:, x:x + 120] == colour, axis=-1).all(axis=1)  # rows entirely this colour
        rows = np.nonzero(column)[0]
        assert rows.size == round(h * 120 / w), (i, rows.size)
        assert np.all(np.diff(rows) == 1)  # one block
        assert (rows[0] > 150) == (i >= 4)  # the second row of tiles is below the first
        caption = fig[rows[0] - 16:rows[0], x:x + 120]
        assert (caption < 100).all(axis=-1).any(), f"caption {i} not drawn above its panel"
    longer = viz.feedback_steps_figure(panels, ["a long caption " * 6] + captions[1:], cell_width=120, columns=4)
    assert longer.shape[0] > fig.shape[0]  # wrapped onto more lines
    with pytest.raises(ValueError, match="one caption per panel"):
        viz.feedback_steps_figure(panels, captions[:3])


def _lab(rgb):
    """sRGB (0-255) → CIELAB (D65), written from the standard formulas."""
    c = np.asarray(rgb, float) / 255
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _deuteranopia(rgb):
    """Viénot, Brettel & Mollon (1999) simulation of deuteranopia on sRGB 0-255 (linear-light matrix)."""
    c = np.asarray(rgb, float) / 255
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.29275, 0.70725, 0.0], [0.29275, 0.70725, 0.0], [-0.02234, 0.02234, 1.0]])
    out = np.clip(lin @ m.T, 0, 1)
    return 255 * np.where(out <= 0.0031308, 12.92 * out, 1.055 * out ** (1 / 2.4) - 0.055)


def test_palette_is_colour_blind_friendly():
    first = viz.palette(8)
    hues = [colorsys.rgb_to_hsv(*(first[i] / 255))[0] * 360 for i in range(2)]
    # neither of the first two colours is a red (hue < 20° or > 340°) or a green (90°-150°)
    assert all(not (h < 20 or h > 340 or 90 <= h <= 150) for h in hues), hues
    for simulate in (lambda c: c, _deuteranopia):
        lab = _lab(simulate(first))
        d = np.linalg.norm(lab[:, None] - lab[None], axis=-1) + np.eye(8) * 1e9
        assert d.min() > 10, f"two of the first 8 colours are {d.min():.1f} ΔE apart"
    # none is a colour with another meaning: the background's grey, black/white (ignore), the marker, errors
    taken = {viz.BACKGROUND_COLOR, (0, 0, 0), (255, 255, 255), viz.MARKER_COLOR, viz.ERROR_COLOR}
    assert not taken & {tuple(int(v) for v in c) for c in viz.palette(19)}


def test_with_colorbar_draws_the_colour_map_under_the_picture():
    img = _image(40, 200)
    out = viz.with_colorbar(img, 0.0, 0.25)
    assert out.shape[1] == 200 and out.shape[0] > 40
    np.testing.assert_array_equal(out[:40], img)
    lut = viz.apply_colormap(np.array([0.0, 1.0]), vmin=0.0, vmax=1.0)
    strip = out[40:].reshape(-1, 3)
    for c in lut:  # both ends of the colour map are in the bar
        assert (np.abs(strip.astype(int) - c).sum(axis=1) <= 6).any()
