"""fsa: Feedback Self-adaptive Attention (ICCV 2025) on training-free CLIP segmentation baselines.

    import fsa
    result = fsa.Segmenter().segment("cat.jpg", "cat; kitten, sofa, background")
    result.labels, result.class_names, result.explain(120, 80)
"""
from .checks import NumericalError
from .backbones import LoadedClip, load_clip
from .cache import ModelCache
from .hub import WeightsUnavailableError
from .config import (
    BACKBONES, METHOD_DEFAULTS, METHOD_LABELS, METHODS, PROXIES, TINY_TEST, FeedbackConfig, GClipConfig,
    MethodDefaults, MethodOptions, SegmentSettings, default_lambda,
)
from .diagnostics import PatchExplanation
from .evaluation import EvalConfig, EvaluationResult, Evaluator, evaluate
from .logits import compute_patch_logits, patch_logits
from .segmenter import ComparisonResult, SegmentationResult, Segmenter
from .sliding import Window
from .vocabulary import Vocabulary, parse_vocabulary

__all__ = [
    "BACKBONES", "METHODS", "METHOD_DEFAULTS", "METHOD_LABELS", "PROXIES", "TINY_TEST", "ComparisonResult",
    "EvalConfig", "EvaluationResult", "Evaluator", "FeedbackConfig", "GClipConfig", "LoadedClip", "MethodDefaults",
    "MethodOptions", "ModelCache", "NumericalError",
    "PatchExplanation", "SegmentSettings", "SegmentationResult", "Segmenter", "Vocabulary",
    "WeightsUnavailableError", "Window", "compute_patch_logits", "default_lambda", "evaluate", "load_clip",
    "parse_vocabulary", "patch_logits",
]
