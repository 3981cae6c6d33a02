"""Proxy vision models for ProxyCLIP (docs/method.md §2): dense patch features of a frozen ViT.

The four proxies of the published FSA code (``FSA_Proxy_segmentor.py``, ``vfm_model``): ``dino-b8``
(DINO ViT-B/8, the ProxyCLIP default), ``dinov2-b14-reg``, ``mae-b16`` and ``sam-b16``, from the HF
hub through timm or a local file (``FSA_PROXY_CHECKPOINT``; for MAE and SAM also their original
release files). ``tiny-test`` and ``tiny-test-{dinov2,mae,sam}`` are seeded random stand-ins of each
family for tests and the tiny CLIP (:data:`fsa.config.TINY_PROXIES`).

The features are those of the published models that ProxyCLIP and FSA run, not timm's defaults
where the two differ: see :class:`ProxyModel`. :func:`proxy_spec` tells, without loading anything,
what a proxy's grid, token count and heads are for a window (memory budgets, UI).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Optional

import timm
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_sam import VisionTransformerSAM
from torch import nn

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
from .config import PROXIES, PROXY_LABELS, TINY_PROXIES, TINY_TEST
from .proxy_models import (
    SAM_HEADS_AT_ONCE,
    SAM_INPUT_SIDE,
    TIMM_NAMES,
    build_proxy_model,
    dino_position_table,
    load_proxy_state,
    mae_position_table,
    sam_features,
)


@dataclass(frozen=True)
class ProxySpec:
    """What a proxy is, without loading it: family, geometry, weights' origin.

    ``grid``/``tokens`` take the window as the proxy receives it: ProxyCLIP pads each window to a
    multiple of 56 first (:func:`fsa.inference.centred_padding`), and ``crop`` is the sliding-window
    crop (0 or None for one window over the whole image).
    """

    name: str
    label: str  #: e.g. "SAM ViT-B/16"
    family: str  #: "dino", "dinov2", "mae" or "sam" (fsa.proxy_models.FAMILIES)
    patch_size: int
    heads: int  #: attention heads of the proxy's blocks
    channels: int  #: feature channels C of the (B, C, rows, cols) output
    prefix_tokens: int  #: tokens besides the patches in the forward (CLS, registers)
    is_test_model: bool  #: a random stand-in (tiny-test)
    original_file: Optional[str] = None  #: the release file people of the published code have

    @property
    def timm_name(self) -> Optional[str]:
        return None if self.is_test_model else TIMM_NAMES[self.family]

    @property
    def hub_repo(self) -> Optional[str]:
        """The HF hub repo of the weights (``timm/<timm name>``), None for a stand-in."""
        return None if self.is_test_model else f"timm/{self.timm_name}"

    @property
    def squashes_window(self) -> bool:
        """MAE and SAM resize every window to a square (the published code), whatever its shape."""
        return self.family in ("mae", "sam")

    def input_side(self, height: int, width: int, crop: Optional[int] = None) -> Optional[int]:
        """Side of the square the window is resized to (MAE: the crop, else the window's longer
        side; SAM: 1024), None for DINO/DINOv2, which see the window as it is."""
        if self.family == "sam":
            return SAM_INPUT_SIDE
        if self.family == "mae":
            return int(crop) if crop else max(int(height), int(width))
        return None

    def grid(self, height: int, width: int, crop: Optional[int] = None) -> tuple[int, int]:
        """(rows, cols) of the proxy features of one ``height × width`` window, i.e. ProxyCLIP's
        attention grid: N = rows·cols (4096 for SAM, square for MAE and SAM)."""
        side = self.input_side(height, width, crop)
        if side is not None:
            return side // self.patch_size, side // self.patch_size
        return int(height) // self.patch_size, int(width) // self.patch_size

    def tokens(self, height: int, width: int, crop: Optional[int] = None) -> int:
        """The longest token sequence one attention sees for this window: the proxy's own global
        attention (patches + CLS/registers) or ProxyCLIP's N×N attention over its grid."""
        rows, cols = self.grid(height, width, crop)
        return rows * cols + self.prefix_tokens

    def attention(self, height: int, width: int, crop: Optional[int] = None) -> tuple[int, int]:
        """(matrices, tokens) of the proxy's own forward at its largest: how many tokens × tokens attention
        matrices one window builds at once. SAM: its global blocks over the 64×64 grid, run
        ``SAM_HEADS_AT_ONCE`` heads at a time (:func:`fsa.proxy_models.sam_features`); the windowed blocks
        are far smaller (14×14 windows). The others: every head over the patches and prefix tokens."""
        if self.family == "sam":
            rows, cols = self.grid(height, width, crop)
            return min(self.heads, SAM_HEADS_AT_ONCE), rows * cols
        return self.heads, self.tokens(height, width, crop)


