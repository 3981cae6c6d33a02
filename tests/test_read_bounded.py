"""fsa.images.read_bounded: files decoded straight to the working size, budget refusals, clear errors."""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from fsa.images import read_bounded, to_rgb_uint8, working_size

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A natural 600×400 photo (the coffee example) as (400, 600, 3) uint8."""
    return np.asarray(Image.open(REPO / "examples" / "coffee.jpg").convert("RGB"))


def _area_resize(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return cv2.resize(rgb, (hw[1], hw[0]), interpolation=cv2.INTER_AREA)


def test_small_images_are_kept_as_they_are(tmp_path, photo):
    path = tmp_path / "small.png"
    Image.fromarray(photo).save(path)
    out = read_bounded(path, 448)  # short side 400 < 448: never upscaled here
    np.testing.assert_array_equal(out.rgb, photo)
    assert out.source_size == (600, 400)


def test_large_jpeg_is_decoded_at_the_working_size(tmp_path, photo, monkeypatch):
    big = cv2.resize(photo, (4800, 3200), interpolation=cv2.INTER_CUBIC)
    path = tmp_path / "big.jpg"
    Image.fromarray(big).save(path, quality=95)
    decoded_sizes = []
    real_load = ImageFile.ImageFile.load

    def spy_load(self):
        decoded_sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    out = read_bounded(path, 448)
    monkeypatch.undo()
    assert out.rgb.shape[:2] == working_size(3200, 4800, 448) == (448, 672)
    assert out.source_size == (4800, 3200)
    # the JPEG decoder itself worked at 1/4 scale (4800/4 = 1200 ≥ 672): never the full 15 MP array
    assert decoded_sizes and max(w * h for w, h in decoded_sizes) <= 1200 * 800
    # and the picture is the full decode reduced to the same size, up to resampling
    reference = _area_resize(to_rgb_uint8(path), (448, 672))
    assert np.abs(reference.astype(int) - out.rgb).mean() < 3.0


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_after_the_reduction(tmp_path, photo, orientation):
    big = cv2.resize(photo, (1800, 1200), interpolation=cv2.INTER_CUBIC)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated{orientation}.jpg"
    Image.fromarray(big).save(path, quality=95, exif=exif.tobytes())
    out = read_bounded(path, 224)
    upright = to_rgb_uint8(path)  # the whole-image path of the CLI: ImageOps.exif_transpose
    h, w = upright.shape[:2]
    assert out.source_size == (w, h)
    assert out.rgb.shape[:2] == working_size(h, w, 224)
    assert np.abs(_area_resize(upright, out.rgb.shape[:2]).astype(int) - out.rgb).mean() < 3.0


def test_sixteen_bit_and_transparent_images_keep_their_rules_when_reduced(tmp_path):
    ramp = (np.linspace(0, 65535, 1000)[None, :] * np.ones((500, 1))).astype(np.uint16)
    path16 = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path16)
    out = read_bounded(path16, 100).rgb  # 500 → 100 rows
    assert out.shape == (100, 200, 3)
    # 16-bit scaled over its full range (not clipped at 255): dark left, bright right, monotone
    assert out[:, 0].max() < 10 and out[:, -1].min() > 245
    assert np.all(np.diff(out[50, :, 0].astype(int)) >= 0)

    palette = Image.new("P", (400, 200))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (200, 0, 400, 200))
    palette.info["transparency"] = 1  # the right half is transparent → white
    pathp = tmp_path / "palette.png"
    palette.save(pathp, transparency=1)
    out = read_bounded(pathp, 50).rgb
    assert out.shape == (50, 100, 3)
    np.testing.assert_array_equal(out[:, :40], np.broadcast_to([255, 0, 0], (50, 40, 3)))
    np.testing.assert_array_equal(out[:, 60:], np.full((50, 40, 3), 255))


def test_arrays_pil_images_and_file_objects(tmp_path, photo):
    target = working_size(400, 600, 200)
    from_array = read_bounded(photo, 200)
    np.testing.assert_array_equal(from_array.rgb, _area_resize(photo, target))
    assert from_array.source_size == (600, 400)
    assert read_bounded(Image.fromarray(photo), 200).rgb.shape[:2] == target
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    buffer.seek(0)
    assert read_bounded(buffer, 200).rgb.shape[:2] == target


def test_over_the_pixel_budget_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    Image.new("RGB", (3000, 2000), (10, 20, 30)).save(path)

    def no_decoding(self):
        raise AssertionError("the image was decoded although it is over the budget")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ValueError, match=r"wide.png is 3000×2000 pixels \(6 megapixels\); this server decodes at "
                                         r"most 5 megapixels: downscale the image first"):
        read_bounded(path, 448, max_pixels=5_000_000, name="wide.png")


def test_a_jpeg_counts_its_pixels_after_the_decoders_reduction(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (200, 100, 50)).save(path, quality=90)
    # 12 MP stored, decoded at 1/8 (500×375) for a 64-px short side: within a 1 MP budget
    out = read_bounded(path, 64, max_pixels=1_000_000)
    assert out.rgb.shape[:2] == working_size(3000, 4000, 64)
    np.testing.assert_allclose(out.rgb.reshape(-1, 3).mean(axis=0), [200, 100, 50], atol=2)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"hello, I am a text file\n", r"cannot read bad.png as an image \(cannot identify image file 'bad.png'\); "
                                        r"use a PNG, JPEG"),
        (b"", r"bad.png is an empty file \(0 bytes\); upload an image file"),
    ],
)
def test_non_images_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_bounded(path, 448, name="bad.png")


def test_truncated_and_damaged_jpegs_are_clear_errors(tmp_path, photo):
    good = io.BytesIO()
    Image.fromarray(photo).save(good, format="JPEG", quality=90)
    data = good.getvalue()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read truncated.jpg as an image \(image file is truncated"):
        read_bounded(truncated, 448, name="truncated.jpg")
    damaged = tmp_path / "damaged.jpg"
    damaged.write_bytes(data[:2] + b"\x00" * 400 + data[402:])
    with pytest.raises(ValueError, match=r"cannot read damaged.jpg as an image"):
        read_bounded(damaged, 448, name="damaged.jpg")
    # messages name the file, never the folder the server keeps it in
    with pytest.raises(ValueError) as info:
        read_bounded(damaged, 448, name="damaged.jpg")
    assert str(tmp_path) not in str(info.value)


def test_missing_file_and_bad_arguments():
    with pytest.raises(FileNotFoundError, match="image file not found"):
        read_bounded("/no/such/file.png", 448)
    with pytest.raises(ValueError, match="no image given"):
        read_bounded(None, 448)
    with pytest.raises(ValueError, match="must be positive"):
        read_bounded(np.zeros((4, 4, 3), np.uint8), 0)
