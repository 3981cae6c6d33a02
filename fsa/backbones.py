"""CLIP backbone loading: names, weights (HF cache / hub / local file), the tiny test model.

Devices, dtypes, progress and hub files come from :mod:`fsa.hub`; the cache that holds loaded models is
:class:`fsa.cache.ModelCache`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Optional

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from .config import BACKBONES, TINY_TEST
from .hub import (
    TEST_MODEL_ALIASES, DeviceLike, Progress, WeightsUnavailableError, alias_key, fetch_hub_file, model_dtype,
    report_progress, resolve_device, tiny_test_hint,
)

@dataclass(frozen=True)
class _Spec:
    name: str  #: canonical name (config.BACKBONES or TINY_TEST)
    arch: str  #: open_clip architecture
    tag: str  #: open_clip pretrained tag ("" for the test model)


# OpenAI weights were trained with QuickGELU: the "-quickgelu" configs, never plain "ViT-B-16".
_SPECS = MappingProxyType({
    "ViT-B-16": _Spec("ViT-B-16", "ViT-B-16-quickgelu", "openai"),
    "ViT-L-14": _Spec("ViT-L-14", "ViT-L-14-quickgelu", "openai"),
    "ViT-H-14": _Spec("ViT-H-14", "ViT-H-14", "laion2b_s32b_b79k"),
    TINY_TEST: _Spec(TINY_TEST, "", ""),
})
assert set(BACKBONES) | {TINY_TEST} == set(_SPECS)


_ALIASES = MappingProxyType({alias_key(n): n for n in _SPECS} | {a: TINY_TEST for a in TEST_MODEL_ALIASES})


def resolve_backbone_name(name: Optional[str]) -> str:
    """Canonical backbone name; None/"" -> ``$FSA_MODEL`` or "ViT-B-16". Unknown -> ``ValueError``."""
    raw = name or os.environ.get("FSA_MODEL") or "ViT-B-16"
    canonical = _ALIASES.get(alias_key(raw))
    if canonical is None:
        raise ValueError(f"unknown backbone {raw!r}; choose one of {', '.join((*BACKBONES, TINY_TEST))}")
    return canonical


# --------------------------------------------------------------------------- CLIP
@dataclass
class LoadedClip:
    """An eval-mode, frozen open_clip CLIP with what the pipeline needs to use it."""

    model: open_clip.CLIP
    tokenizer: Callable[[list[str]], torch.Tensor]  #: list of K strings -> (K, context_length) int64
    name: str  #: canonical backbone name
    is_test_model: bool  #: random weights (tiny-test): outputs are meaningless
    device: torch.device
    dtype: torch.dtype  #: fp16 on CUDA, fp32 on CPU
    mean: tuple[float, float, float]  #: RGB normalisation of the pixels in [0, 1]
    std: tuple[float, float, float]
    patch_size: int
    key: str  #: unique per (name, weights, device, dtype): cache key for models and text features


#: Residual blocks of the tiny test model's vision tower.
TINY_TEST_VISION_LAYERS = 4


def vision_depth(name: Optional[str] = None) -> int:
    """Residual blocks of the backbone's vision tower (12 for ViT-B-16), from its architecture's
    open_clip config: nothing is built or downloaded. ``name``: see :func:`resolve_backbone_name`."""
    spec = _SPECS[resolve_backbone_name(name)]
    if spec.name == TINY_TEST:
        return TINY_TEST_VISION_LAYERS
    return int(open_clip.get_model_config(spec.arch)["vision_cfg"]["layers"])


def tiny_test_clip(seed: int = 0) -> open_clip.CLIP:
    """A small random ``open_clip.CLIP`` (ViT patch 16, 4x64; text 2x64 with the real BPE vocab).

    The global RNG is left untouched (``fork_rng``). open_clip's own init gives non-degenerate
    features. Returned in train mode, fp32, on CPU: :func:`load_clip` freezes it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.CLIP(
            embed_dim=32,
            vision_cfg=CLIPVisionCfg(image_size=224, patch_size=16, width=64, layers=TINY_TEST_VISION_LAYERS,
                                     head_width=16),
            text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=2),
        )


