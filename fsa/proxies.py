"""Proxy vision models for ProxyCLIP (method.md §2): dense patch features from a timm ViT.

``dino-b8`` (DINO ViT-B/8, the ProxyCLIP default) and ``dinov2-b14-reg`` come from the HF hub
through timm; ``tiny-test`` is a seeded random small ViT for tests and for the tiny CLIP.

The features are those of the published models that ProxyCLIP and FSA run (``torch.hub`` DINO and
DINOv2), not timm's defaults where the two differ: see :func:`dino_position_table` for the
positional table of the DINO proxies, and :meth:`ProxyModel.features_from_clip_pixels` for the
published input chain.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Optional

import timm
from timm.data import resolve_data_config
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from timm.models.vision_transformer import VisionTransformer

from .hub import (
    DeviceLike,
    Progress,
    WeightsUnavailableError,
    report_progress,
    model_dtype,
    fetch_hub_file,
    resolve_device,
    tiny_test_hint,
)
from .config import PROXIES, TINY_TEST

#: proxy name -> timm model name (None: built in code).
_TIMM_NAMES = MappingProxyType({
    "dino-b8": "vit_base_patch8_224.dino",
    "dinov2-b14-reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    TINY_TEST: None,
})
assert set(PROXIES) | {TINY_TEST} == set(_TIMM_NAMES)

#: Proxies whose positional table follows the published DINO rule (:func:`dino_position_table`).
#: ``tiny-test`` stands in for DINO ViT-B/8 (patch 8, a CLS token, no registers), so it follows it too.
#: ``dinov2-b14-reg`` keeps timm's ``dynamic_img_size`` resampling, which is already the published
#: DINOv2 rule (see :class:`ProxyModel`).
_DINO_POSITION_PROXIES = frozenset({"dino-b8", TINY_TEST})


@dataclass(frozen=True)
class ProxySpec:
    """What a proxy's attention over a window costs, known without loading the proxy.

    ``grid``/``tokens`` take the window as the proxy receives it (ProxyCLIP pads each window to a multiple
    of 56 first, :func:`fsa.inference.centred_padding`); ``crop`` is the sliding-window crop (0 or None for
    one window over the whole image), which these proxies do not need.
    """

    name: str
    patch_size: int
    heads: int  #: attention heads of the proxy's blocks
    prefix_tokens: int  #: tokens besides the patches in the forward (CLS, registers)

    def grid(self, height: int, width: int, crop: Optional[int] = None) -> tuple[int, int]:
        """(rows, cols) of the proxy features of one ``height × width`` window: ProxyCLIP's attention grid
        (trailing pixels that fill no patch are dropped)."""
        return int(height) // self.patch_size, int(width) // self.patch_size

    def tokens(self, height: int, width: int, crop: Optional[int] = None) -> int:
        """The longest token sequence one attention sees for this window (patches and prefix tokens)."""
        rows, cols = self.grid(height, width, crop)
        return rows * cols + self.prefix_tokens


#: Each proxy's geometry: timm's vit_base_patch8_224.dino (ViT-B/8), vit_base_patch14_reg4_dinov2 (ViT-B/14
#: with 4 registers), and :func:`tiny_test_proxy`.
_SPECS = MappingProxyType({
    "dino-b8": ProxySpec("dino-b8", patch_size=8, heads=12, prefix_tokens=1),
    "dinov2-b14-reg": ProxySpec("dinov2-b14-reg", patch_size=14, heads=12, prefix_tokens=5),
    TINY_TEST: ProxySpec(TINY_TEST, patch_size=8, heads=2, prefix_tokens=1),
})
assert set(_SPECS) == set(_TIMM_NAMES)


def proxy_spec(name: Optional[str]) -> ProxySpec:
    """Patch size, heads and prefix tokens of proxy `name` (see :func:`resolve_proxy_name`), nothing loaded."""
    return _SPECS[resolve_proxy_name(name)]


def resolve_proxy_name(name: Optional[str]) -> str:
    """Canonical proxy name (case-insensitive; None/"" -> "dino-b8"); unknown -> ``ValueError``."""
    raw = (name or "dino-b8").strip()
    for known in _TIMM_NAMES:
        if raw.lower() == known.lower():
            return known
    raise ValueError(f"unknown proxy model {raw!r}; choose one of {', '.join((*PROXIES, TINY_TEST))}")


def proxy_cache_key(name: Optional[str] = None, device: DeviceLike = None) -> str:
    """Unique key of the proxy :func:`load_proxy` returns for these arguments."""
    dev = resolve_device(device)
    weights = os.environ.get("FSA_PROXY_CHECKPOINT") or "hub"
    return f"{resolve_proxy_name(name)}|{weights}|{dev}|{model_dtype(dev)}".replace("torch.", "")


def _channels(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-channel constants as a (1, 3, 1, 1) tensor."""
    return torch.tensor(tuple(values), dtype=dtype, device=device).view(1, 3, 1, 1)


