"""`python -m fsa bench --eval`: images per second of the evaluation protocol, and each benchmark's full time.

The real architectures (CLIP ViT-B/16, DINO ViT-B/8 for ProxyCLIP) with random weights have the real
cost; the text features are random unit vectors, one per name of the benchmark's class file. Each
benchmark is timed on a random image of its typical size with the method's published preset.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import datasets
from .presets import BENCHMARK_ORDER
from .runner import EvalConfig, Evaluator, plan_decisions, plan_passes, resolve_presets

#: (height, width) of a typical validation image: VOC/Context 500×375, COCO 640×480, Cityscapes
#: 2048×1024, ADE20K's most common 683×512.
TYPICAL_SIZE = {"voc21": (375, 500), "voc20": (375, 500), "context60": (375, 500), "context59": (375, 500),
                "coco_object": (480, 640), "coco_stuff": (480, 640), "cityscapes": (1024, 2048),
                "ade20k": (512, 683)}


def random_proxy(device: torch.device, dtype: torch.dtype):
    """DINO ViT-B/8 of the real architecture with random weights, as a ProxyModel."""
    import timm

    from ..proxies import ProxyModel

    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch8_224.dino", pretrained=False, dynamic_img_size=True, num_classes=0)
    vit = vit.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ProxyModel("dino-b8", vit, device=device, is_test_model=True)


def measure(clip, method: str, benchmarks=BENCHMARK_ORDER, *, repeats: int = 1, proxy=None, size_scale: float = 1.0):
    """Rows (benchmark, image size, names, passes, seconds per image, images, projected seconds)."""
    rows = []
    for name in benchmarks:
        bench = datasets.get_benchmark(name)
        lines = datasets.class_lines(bench)
        from ..vocabulary import Vocabulary

        vocab = Vocabulary(tuple(lines))
        config = EvalConfig(name, ".", method)
        presets = resolve_presets(config)
        evaluator = Evaluator(config, progress=False)
        text = F.normalize(torch.randn(len(vocab.queries), clip.model.visual.output_dim, device=clip.device), dim=-1)
        text = text.to(clip.dtype)
        feedback = evaluator._feedback("ViT-B-16")
        passes, decisions = plan_passes(presets), plan_decisions(presets, vocab, bench)
        h, w = (max(32, int(side * size_scale)) for side in TYPICAL_SIZE[name])
        rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)

        def once():
            evaluator.predict(rgb, clip, proxy, text, feedback, passes, decisions)
            if clip.device.type == "cuda":
                torch.cuda.synchronize(clip.device)

        once()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        rows.append((name, f"{w}×{h}", len(vocab.queries), len(passes), seconds, bench.num_samples,
                     seconds * bench.num_samples))
    return rows


def format_rows(rows, method: str) -> str:
    lines = [f"| {method} + FSA | image | names | passes | s / image | images / s | images | projected |",
             "|---|---|---|---|---|---|---|---|"]
    for name, size, names, passes, seconds, count, total in rows:
        lines.append(f"| {name} | {size} | {names} | {passes} | {seconds:.2f} | {1 / seconds:.2f} | {count} | "
                     f"{_hours(total)} |")
    return "\n".join(lines)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"