def _spec(name: str, family: str, patch: int, *, test: bool, original: Optional[str] = None) -> ProxySpec:
    width, heads = (32, 2) if test else (768, 12)
    channels = (32 if test else 256) if family == "sam" else width
    prefix = {"dino": 1, "dinov2": 5, "mae": 1, "sam": 0}[family]
    return ProxySpec(name, PROXY_LABELS[name], family, patch, heads, channels, prefix, test, original)


_SPECS = MappingProxyType({
    "dino-b8": _spec("dino-b8", "dino", 8, test=False),
    "dinov2-b14-reg": _spec("dinov2-b14-reg", "dinov2", 14, test=False),
    "mae-b16": _spec("mae-b16", "mae", 16, test=False, original="mae_pretrain_vit_base.pth"),
    "sam-b16": _spec("sam-b16", "sam", 16, test=False, original="sam_vit_b_01ec64.pth"),
    TINY_PROXIES["dino-b8"]: _spec(TINY_TEST, "dino", 8, test=True),
    TINY_PROXIES["dinov2-b14-reg"]: _spec(TINY_PROXIES["dinov2-b14-reg"], "dinov2", 14, test=True),
    TINY_PROXIES["mae-b16"]: _spec(TINY_PROXIES["mae-b16"], "mae", 16, test=True),
    TINY_PROXIES["sam-b16"]: _spec(TINY_PROXIES["sam-b16"], "sam", 16, test=True),
})
assert set(_SPECS) == set(PROXIES) | set(TINY_PROXIES.values())


#: The published code's ``vfm_model`` names.
_ALIASES = MappingProxyType({"dino": "dino-b8", "dinov2": "dinov2-b14-reg", "mae": "mae-b16", "sam": "sam-b16"})


def resolve_proxy_name(name: Optional[str]) -> str:
    """Canonical proxy name (case-insensitive; the published ``vfm_model`` names dino, dinov2, mae and
    sam too; None/"" -> "dino-b8"); unknown -> ``ValueError``."""
    raw = (name or "dino-b8").strip()
    for known in _SPECS:
        if raw.lower() == known.lower():
            return known
    if raw.lower() in _ALIASES:
        return _ALIASES[raw.lower()]
    raise ValueError(f"unknown proxy model {raw!r}; choose one of {', '.join((*PROXIES, TINY_TEST))}")


def proxy_spec(name: Optional[str]) -> ProxySpec:
    """The :class:`ProxySpec` of a proxy name (see :func:`resolve_proxy_name`)."""
    return _SPECS[resolve_proxy_name(name)]


def proxy_for_backbone(name: Optional[str], backbone: str) -> str:
    """The proxy that runs with ``backbone``: ``name`` resolved, or its random stand-in with tiny-test."""
    canonical = resolve_proxy_name(name)
    return TINY_PROXIES.get(canonical, canonical) if backbone == TINY_TEST else canonical


def proxy_cache_key(name: Optional[str] = None, device: DeviceLike = None) -> str:
    """Unique key of the proxy :func:`load_proxy` returns for these arguments."""
    dev = resolve_device(device)
    weights = os.environ.get("FSA_PROXY_CHECKPOINT") or "hub"
    return f"{resolve_proxy_name(name)}|{weights}|{dev}|{model_dtype(dev)}".replace("torch.", "")