def dino_position_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Published DINO's positional embedding for a ``rows × cols`` patch grid.

    table: (1, 1 + S·S, C), the CLS row first, then the stored S×S patch table (row-major);
    grid: (rows, cols). Returns (1, 1 + rows·cols, C) in ``table``'s dtype.

    The rule of facebookresearch/dino ``vision_transformer.py`` (``interpolate_pos_encoding``, the
    model ``torch.hub.load('facebookresearch/dino:main', 'dino_vitb8')`` builds and ProxyCLIP/FSA run):
    at the stored grid (224×224 input for ViT-B/8) the table as stored; otherwise the S×S patch table
    resampled by ``F.interpolate`` with bicubic interpolation, no antialiasing, ``align_corners=False``,
    given as ``scale_factor=((rows + 0.1) / S, (cols + 0.1) / S)`` (rows first; the factor, not only
    the output size, sets where the output samples the table) and computed in the table's dtype
    (fp16 on CUDA). The CLS row is unchanged. timm's ``dynamic_img_size`` resampling (exact output
    size, antialiased, in float32) gives other values at every other grid.
    """
    rows, cols = int(grid[0]), int(grid[1])
    if table.ndim != 3 or table.shape[0] != 1:
        raise ValueError(f"expected a (1, 1 + S*S, C) positional table, got shape {tuple(table.shape)}")
    side = math.isqrt(table.shape[1] - 1)
    if side * side != table.shape[1] - 1:
        raise ValueError(f"positional table has {table.shape[1] - 1} patch rows, not a square grid")
    if rows < 1 or cols < 1:
        raise ValueError(f"patch grid must be positive, got {rows}x{cols}")
    if (rows, cols) == (side, side):
        return table
    dim = table.shape[-1]
    patch_table = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resampled = F.interpolate(
        patch_table, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic", align_corners=False
    )
    if resampled.shape[-2:] != (rows, cols):  # the +0.1 is there so that floor() gives the grid
        raise RuntimeError(f"DINO positional resampling gave {tuple(resampled.shape[-2:])}, not {rows}x{cols}")
    return torch.cat([table[:, :1], resampled.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1)


class ProxyModel:
    """A frozen timm ViT that maps images to its last layer's normalised patch tokens.

    The tokens are those after the final norm with the prefix (CLS/register) tokens dropped, i.e.
    the published ProxyCLIP's ``get_intermediate_layers(x)[0][:, 1:]`` (DINO) and
    ``get_intermediate_layers(x, reshape=True)[0]`` (DINOv2).

    Positional table:
    - DINO proxies (``dino-b8``, ``tiny-test``): timm's model is only the container; its
      ``dynamic_img_size`` resampling is replaced by the published DINO rule
      (:func:`dino_position_table`) in :meth:`_tokens`.
    - ``dinov2-b14-reg``: timm's own ``forward_features``. Published DINOv2 with registers
      (facebookresearch/dinov2 ``dinov2_vitb14_reg``: ``interpolate_antialias=True``,
      ``interpolate_offset=0.0``) resamples with ``F.interpolate(size=(rows, cols), mode="bicubic",
      antialias=True)`` in float32, cast back to the tokens' dtype, table as stored at its own grid;
      timm's ``resample_abs_pos_embed`` does exactly that, and timm's checkpoint conversion folds the
      CLS position into the CLS token (registers get no position in both), so no change is needed.
    """

    def __init__(self, name: str, model: VisionTransformer, *, device: torch.device, is_test_model: bool) -> None:
        self.name = name
        self.model = model
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.is_test_model = is_test_model
        self.patch_size: int = int(model.patch_embed.patch_size[0])
        self.uses_dino_positions: bool = name in _DINO_POSITION_PROXIES
        if not getattr(model, "dynamic_img_size", False):
            raise ValueError(f"proxy {name!r}: build the timm model with dynamic_img_size=True")
        if self.uses_dino_positions and (
            model.cls_token is None or model.reg_token is not None or model.no_embed_class or model.pos_embed is None
        ):
            raise ValueError(f"proxy {name!r} needs DINO's token layout (a CLS token with a position, no registers)")
        cfg = resolve_data_config({}, model=model)  # the proxy's own mean/std (ImageNet's for DINO and DINOv2)
        self.mean_rgb: tuple[float, ...] = tuple(float(v) for v in cfg["mean"])
        self.std_rgb: tuple[float, ...] = tuple(float(v) for v in cfg["std"])
        self.mean = _channels(self.mean_rgb, torch.float32, device)
        self.std = _channels(self.std_rgb, torch.float32, device)

    def __repr__(self) -> str:
        return f"ProxyModel({self.name!r}, patch_size={self.patch_size}, device={self.device}, dtype={self.dtype})"

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) proxy-normalised input in the model's dtype -> (B, prefix + rows·cols, C) tokens."""
        if not self.uses_dino_positions:
            return self.model.forward_features(x)
        m = self.model
        patches = m.patch_embed(x)  # (B, rows, cols, C): dynamic_img_size gives NHWC
        b, rows, cols, dim = patches.shape
        tokens = torch.cat([m.cls_token.expand(b, -1, -1), patches.reshape(b, rows * cols, dim)], dim=1)
        tokens = m.pos_drop(tokens + dino_position_table(m.pos_embed, (rows, cols)))
        # the rest of timm's forward_features, unchanged (identities at inference but for blocks/norm)
        return m.norm(m.blocks(m.norm_pre(m.patch_drop(tokens))))

    @torch.no_grad()
    def encode(self, normalised: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) input normalised with the proxy's own mean/std, H and W multiples of the patch
        -> (B, C, H / patch, W / patch) patch features in the model's dtype (the input is cast to it).
        """
        if normalised.ndim != 4 or normalised.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) image batch, got shape {tuple(normalised.shape)}")
        b, _, h, w = normalised.shape
        if h < self.patch_size or w < self.patch_size or h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image {h}x{w} is not a whole number of {self.patch_size}-pixel proxy patches; "
                "crop or pad it to multiples of the patch size"
            )
        tokens = self._tokens(normalised.to(self.device, self.dtype))  # (B, prefix + gh*gw, C)
        patches = tokens[:, self.model.num_prefix_tokens:, :]
        return patches.transpose(1, 2).reshape(b, patches.shape[-1], h // self.patch_size, w // self.patch_size)

    @torch.no_grad()
    def features_from_clip_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) CLIP-normalised pixels -> (B, C, H / patch, W / patch) features, model dtype.

        The published ProxyCLIP chain (mc-lan/ProxyCLIP ``proxyclip_segmentor.py``,
        ``forward_feature``): the CLIP input (0-255 RGB normalised with
        :data:`fsa.images.CLIP_PIXEL_MEAN_255` / ``CLIP_PIXEL_STD_255``) is un-normalised with
        open_clip's OpenAI mean/std (``x * std + mean``), normalised with the proxy's own (ImageNet)
        mean/std (``(x - mean) / std``), both in float32 (wider if ``pixels`` is wider), then cast to
        the proxy model's dtype. H and W must be multiples of the proxy patch; zero padding in
        CLIP-normalised space is kept as it is (it becomes OpenAI's mean colour, as published).
        No cast to float32 at the end.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) pixel batch, got shape {tuple(pixels.shape)}")
        work = torch.promote_types(pixels.dtype, torch.float32)

        def channels(values) -> torch.Tensor:
            return _channels(values, work, self.device)

        rgb01 = pixels.to(self.device, work) * channels(OPENAI_DATASET_STD) + channels(OPENAI_DATASET_MEAN)
        return self.encode((rgb01 - channels(self.mean_rgb)) / channels(self.std_rgb))

    @torch.no_grad()
    def features(self, rgb01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, C, H // patch, W // patch) float32 patch features.

        ``(rgb01 - mean) / std`` with the proxy's own mean/std in float32, then :meth:`encode`. Any
        H, W >= patch (non-square included); trailing rows/columns that do not fill a patch are dropped.
        """
        if rgb01.ndim != 4 or rgb01.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) image batch, got shape {tuple(rgb01.shape)}")
        h, w = rgb01.shape[-2:]
        gh, gw = h // self.patch_size, w // self.patch_size
        if gh < 1 or gw < 1:
            raise ValueError(f"image {h}x{w} is smaller than one {self.patch_size}-pixel proxy patch")
        x = rgb01[:, :, : gh * self.patch_size, : gw * self.patch_size]  # whole patches only
        return self.encode((x.to(self.device, torch.float32) - self.mean) / self.std).float()


