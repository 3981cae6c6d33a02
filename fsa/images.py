"""Input images: any PIL image / numpy array / file path -> (H, W, 3) uint8 RGB; sizes (docs/method.md §1).

Conversion rules (documented, predictable):
- uint8 as is; uint16 (and PIL's 16/32-bit integer modes) over the full 16-bit range:
  round(v / 65535 * 255), PIL "I" values clipped to [0, 65535] first; bool: False -> 0,
  True -> 255; other integer dtypes must lie in [0, 255]; floats (and PIL mode "F") are in
  [0, 1], clipped, and must be finite.
- Grey is replicated to RGB; alpha is composited over white; CMYK, palette, YCbCr... through PIL.
- PIL images are turned upright with their EXIF orientation.

`read_bounded` decodes a file (or file object, PIL image, array) straight to the working size of a
segmentation, so that a huge upload never becomes a full-size array when it can be avoided: JPEGs are
decoded at 1/2, 1/4 or 1/8 scale by the decoder itself (PIL `draft`), other formats are reduced right
after decoding, and a source above ``max_pixels`` decoded pixels is refused before decoding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Union

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[np.ndarray, Image.Image, str, Path]

#: CLIP input normalisation on 0-255 RGB, as the published ProxyCLIP / NACLIP / SCLIP configs give it to
#: mmseg's SegDataPreProcessor (mean=[122.771, 116.746, 104.094], std=[68.501, 66.632, 70.323]): OpenAI
#: CLIP's mean/std times 255, rounded to three decimals (so not exactly open_clip's OPENAI_DATASET_*·255).
CLIP_PIXEL_MEAN_255: tuple[float, float, float] = (122.771, 116.746, 104.094)
CLIP_PIXEL_STD_255: tuple[float, float, float] = (68.501, 66.632, 70.323)


def _unit_float(values: np.ndarray, what: str) -> np.ndarray:
    """Any-dtype array -> float32 in [0, 1] with the module's rules."""
    if values.dtype == np.bool_:
        return values.astype(np.float32)
    if values.dtype == np.uint8:
        return values.astype(np.float32) / 255.0
    if values.dtype == np.uint16:
        return values.astype(np.float32) / 65535.0
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise ValueError(f"{what} contains NaN or infinite values")
        return np.clip(values.astype(np.float32), 0.0, 1.0)
    if np.issubdtype(values.dtype, np.integer):
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"{what} has dtype {values.dtype} with values in [{lo}, {hi}]; pass uint8 (0-255), "
                "uint16 (0-65535) or float (0-1)"
            )
        return values.astype(np.float32) / 255.0
    raise ValueError(f"{what} has unsupported dtype {values.dtype}; pass uint8, uint16, bool or float")


def _from_array(array: np.ndarray, what: str = "image array") -> np.ndarray:
    if array.size == 0:
        raise ValueError(f"{what} is empty (shape {array.shape})")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        channels_first = array.ndim == 3 and array.shape[0] in (1, 3, 4)
        hint = " (channels first? use array.transpose(1, 2, 0))" if channels_first else ""
        raise ValueError(f"{what} must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {array.shape}{hint}")
    if array.dtype == np.uint8 and array.ndim == 3 and array.shape[-1] == 3:
        return np.array(array, order="C")  # the common case: a writable copy, nothing to convert
    unit = _unit_float(array, what)
    if unit.ndim == 2:
        unit = unit[..., None]
    elif unit.shape[-1] == 4:  # composite over white, before quantising
        alpha = unit[..., 3:]
        unit = unit[..., :3] * alpha + (1.0 - alpha)
    rgb = np.round(unit * 255.0).astype(np.uint8)
    return np.repeat(rgb, 3, axis=-1) if rgb.shape[-1] == 1 else rgb


def _from_pil(image: Image.Image, *, upright: bool = False) -> np.ndarray:
    if not upright:
        image = ImageOps.exif_transpose(image)  # photos as viewers show them
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # PIL's convert("RGB") would clip these at 255: scale over 16 bits instead.
        values = np.asarray(image).astype(np.int64)
        return _from_array(np.clip(values, 0, 65535).astype(np.uint16), f"{mode} image")
    if mode == "F":
        return _from_array(np.asarray(image, dtype=np.float32), "F (float) image")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    if has_alpha:
        return _from_array(np.asarray(image.convert("RGBA")), f"{mode} image")
    return np.asarray(image.convert("RGB")).copy()