def _checkpoint_path(checkpoint: Optional[str]) -> Optional[str]:
    """``checkpoint`` or ``$FSA_CHECKPOINT``, absolute; a missing file is a ``FileNotFoundError``."""
    raw = checkpoint or os.environ.get("FSA_CHECKPOINT") or None
    if raw is None:
        return None
    path = Path(raw).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {raw} (check --checkpoint / FSA_CHECKPOINT)")
    return str(path)


def clip_cache_key(name: Optional[str] = None, checkpoint: Optional[str] = None, device: DeviceLike = None) -> str:
    """The ``LoadedClip.key`` that ``load_clip`` with these arguments produces (resolves env defaults)."""
    spec = _SPECS[resolve_backbone_name(name)]
    dev = resolve_device(device)
    weights = _checkpoint_path(checkpoint) or spec.tag or "seed0"
    return f"{spec.name}|{weights}|{dev}|{model_dtype(dev)}".replace("torch.", "")


def _weights_error(path: str, spec_name: str, exc: Exception) -> WeightsUnavailableError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return WeightsUnavailableError(
        f"could not load {path} as {spec_name} weights ({type(exc).__name__}: {first[:300]}); "
        f"pass an open_clip state dict (.safetensors/.bin/.pt) of {spec_name} or choose the matching backbone"
    )


def load_clip(
    name: Optional[str] = None,
    *,
    checkpoint: Optional[str] = None,
    device: DeviceLike = None,
    progress: Optional[Progress] = None,
) -> LoadedClip:
    """Build a CLIP backbone with its weights.

    ``name``: see :func:`resolve_backbone_name`. ``checkpoint`` (or ``$FSA_CHECKPOINT``): a local
    state-dict file for that architecture instead of the hub weights. Fails fast offline with
    :class:`WeightsUnavailableError`.
    """
    spec = _SPECS[resolve_backbone_name(name)]
    path = _checkpoint_path(checkpoint)
    dev = resolve_device(device)
    dtype = model_dtype(dev)
    key = clip_cache_key(spec.name, path, dev)
    report_progress(progress, 0.0, f"Loading {spec.name}")

    if spec.name == TINY_TEST:
        model = tiny_test_clip()
        if path is not None:
            try:
                open_clip.load_checkpoint(model, path)
            except Exception as exc:  # noqa: BLE001 - pickle/safetensors/shape errors alike
                raise _weights_error(path, spec.name, exc) from exc
        tokenizer = open_clip.get_tokenizer("ViT-B-16")  # bundled BPE vocab, no download
        mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    else:
        cfg = open_clip.get_pretrained_cfg(spec.arch, spec.tag)
        if path is None:
            # 'org/repo/' (trailing slash) = default file name; open_clip prefers safetensors.
            repo_id, filename = cfg["hf_hub"].rstrip("/"), "open_clip_model.safetensors"
            path = fetch_hub_file(
                repo_id,
                (filename, "open_clip_pytorch_model.bin"),
                what=f"{spec.name} CLIP",
                alternatives="or pass a local checkpoint with --checkpoint PATH / FSA_CHECKPOINT, " + tiny_test_hint(),
                progress=progress,
            )
        report_progress(progress, 0.6, f"Building {spec.name}")
        try:  # a file path as `pretrained`: open_clip loads it strictly into the architecture
            model = open_clip.create_model(spec.arch, pretrained=path)
        except Exception as exc:  # noqa: BLE001 - pickle/safetensors/shape errors alike
            raise _weights_error(path, spec.name, exc) from exc
        tokenizer = open_clip.get_tokenizer(spec.arch)
        mean, std = cfg.get("mean", OPENAI_DATASET_MEAN), cfg.get("std", OPENAI_DATASET_STD)

    model = model.to(device=dev, dtype=dtype).eval().requires_grad_(False)
    report_progress(progress, 1.0, f"{spec.name} ready")
    return LoadedClip(
        model=model,
        tokenizer=tokenizer,
        name=spec.name,
        is_test_model=spec.name == TINY_TEST,
        device=dev,
        dtype=dtype,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        patch_size=int(model.visual.patch_size[0]),
        key=key,
    )
