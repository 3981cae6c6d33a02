"""Input images: any PIL image / numpy array / file path -> (H, W, 3) uint8 RGB; sizes (method.md §1).

Conversion rules (documented, predictable):
- uint8 as is; uint16 (and PIL's 16/32-bit integer modes) over the full 16-bit range:
  round(v / 65535 * 255), PIL "I" values clipped to [0, 65535] first; bool: False -> 0,
  True -> 255; other integer dtypes must lie in [0, 255]; floats (and PIL mode "F") are in
  [0, 1], clipped, and must be finite.
- Grey is replicated to RGB; alpha is composited over white; CMYK, palette, YCbCr... through PIL.
- PIL images are turned upright with their EXIF orientation.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Union

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


def _from_pil(image: Image.Image) -> np.ndarray:
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