def to_rgb_uint8(image: ImageLike) -> np.ndarray:
    """Any supported image -> (H, W, 3) uint8 RGB (see the module docstring for the rules).

    ``ValueError`` for None, empty images, wrong shapes and non-finite floats;
    ``FileNotFoundError`` for a missing path.
    """
    if image is None:
        raise ValueError("no image given; upload or pass an image")
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {image} (check the path)")
        try:
            with Image.open(path) as opened:
                opened.load()
                return _from_pil(opened)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as exc:
            raise ValueError(
                f"cannot read {image} as an image ({exc}); use a PNG, JPEG, WebP, BMP or TIFF file"
            ) from exc
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image is empty ({image.width}x{image.height})")
        return _from_pil(image)
    if isinstance(image, np.ndarray):
        return _from_array(image)
    raise ValueError(f"unsupported image type {type(image).__name__}; pass a numpy array, a PIL image or a file path")


def limit_size(rgb: np.ndarray, max_side: int = 4096) -> tuple[np.ndarray, list[str]]:
    """Downscale (area interpolation) so the longest side is at most ``max_side``; notes say so."""
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb, []
    scale = max_side / max(h, w)
    new_w, new_h = max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))
    small = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA)
    return small, [f"image downscaled from {w}×{h} to {new_w}×{new_h} (longest side above {max_side})"]


def working_size(h: int, w: int, short_side: int, *, long_cap: int = 2048, min_side: int = 16) -> tuple[int, int]:
    """(h', w') with the short side ``short_side``, unless that makes the long side exceed ``long_cap``
    (then long side = ``long_cap``); aspect kept, rounded half up (mmseg's rescale), sides >= ``min_side``.
    """
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    if short_side < 1 or long_cap < 1:
        raise ValueError("short_side and long_cap must be positive")
    scale = min(short_side / min(h, w), long_cap / max(h, w))
    return max(min_side, math.floor(h * scale + 0.5)), max(min_side, math.floor(w * scale + 0.5))


_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 → (h, w, 3) uint8 with OpenCV's bilinear (mmcv's `imresize`, the published resize).

    No antialiasing when shrinking: that is what the published evaluation feeds the network.
    """
    h, w = size
    if (h, w) == rgb.shape[:2]:
        return rgb
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)


def pixel_stats_255(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std for 0-255 pixels: the published rounded constants for OpenAI's statistics."""
    if np.allclose(mean, _OPENAI_MEAN, atol=1e-7) and np.allclose(std, _OPENAI_STD, atol=1e-7):
        return CLIP_PIXEL_MEAN_255, CLIP_PIXEL_STD_255
    return tuple(255.0 * m for m in mean), tuple(255.0 * s for s in std)


