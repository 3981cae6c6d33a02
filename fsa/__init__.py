"""fsa: Feedback Self-adaptive Attention (ICCV 2025) on training-free CLIP segmentation baselines."""
from .config import (
    BACKBONES, METHOD_DEFAULTS, METHOD_LABELS, METHODS, PROXIES, TINY_TEST, FeedbackConfig, GClipConfig,
    MethodDefaults, MethodOptions, SegmentSettings, default_lambda,
)
from .logits import compute_patch_logits, patch_logits

__all__ = [
    "BACKBONES", "METHODS", "METHOD_DEFAULTS", "METHOD_LABELS", "PROXIES", "TINY_TEST", "FeedbackConfig",
    "GClipConfig", "MethodDefaults", "MethodOptions", "SegmentSettings", "default_lambda",
    "compute_patch_logits", "patch_logits",
]
