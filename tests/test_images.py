"""fsa.images: conversion of any input image to (H, W, 3) uint8, size limits, working size."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fsa.images import limit_size, to_rgb_uint8, working_size


def _pil(mode: str, values) -> Image.Image:
    """A 1xN image of ``mode`` with the given pixel values (putpixel handles every mode)."""
    image = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    return image


@pytest.mark.parametrize(
    "mode, values, expected",
    [
        ("RGB", [(10, 20, 30)], [(10, 20, 30)]),
        ("L", [0, 77, 255], [(0, 0, 0), (77, 77, 77), (255, 255, 255)]),
        ("1", [0, 1], [(0, 0, 0), (255, 255, 255)]),
        ("RGBA", [(255, 0, 0, 255), (255, 0, 0, 0), (0, 0, 0, 128)],
         [(255, 0, 0), (255, 255, 255), (127, 127, 127)]),
        ("LA", [(0, 255), (0, 0)], [(0, 0, 0), (255, 255, 255)]),
        ("I;16", [0, 257, 65535], [(0, 0, 0), (1, 1, 1), (255, 255, 255)]),
        ("I", [-5, 32896, 70000], [(0, 0, 0), (128, 128, 128), (255, 255, 255)]),
        ("F", [0.5, -1.0, 2.0], [(128, 128, 128), (0, 0, 0), (255, 255, 255)]),
        ("CMYK", [(0, 0, 0, 0), (0, 0, 0, 255)], [(255, 255, 255), (0, 0, 0)]),
    ],
)
def test_pil_modes(mode, values, expected):
    out = to_rgb_uint8(_pil(mode, values))
    assert out.dtype == np.uint8 and out.shape == (1, len(values), 3)
    np.testing.assert_array_equal(out[0], np.array(expected, dtype=np.uint8))


def test_palette_with_and_without_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    np.testing.assert_array_equal(to_rgb_uint8(image)[0], [(255, 0, 0), (0, 0, 255)])
    image.info["transparency"] = 1  # palette index 1 is transparent -> white
    np.testing.assert_array_equal(to_rgb_uint8(image)[0], [(255, 0, 0), (255, 255, 255)])


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.array([[0, 200]], dtype=np.uint8), [(0, 0, 0), (200, 200, 200)]),
        (np.array([[[0], [200]]], dtype=np.uint8), [(0, 0, 0), (200, 200, 200)]),
        (np.array([[[1, 2, 3]]], dtype=np.uint8), [(1, 2, 3)]),
        (np.array([[[0, 0, 0, 0], [0, 0, 0, 255]]], dtype=np.uint8), [(255, 255, 255), (0, 0, 0)]),
        (np.array([[0, 65535, 32896]], dtype=np.uint16), [(0, 0, 0), (255, 255, 255), (128, 128, 128)]),
        (np.array([[True, False]]), [(255, 255, 255), (0, 0, 0)]),
        (np.array([[[0.0, 0.5, 1.0], [-0.5, 1.5, 0.25]]], dtype=np.float32), [(0, 128, 255), (0, 255, 64)]),
        (np.array([[[0.0, 0.0, 0.0, 0.5]]], dtype=np.float64), [(128, 128, 128)]),
        (np.array([[3, 250]], dtype=np.int64), [(3, 3, 3), (250, 250, 250)]),
    ],
)
def test_arrays(array, expected):
    out = to_rgb_uint8(array)
    assert out.dtype == np.uint8 and out.shape == array.shape[:2] + (3,)
    assert out.flags.c_contiguous and out.flags.writeable and not np.shares_memory(out, array)
    np.testing.assert_array_equal(out[0], np.array(expected, dtype=np.uint8))


@pytest.mark.parametrize(
    "bad, message",
    [
        (None, "no image given"),
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.zeros((4, 4, 2), np.uint8), r"must be \(H, W\)"),
        (np.zeros((3, 8, 8), np.uint8), "channels first"),
        (np.zeros((2, 2, 2, 3), np.uint8), r"got shape \(2, 2, 2, 3\)"),
        (np.array([[0.5, np.nan]]), "NaN or infinite"),
        (np.array([[0.5, np.inf]], dtype=np.float32), "NaN or infinite"),
        (np.array([[-1, 300]], dtype=np.int32), r"values in \[-1, 300\]"),
        (np.array([[1 + 2j]]), "unsupported dtype"),
        ([[1, 2]], "unsupported image type list"),
        (Image.new("RGB", (0, 0)), "empty"),
    ],
)
def test_rejects(bad, message):
    with pytest.raises(ValueError, match=message):
        to_rgb_uint8(bad)


def test_files(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(to_rgb_uint8(tmp_path / "a.png"), rgb)
    np.testing.assert_array_equal(to_rgb_uint8(str(tmp_path / "a.png")), rgb)
    Image.fromarray(np.full((2, 3), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")  # 16-bit grey PNG
    assert (to_rgb_uint8(tmp_path / "deep.png") == 255).all()
    with pytest.raises(FileNotFoundError, match="image file not found: .*missing.png"):
        to_rgb_uint8(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read .*notes.txt as an image"):
        to_rgb_uint8(tmp_path / "notes.txt")


def test_exif_orientation_is_applied(tmp_path):
    """Four differently coloured quadrants tell the clockwise rotation from the counter-clockwise one and from
    a transposition (a plain image cannot)."""
    rgb = np.zeros((16, 32, 3), np.uint8)  # stored 32 wide, 16 high
    rgb[:8, :16], rgb[:8, 16:], rgb[8:, :16], rgb[8:, 16:] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    got = to_rgb_uint8(tmp_path / "photo.jpg").astype(int)
    assert got.shape == (32, 16, 3)

    def error(want):  # mean abs difference; JPEG blurs the quadrant edges a little
        return np.abs(got - want.astype(int)).mean()

    assert error(np.rot90(rgb, k=-1)) < 10  # clockwise: blue top-left, red top-right
    assert min(error(np.rot90(rgb, k=1)), error(rgb.transpose(1, 0, 2))) > 60


def test_limit_size_downscales_with_a_note():
    big = np.zeros((4000, 6000, 3), np.uint8)
    big[:, 3000:] = 200
    small, notes = limit_size(big)
    assert small.shape == (2731, 4096, 3)
    assert notes == ["image downscaled from 6000×4000 to 4096×2731 (longest side above 4096)"]
    assert small[0, 0, 0] == 0 and small[0, -1, 0] == 200  # area interpolation keeps flat regions exact
    same, none = limit_size(np.zeros((10, 4096, 3), np.uint8))
    assert same.shape == (10, 4096, 3) and none == []
    tall, _ = limit_size(np.zeros((300, 10, 3), np.uint8), max_side=100)
    assert tall.shape == (100, 3, 3)


@pytest.mark.parametrize(
    "h, w, short, kwargs, expected",
    [
        (480, 640, 448, {}, (448, 597)),  # 640 * 448 / 480 = 597.33
        (640, 480, 448, {}, (597, 448)),
        (333, 500, 448, {}, (448, 673)),  # 672.67 -> rounded half up
        (10, 10, 448, {}, (448, 448)),  # small images are upsampled
        (100, 5000, 448, {}, (41, 2048)),  # long side capped, aspect kept
        (4, 4000, 448, {}, (16, 2048)),  # the short side would be 2 px: at least min_side
        (4, 4000, 448, {"min_side": 14}, (14, 2048)),
        (1000, 3000, 448, {"long_cap": 1200}, (400, 1200)),
    ],
)
def test_working_size(h, w, short, kwargs, expected):
    assert working_size(h, w, short, **kwargs) == expected


def test_working_size_rejects_bad_sizes():
    with pytest.raises(ValueError, match="must be positive"):
        working_size(0, 10, 448)
    with pytest.raises(ValueError, match="must be positive"):
        working_size(10, 10, 0)