#: EXIF orientation → the PIL transpose that turns the stored pixels upright (as ImageOps.exif_transpose).
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112
#: Modes PIL resizes with a real filter; "P" and "1" would fall back to nearest neighbour.
_RESIZABLE_MODES = {"L", "LA", "RGB", "RGBA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
#: Decoded pixels accepted by default: 10000×10000 photos pass; at most 5 bytes a pixel (a palette image
#: expanded to RGBA) that is ≤ 600 MB while decoding. Deployments set their own (the app: FSA_MAX_PIXELS).
DEFAULT_MAX_PIXELS = 120_000_000


@dataclass(frozen=True)
class BoundedImage:
    """An image decoded no larger than the working size it is meant for."""

    rgb: np.ndarray  #: (h, w, 3) uint8, upright
    source_size: tuple[int, int]  #: (width, height) of the upright source, before any reduction


def _target_size(height: int, width: int, short_side: int, long_cap: int) -> tuple[int, int]:
    """(h, w) of the working size for an upright source, never larger than the source."""
    th, tw = working_size(height, width, short_side, long_cap=long_cap)
    return (th, tw) if th < height or tw < width else (height, width)


def _orientation(image: Image.Image) -> int:
    try:
        value = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not stop the picture itself
        return 1
    return value if value in _ORIENTATION_FIX else 1


def _reduce_pil(image: Image.Image, short_side: int, long_cap: int, orientation: Optional[int] = None,
                source_size: Optional[tuple[int, int]] = None) -> BoundedImage:
    """A loaded (or lazily opened) PIL image → upright RGB no larger than the working size.

    source_size: (width, height) of the stored pixels before a JPEG draft reduced them (the
    working size is computed from it); orientation: the EXIF orientation, read here when None.
    """
    if orientation is None:
        orientation = _orientation(image)
    swap = orientation in (5, 6, 7, 8)  # stored sideways
    width, height = source_size or image.size
    up_w, up_h = (height, width) if swap else (width, height)
    th, tw = _target_size(up_h, up_w, short_side, long_cap)
    stored = (th, tw) if swap else (tw, th)  # PIL sizes are (width, height) of the stored pixels
    if stored != image.size:
        if image.mode not in _RESIZABLE_MODES:
            has_alpha = image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
            image = image.convert("L" if image.mode == "1" else "RGBA" if has_alpha else "RGB")
        # reducing_gap: integer box reduction first, then the filter on at most 2x the target size
        # (PIL's box reduction has no 16-bit modes: those take the filter alone).
        gap = None if image.mode.startswith("I;16") else 2.0
        image = image.resize(stored, Image.Resampling.BILINEAR, reducing_gap=gap)
    if orientation != 1:
        image = image.transpose(_ORIENTATION_FIX[orientation])
    return BoundedImage(_from_pil(image, upright=True), (up_w, up_h))


def _decode_error(name: str, exc: BaseException, path: Optional[Path]) -> ValueError:
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if path is not None:  # say the file's name, not where the server keeps it
        detail = detail.replace(str(path), path.name)
    return ValueError(f"cannot read {name} as an image ({detail}); use a PNG, JPEG, WebP, BMP or TIFF file")


def read_bounded(image: Union[ImageLike, BinaryIO], short_side: int, *, long_cap: int = 2048,
                 max_pixels: int = DEFAULT_MAX_PIXELS, name: Optional[str] = None) -> BoundedImage:
    """Decode ``image`` to at most the working size `working_size(h, w, short_side, long_cap)`.

    A file path or binary file object is decoded straight to that size (JPEG by its decoder at a
    reduced scale, other formats reduced as soon as they are decoded) and refused with a
    ``ValueError`` when more than ``max_pixels`` pixels would have to be decoded. PIL images and
    arrays are already in memory: they are converted (`to_rgb_uint8` rules) and reduced. Images
    smaller than the working size are kept as they are. ``name`` is how messages call the image.
    """
    if image is None:
        raise ValueError("no image given; upload or pass an image")
    if short_side < 1 or long_cap < 1 or max_pixels < 1:
        raise ValueError("short_side, long_cap and max_pixels must be positive")
    if isinstance(image, np.ndarray):
        rgb = _from_array(image)
        h, w = rgb.shape[:2]
        th, tw = _target_size(h, w, short_side, long_cap)
        if (th, tw) != (h, w):
            rgb = cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_AREA)
        return BoundedImage(rgb, (w, h))
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image is empty ({image.width}x{image.height})")
        return _reduce_pil(image, short_side, long_cap, None)
    path: Optional[Path] = None
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        name = name or str(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {name} (check the path)")
        if path.stat().st_size == 0:
            raise ValueError(f"{name} is an empty file (0 bytes); upload an image file")
        source = path
    elif hasattr(image, "read"):
        name = name or "the image data"
        source = image
    else:
        raise ValueError(f"unsupported image type {type(image).__name__}; pass a numpy array, a PIL image or a "
                         "file path")
    try:
        opened = Image.open(source)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{name} is too large to decode ({exc}); downscale it first") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to identify the file is the same user problem
        raise _decode_error(name, exc, path) from None
    with opened:
        try:
            width, height = opened.size
            if width < 1 or height < 1:
                raise ValueError(f"image is empty ({width}x{height})")
            orientation = _orientation(opened) if opened.format in ("JPEG", "MPO") else None
            swap = orientation in (5, 6, 7, 8)
            th, tw = _target_size(*((width, height) if swap else (height, width)), short_side, long_cap)
            opened.draft(None, (th, tw) if swap else (tw, th))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
            decoded = opened.size[0] * opened.size[1]
            if decoded > max_pixels:
                up_w, up_h = (height, width) if swap else (width, height)
                raise _TooLarge(f"{name} is {up_w}×{up_h} pixels ({width * height / 1e6:.3g} megapixels); this "
                                f"server decodes at most {max_pixels / 1e6:.3g} megapixels: downscale the image "
                                "first")
            opened.load()
            return _reduce_pil(opened, short_side, long_cap, orientation, (width, height))
        except _TooLarge as exc:
            raise ValueError(str(exc)) from None
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated or damaged data: say so, never a traceback
            raise _decode_error(name, exc, path) from None


class _TooLarge(Exception):
    """Internal: the pixel budget refusal, kept apart from decoding failures."""