def _channels(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-channel constants as a (1, 3, 1, 1) tensor."""
    return torch.tensor(tuple(values), dtype=dtype, device=device).view(1, 3, 1, 1)


class ProxyModel:
    """A frozen proxy ViT that maps images to the published ProxyCLIP/FSA proxy features.

    - DINO (``dino-b8``, ``tiny-test``): the final-norm patch tokens (CLS dropped), as published
      ``get_intermediate_layers(x)[0][:, 1:]``. timm's model is only the container: its
      ``dynamic_img_size`` resampling of the positional table is replaced by the published DINO rule
      (:func:`dino_position_table`).
    - DINOv2 with registers: timm's own ``forward_features``. Published DINOv2 with registers
      (``dinov2_vitb14_reg``: ``interpolate_antialias=True``, ``interpolate_offset=0.0``) resamples
      with ``F.interpolate(size=(rows, cols), mode="bicubic", antialias=True)`` in float32, cast back,
      table as stored at its own grid; timm's ``resample_abs_pos_embed`` does exactly that, and
      timm's conversion folds the CLS position into the CLS token (registers get none in both).
    - MAE (FSA's ``mae/models_vit.py``): the window resized bilinearly (``align_corners=False``) to
      ``side × side`` whatever its shape (side = the sliding-window crop, ``slide_crop``), then
      ``norm(x)[:, 1:]`` on a square (side/16)² grid, the positional table resampled from the stored
      14×14 by MAE's rule (:func:`mae_position_table`), from the table as loaded (float32), once per side.
    - SAM: the window resized bilinearly to 1024 × 1024 whatever its shape, features the image
      encoder's neck output (B, 256, 64, 64); nothing resampled.
    Resizes run in the model's dtype, as the published code (which casts to fp16 first).
    """

    def __init__(self, name: str, model: nn.Module, *, device: torch.device, is_test_model: bool,
                 position_table: Optional[torch.Tensor] = None) -> None:
        """position_table (MAE): the stored (1, 1 + S², C) table before any cast of the model; default
        the model's own, at least float32."""
        self.spec = proxy_spec(name)
        self.name = self.spec.name
        self.family = self.spec.family
        self.model = model
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.is_test_model = is_test_model
        self.patch_size: int = int(model.patch_embed.patch_size[0])
        self.uses_dino_positions: bool = self.family == "dino"
        if self.family == "sam":
            if not isinstance(model, VisionTransformerSAM):
                raise ValueError(f"proxy {name!r} needs timm's VisionTransformerSAM (SAM's image encoder)")
            self.sam_side = int(model.patch_embed.img_size[0])
        else:
            if not isinstance(model, VisionTransformer) or not getattr(model, "dynamic_img_size", False):
                raise ValueError(f"proxy {name!r}: build the timm model with dynamic_img_size=True")
            if self.family in ("dino", "mae") and (
                model.cls_token is None or model.reg_token is not None or model.no_embed_class
                or model.pos_embed is None
            ):
                raise ValueError(f"proxy {name!r} needs DINO's token layout (a CLS token with a position, "
                                 "no registers)")
        if self.family == "mae":
            table = model.pos_embed.detach() if position_table is None else position_table.detach()
            self._stored_table = table.to(device, torch.promote_types(table.dtype, torch.float32))
            self._tables: dict[int, torch.Tensor] = {}  # grid side -> resampled table in the model's dtype
            self._tables_lock = threading.Lock()
        # Every proxy of the published code is fed ImageNet-normalised input (its transforms.Normalize).
        self.mean_rgb: tuple[float, ...] = tuple(float(v) for v in IMAGENET_DEFAULT_MEAN)
        self.std_rgb: tuple[float, ...] = tuple(float(v) for v in IMAGENET_DEFAULT_STD)
        self.mean = _channels(self.mean_rgb, torch.float32, device)
        self.std = _channels(self.std_rgb, torch.float32, device)

    def __repr__(self) -> str:
        return f"ProxyModel({self.name!r}, patch_size={self.patch_size}, device={self.device}, dtype={self.dtype})"

    def input_side(self, height: int, width: int, crop: Optional[int] = None) -> Optional[int]:
        """Side of the square MAE/SAM resize a ``height × width`` window to (None: no resize)."""
        if self.family == "sam":
            return self.sam_side
        return self.spec.input_side(height, width, crop)

    def grid(self, height: int, width: int, crop: Optional[int] = None) -> tuple[int, int]:
        """(rows, cols) of the features of a ``height × width`` window (see :class:`ProxySpec`)."""
        side = self.input_side(height, width, crop)
        if side is not None:
            return side // self.patch_size, side // self.patch_size
        return height // self.patch_size, width // self.patch_size

    def _mae_table(self, side: int) -> torch.Tensor:
        with self._tables_lock:
            if side not in self._tables:
                self._tables[side] = mae_position_table(self._stored_table, side).to(self.dtype)
            return self._tables[side]

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) proxy-normalised input in the model's dtype -> (B, prefix + rows·cols, C) tokens."""
        m = self.model
        if self.family == "dinov2":
            return m.forward_features(x)
        patches = m.patch_embed(x)  # (B, rows, cols, C): dynamic_img_size gives NHWC
        b, rows, cols, dim = patches.shape
        if self.family == "mae":
            table = self._mae_table(rows)  # square by construction
        else:
            table = dino_position_table(m.pos_embed, (rows, cols))
        tokens = torch.cat([m.cls_token.expand(b, -1, -1), patches.reshape(b, rows * cols, dim)], dim=1)
        tokens = m.pos_drop(tokens + table)
        # the rest of timm's forward_features, unchanged (identities at inference but for blocks/norm)
        return m.norm(m.blocks(m.norm_pre(m.patch_drop(tokens))))

    @torch.no_grad()
    def encode(self, normalised: torch.Tensor, crop: Optional[int] = None) -> torch.Tensor:
        """(B, 3, H, W) input normalised with the proxy's mean/std -> (B, C, rows, cols) features in the
        model's dtype (the input is cast to it first).

        DINO/DINOv2: H and W multiples of the patch, (rows, cols) = (H, W) / patch. MAE: any H, W,
        resized to side² (side = ``crop``, else max(H, W)), rows = cols = side // 16. SAM: any H, W,
        resized to 1024², 64 × 64.
        """
        if normalised.ndim != 4 or normalised.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) image batch, got shape {tuple(normalised.shape)}")
        b, _, h, w = normalised.shape
        x = normalised.to(self.device, self.dtype)
        side = self.input_side(h, w, crop)
        if side is not None:
            if side < self.patch_size or h < 1 or w < 1:
                raise ValueError(f"proxy {self.name} needs a side of at least {self.patch_size} pixels, got {side}")
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
            if self.family == "sam":
                return sam_features(self.model, x)  # (B, C, 64, 64): the neck output, a few heads at a time
            whole = side // self.patch_size * self.patch_size  # MAE's patch conv drops a remainder
            x, h, w = x[:, :, :whole, :whole], whole, whole
        elif h < self.patch_size or w < self.patch_size or h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image {h}x{w} is not a whole number of {self.patch_size}-pixel proxy patches; "
                "crop or pad it to multiples of the patch size"
            )
        tokens = self._tokens(x)  # (B, prefix + gh*gw, C)
        patches = tokens[:, self.model.num_prefix_tokens:, :]
        return patches.transpose(1, 2).reshape(b, patches.shape[-1], h // self.patch_size, w // self.patch_size)

    @torch.no_grad()
    def features_from_clip_pixels(self, pixels: torch.Tensor, crop: Optional[int] = None) -> torch.Tensor:
        """(B, 3, H, W) CLIP-normalised pixels -> (B, C, rows, cols) features, model dtype.

        The published ProxyCLIP/FSA chain (``forward_feature``): the CLIP input (0-255 RGB normalised
        with :data:`fsa.images.CLIP_PIXEL_MEAN_255` / ``CLIP_PIXEL_STD_255``) is un-normalised with
        open_clip's OpenAI mean/std (``x * std + mean``), normalised with ImageNet's
        (``(x - mean) / std``), both in float32 (wider if ``pixels`` is wider), then cast to the
        proxy model's dtype and :meth:`encode` d (``crop``: the sliding-window crop, MAE's side).
        DINO/DINOv2 need H and W multiples of the proxy patch; zero padding in CLIP-normalised space
        is kept as it is (it becomes OpenAI's mean colour, as published). No cast at the end.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) pixel batch, got shape {tuple(pixels.shape)}")
        work = torch.promote_types(pixels.dtype, torch.float32)

        def channels(values) -> torch.Tensor:
            return _channels(values, work, self.device)

        rgb01 = pixels.to(self.device, work) * channels(OPENAI_DATASET_STD) + channels(OPENAI_DATASET_MEAN)
        return self.encode((rgb01 - channels(self.mean_rgb)) / channels(self.std_rgb), crop=crop)

    @torch.no_grad()
    def features(self, rgb01: torch.Tensor, crop: Optional[int] = None) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, C, rows, cols) patch features, float32 (float64 when both
        ``rgb01`` and the model are float64).

        ``(rgb01 - mean) / std`` with ImageNet's mean/std in float32 (wider if ``rgb01`` is), then
        :meth:`encode`. Any H, W >= patch (non-square included); DINO/DINOv2 drop trailing
        rows/columns that do not fill a patch; MAE and SAM resize the whole crop (see :meth:`encode`).
        """
        if rgb01.ndim != 4 or rgb01.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) image batch, got shape {tuple(rgb01.shape)}")
        h, w = rgb01.shape[-2:]
        gh, gw = h // self.patch_size, w // self.patch_size
        if gh < 1 or gw < 1:
            raise ValueError(f"image {h}x{w} is smaller than one {self.patch_size}-pixel proxy patch")
        x = rgb01 if self.spec.squashes_window else rgb01[:, :, : gh * self.patch_size, : gw * self.patch_size]
        work = torch.promote_types(rgb01.dtype, torch.float32)
        mean, std = self.mean, self.std
        if work != torch.float32:  # the constants themselves in the wider dtype, not float32 ones widened
            mean, std = _channels(self.mean_rgb, work, self.device), _channels(self.std_rgb, work, self.device)
        x = (x.to(self.device, work) - mean) / std
        wide = rgb01.dtype == torch.float64 and self.dtype == torch.float64  # the float64 door of the goldens
        return self.encode(x, crop=crop).to(torch.float64 if wide else torch.float32)


