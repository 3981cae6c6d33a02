"""Pixel constants of the proxy tests, written out independently of `fsa` (the references must not share
its constants): ImageNet's and OpenAI CLIP's mean/std, and ImageNet normalisation of RGB in [0, 1]."""
from __future__ import annotations

import torch

CPU = torch.device("cpu")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def channels(values, dtype=torch.float64) -> torch.Tensor:
    """(3,) values → (1, 3, 1, 1), to broadcast over (B, 3, H, W)."""
    return torch.tensor(values, dtype=dtype).view(1, 3, 1, 1)


def imagenet(rgb01: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] → ImageNet-normalised, in rgb01's dtype."""
    return (rgb01 - channels(IMAGENET_MEAN, rgb01.dtype)) / channels(IMAGENET_STD, rgb01.dtype)
