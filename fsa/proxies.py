"""Proxy vision models for ProxyCLIP (method.md §2): dense patch features from a timm ViT.

``dino-b8`` (DINO ViT-B/8, the ProxyCLIP default) and ``dinov2-b14-reg`` come from the HF hub
through timm; ``tiny-test`` is a seeded random small ViT for tests and for the tiny CLIP.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import Optional

import timm
from timm.data import resolve_data_config
import torch
from timm.models.vision_transformer import VisionTransformer

from .backbones import (
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


class ProxyModel:
    """A frozen timm ViT that maps RGB images to its last layer's normalised patch tokens."""

    def __init__(self, name: str, model: VisionTransformer, *, device: torch.device, is_test_model: bool) -> None:
        self.name = name
        self.model = model
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.is_test_model = is_test_model
        self.patch_size: int = int(model.patch_embed.patch_size[0])
        cfg = resolve_data_config({}, model=model)  # the proxy's own mean/std
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return f"ProxyModel({self.name!r}, patch_size={self.patch_size}, device={self.device}, dtype={self.dtype})"

    @torch.no_grad()
    def features(self, rgb01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, C, H // patch, W // patch) float32 patch features.

        The tokens after timm's final norm (``forward_features``), prefix (CLS/register) tokens
        dropped. Any H, W >= patch (non-square included: the model uses ``dynamic_img_size``);
        trailing rows/columns that do not fill a patch are dropped.
        """
        if rgb01.ndim != 4 or rgb01.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) image batch, got shape {tuple(rgb01.shape)}")
        b, _, h, w = rgb01.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        if gh < 1 or gw < 1:
            raise ValueError(f"image {h}x{w} is smaller than one {self.patch_size}-pixel proxy patch")
        x = rgb01[:, :, : gh * self.patch_size, : gw * self.patch_size]  # timm wants whole patches
        x = (x.to(self.device, torch.float32) - self.mean) / self.std
        tokens = self.model.forward_features(x.to(self.dtype))  # (B, prefix + gh*gw, C)
        patches = tokens[:, self.model.num_prefix_tokens:, :].float()
        return patches.transpose(1, 2).reshape(b, patches.shape[-1], gh, gw)


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
