"""Evaluation harness: the published mIoU protocol of training-free CLIP segmentation (mmseg 1.x), without mmseg.

    import fsa
    result = fsa.evaluate("voc21", "~/data", method="proxyclip")   # baseline and + FSA, one pass
    result.baseline.miou, result.fsa.miou
"""
from .datasets import BENCHMARKS, Benchmark, DatasetError, get_benchmark
from .metrics import Scores, area_stats, scores
from .presets import BENCHMARK_ORDER, Preset, published_preset
from .runner import EvalConfig, EvaluationResult, Evaluator, evaluate, resolve_presets

__all__ = [
    "BENCHMARKS", "BENCHMARK_ORDER", "Benchmark", "DatasetError", "EvalConfig", "EvaluationResult", "Evaluator",
    "Preset", "Scores", "area_stats", "evaluate", "get_benchmark", "published_preset", "resolve_presets", "scores",
]