def tiny_test_proxy(seed: int = 0) -> VisionTransformer:
    """Seeded random ViT (patch 8, width 32, depth 2, 2 heads, CLS token); global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer(
            img_size=224, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True
        )


def load_proxy(
    name: str = "dino-b8",
    *,
    device: DeviceLike = None,
    progress: Optional[Progress] = None,
) -> ProxyModel:
    """Load a proxy model (inference only; fp16 on CUDA).

    Weights: ``$FSA_PROXY_CHECKPOINT`` (a local timm state dict for that architecture) if set,
    else the HF cache / hub (fails fast offline with ``WeightsUnavailableError``).
    """
    canonical = resolve_proxy_name(name)
    dev = resolve_device(device)
    report_progress(progress, 0.0, f"Loading proxy {canonical}")
    timm_name = _TIMM_NAMES[canonical]
    if timm_name is None:
        model = tiny_test_proxy()
    else:
        path = os.environ.get("FSA_PROXY_CHECKPOINT")
        if path:
            if not Path(path).expanduser().is_file():
                raise FileNotFoundError(f"proxy checkpoint not found: {path} (check FSA_PROXY_CHECKPOINT)")
            path = str(Path(path).expanduser())
        else:
            repo_id = timm.models.get_pretrained_cfg(timm_name).hf_hub_id
            path = fetch_hub_file(
                repo_id,
                ("model.safetensors", "pytorch_model.bin"),  # what timm itself looks for
                what=f"proxy {canonical}",
                alternatives="or set FSA_PROXY_CHECKPOINT to a local file, or pick a method other than "
                "ProxyCLIP, " + tiny_test_hint(),
                progress=progress,
            )
        report_progress(progress, 0.6, f"Building proxy {canonical}")
        try:
            model = timm.create_model(
                timm_name, pretrained=True, pretrained_cfg_overlay={"file": path}, dynamic_img_size=True, num_classes=0
            )
        except Exception as exc:  # noqa: BLE001 - corrupt or mismatched file
            raise WeightsUnavailableError(
                f"could not load {path} as proxy {canonical} ({timm_name}) weights "
                f"({type(exc).__name__}: {str(exc)[:300]}); delete the file to re-download it or pass the right one"
            ) from exc
    model = model.to(device=dev, dtype=model_dtype(dev)).eval().requires_grad_(False)
    report_progress(progress, 1.0, f"Proxy {canonical} ready")
    return ProxyModel(canonical, model, device=dev, is_test_model=timm_name is None)