def tiny_test_proxy(seed: int = 0) -> VisionTransformer:
    """Seeded random ViT (patch 8, width 32, depth 2, 2 heads, CLS token); global RNG untouched."""
    return build_proxy_model("dino", stand_in=True, seed=seed)


def _weights_path(spec: ProxySpec, progress: Optional[Progress]) -> str:
    """``$FSA_PROXY_CHECKPOINT`` or the hub file (cache first; fails fast offline, one line)."""
    path = os.environ.get("FSA_PROXY_CHECKPOINT")
    if path:
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"proxy checkpoint not found: {path} (check FSA_PROXY_CHECKPOINT)")
        return str(Path(path).expanduser())
    local = "a local file" + (f" (timm's file or the original {spec.original_file})" if spec.original_file else "")
    return fetch_hub_file(
        spec.hub_repo,
        ("model.safetensors", "pytorch_model.bin"),  # what timm itself looks for
        what=f"proxy {spec.name}",
        alternatives=f"or set FSA_PROXY_CHECKPOINT to {local}, or pick a method other than ProxyCLIP, "
        + tiny_test_hint(),
        progress=progress,
    )


def load_proxy(
    name: str = "dino-b8",
    *,
    device: DeviceLike = None,
    progress: Optional[Progress] = None,
) -> ProxyModel:
    """Load a proxy model (inference only; fp16 on CUDA).

    Weights: ``$FSA_PROXY_CHECKPOINT`` (a local state dict for that architecture: timm's hub file,
    or for MAE/SAM also ``mae_pretrain_vit_base.pth`` / ``sam_vit_b_01ec64.pth``) if set, else the HF
    cache / hub (fails fast offline with ``WeightsUnavailableError``). A file of another model or with
    missing keys is refused, naming it, before anything is loaded. Stand-ins need no weights.
    """
    spec = proxy_spec(name)
    dev = resolve_device(device)
    report_progress(progress, 0.0, f"Loading proxy {spec.name}")
    table = None
    if spec.is_test_model:
        model = build_proxy_model(spec.family, stand_in=True)
    else:
        path = _weights_path(spec, progress)
        report_progress(progress, 0.6, f"Building proxy {spec.name} ({spec.label})")
        if spec.family in ("mae", "sam"):
            model = build_proxy_model(spec.family, stand_in=False)
            load_proxy_state(model, spec.family, path, what=f"proxy {spec.name} ({spec.label})")
            table = model.pos_embed.detach().clone() if spec.family == "mae" else None  # before the cast
        else:
            try:
                model = timm.create_model(spec.timm_name, pretrained=True, pretrained_cfg_overlay={"file": path},
                                          dynamic_img_size=True, num_classes=0)
            except Exception as exc:  # noqa: BLE001 - corrupt or mismatched file
                raise WeightsUnavailableError(
                    f"could not load {path} as proxy {spec.name} ({spec.timm_name}) weights "
                    f"({type(exc).__name__}: {str(exc)[:300]}); delete the file to re-download it or pass the right one"
                ) from exc
    model = model.to(device=dev, dtype=model_dtype(dev)).eval().requires_grad_(False)
    report_progress(progress, 1.0, f"Proxy {spec.name} ready")
    return ProxyModel(spec.name, model, device=dev, is_test_model=spec.is_test_model, position_table=table)


__all__ = ["ProxyModel", "ProxySpec", "dino_position_table", "load_proxy", "mae_position_table", "proxy_cache_key",
           "proxy_for_backbone", "proxy_spec", "resolve_proxy_name", "tiny_test_proxy"]
