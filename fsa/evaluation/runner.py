"""Evaluate a method with and without FSA on a benchmark: the published mmseg protocol in plain PyTorch.

Per image (batch 1, no test-time augmentation): OpenCV decode → the shared inference pipeline
(`fsa.inference`: resize, windows, decision) with the benchmark's published preset → per-class areas
against the label (never resized) → summed over the split → mIoU / aAcc / mAcc (`metrics`).
Baseline and FSA come from the same forward pass whenever their window settings agree. An ablation
sweep (`EvalConfig.sweep`, see `sweep`) scores a grid of FSA settings the same way: one encoder pass
per window for the baseline and every setting, the FSA preset's decision for every setting.
"""
from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..backbones import vision_depth
from ..config import METHOD_DEFAULTS, FeedbackConfig, MethodOptions, check_method, default_lambda
from ..images import resize_rgb, working_size
from ..inference import Decision, clip_pixels, decide, resolve_pad_multiple, window_cosines
from ..vocabulary import Vocabulary
from . import datasets
from .distributed import DistContext
from .metrics import Scores, area_stats, scores
from .presets import BENCHMARK_ORDER, Preset, published_preset, with_overrides
from .records import RecordStore, stats_from_json, stats_to_json, write_json_atomic
from .sweep import SweepPoint, normalize_sweep, sweep_grid

#: Called after each image of this process: (images done, images to do, image id).
ImageCallback = Callable[[int, int, str], None]
PROTOCOLS = ("published", "ours")


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation: a method (with FSA unless `fsa` is False) on one benchmark."""

    benchmark: str
    data_root: Path
    method: str = "proxyclip"
    backbone: Optional[str] = None  #: None: $FSA_MODEL or ViT-B-16
    checkpoint: Optional[str] = None
    proxy: str = "dino-b8"  #: ProxyCLIP's proxy model (fsa.PROXIES); FSA's λ defaults to 4.5 with MAE
    device: Optional[str] = None
    fsa: bool = True
    lam: Optional[float] = None  #: None: the paper's λ for the backbone
    p: float = 0.45
    protocol: str = "published"  #: "published": each method's released config; "ours": fsa.METHOD_DEFAULTS
    short_side: Optional[int] = None  #: overrides of the preset (None = keep)
    crop: Optional[int] = None
    stride: Optional[int] = None
    logit_scale: Optional[float] = None
    prob_thd: Optional[float] = None
    names_file: Optional[Path] = None
    limit: Optional[int] = None  #: the first N images of the split
    output: Optional[Path] = None  #: per-image records (for --resume), settings, results
    resume: bool = False
    save_predictions: Optional[Path] = None
    skip_bad: bool = False
    #: PAMR (10 iterations, dilations 8 and 16) on the cosines at the original size, as NACLIP's
    #: published numbers with PAMR use it; the guide is the network's input resized to that size
    pamr: bool = False
    window_batch: int = 4
    #: ablation axes ((name, values), ...), e.g. (("lam", (1, 5)), ("p", (0.3, 0.45))): the grid of their
    #: Cartesian product replaces the single FSA setting (fsa.evaluation.sweep); () = no sweep
    sweep: tuple = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", check_method(self.method))
        object.__setattr__(self, "data_root", Path(self.data_root).expanduser())
        from ..proxies import resolve_proxy_name  # a clear error for an unknown proxy, before any work

        object.__setattr__(self, "proxy", resolve_proxy_name(self.proxy))
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be at least 1")
        if self.resume and self.output is None:
            raise ValueError("resume needs an output folder (--output) holding the earlier run's records")
        datasets.get_benchmark(self.benchmark)  # a clear error for an unknown name
        if self.sweep:
            if not self.fsa:
                raise ValueError("a sweep varies FSA's settings and needs FSA on; drop fsa=False (--no-fsa)")
            object.__setattr__(self, "sweep", normalize_sweep(self.sweep))


@dataclass
class EvaluationResult:
    benchmark: str
    method: str
    backbone: str
    images: int  #: images scored
    class_names: list[str]
    settings: dict
    baseline: Scores
    fsa: Optional[Scores]
    skipped: list[tuple[str, str]] = field(default_factory=list)  #: (image id, reason)
    seconds: float = 0.0
    #: with a sweep (then `fsa` is None): key → scores of each FSA setting, in grid order
    sweep: dict[str, Scores] = field(default_factory=dict)
    sweep_settings: dict[str, dict] = field(default_factory=dict)  #: key → {axis: value} of the setting
    beyond_paper: tuple[str, ...] = ()  #: keys of settings that are not the paper's method
    proxy: Optional[str] = None  #: ProxyCLIP's proxy model (None for the other methods)

    def to_json(self) -> dict:
        out = {"benchmark": self.benchmark, "method": self.method, "backbone": self.backbone, "images": self.images,
               **({"proxy": self.proxy} if self.proxy is not None else {}), "settings": self.settings,
               "baseline": self.baseline.as_dict(self.class_names),
               "fsa": None if self.fsa is None else self.fsa.as_dict(self.class_names)}
        if self.sweep:
            out["sweep"] = [
                {"key": key, "setting": self.sweep_settings[key], "beyond_paper": key in self.beyond_paper,
                 "scores": value.as_dict(self.class_names),
                 "mIoU_delta": _rounded_delta(value.miou, self.baseline.miou)}
                for key, value in self.sweep.items()]
        if self.skipped:
            out["skipped"] = [{"id": i, "reason": r} for i, r in self.skipped]
        return out


def _rounded_delta(value: float, base: float) -> Optional[float]:
    diff = value - base
    return None if diff != diff else round(diff, 2)  # NaN → None


def resolve_presets(config: EvalConfig) -> dict[str, Preset]:
    """The window/decision settings of the baseline and of FSA for this evaluation."""
    keys = ["baseline", "fsa"] if config.fsa else ["baseline"]
    out = {}
    for key in keys:
        if config.protocol == "published":
            preset = published_preset(config.method, config.benchmark, fsa=key == "fsa")
        else:
            d = METHOD_DEFAULTS[config.method]
            preset = Preset(d.short_side, d.crop, d.stride, d.logit_scale)
        out[key] = with_overrides(preset, short_side=config.short_side, crop=config.crop, stride=config.stride,
                                  logit_scale=config.logit_scale, prob_thd=config.prob_thd)
    return out


def _geometry(preset: Preset) -> tuple[int, int, int]:
    return preset.short_side, preset.crop, preset.stride


def plan_passes(presets: dict[str, Preset],
                fsa_keys: Sequence[str] = ("fsa",)) -> list[tuple[Preset, list[str]]]:
    """One forward pass per distinct window geometry: FSA's pass (every FSA setting `fsa_keys`) also
    yields the baseline when their windows agree."""
    if "fsa" not in presets or not fsa_keys:
        return [(presets["baseline"], ["baseline"])]
    if _geometry(presets["fsa"]) == _geometry(presets["baseline"]):
        return [(presets["fsa"], ["baseline", *fsa_keys])]
    return [(presets["baseline"], ["baseline"]), (presets["fsa"], list(fsa_keys))]


def plan_decisions(presets: dict[str, Preset], vocab: Vocabulary, bench,
                   fsa_keys: Sequence[str] = ("fsa",)) -> dict[str, Decision]:
    """The decision of each key (FSA's preset for every FSA setting); the probability threshold (→ class 0)
    only on background benchmarks."""
    background = 0 if bench.has_background else None
    decisions = {key: Decision(vocab, p.logit_scale, background=background, prob_threshold=p.prob_thd,
                               area_threshold=p.area_thd) for key, p in presets.items()}
    if "fsa" in decisions:
        decisions.update({key: decisions["fsa"] for key in fsa_keys})
    return decisions


class Evaluator:
    """Runs an `EvalConfig`; models come from a shared `fsa.ModelCache` (pass one to reuse them)."""

    def __init__(self, config: EvalConfig, *, cache=None, text_cache=None, progress: bool = True,
                 on_image: Optional[ImageCallback] = None):
        self.config = config
        self.bench = datasets.get_benchmark(config.benchmark)
        self.cache = cache
        self.text_cache = text_cache
        self.show_progress = progress
        self.on_image = on_image

    # -- settings -------------------------------------------------------------------------------
    def _feedback(self, backbone: str) -> Optional[FeedbackConfig]:
        if not self.config.fsa:
            return None
        proxy = self.config.proxy if self.config.method == "proxyclip" else None
        lam = default_lambda(backbone, proxy) if self.config.lam is None else self.config.lam
        return FeedbackConfig(lam=lam, p=self.config.p)

    def sweep_points(self, backbone: str, *, depth: Optional[int] = None) -> list[SweepPoint]:
        """The settings of the sweep's grid (none without a sweep), based on the run's λ and p.

        With `depth`, each point's blocks are checked against the vision tower and the method.
        """
        if not self.config.sweep:
            return []
        return sweep_grid(self._feedback(backbone), self.config.sweep, depth=depth, method=self.config.method)

    def settings_record(self, backbone: str, presets: dict[str, Preset], names: list[tuple[str, ...]]) -> dict:
        """What decides the numbers (saved with the records; a resume must match it)."""
        c = self.config
        feedback = self._feedback(backbone)
        names_digest = hashlib.sha256("\n".join("; ".join(n) for n in names).encode()).hexdigest()[:16]
        record = {
            "benchmark": c.benchmark, "method": c.method, "backbone": backbone, "protocol": c.protocol,
            "proxy": c.proxy if c.method == "proxyclip" else None, "checkpoint": c.checkpoint,
            "presets": {k: dataclasses.asdict(v) for k, v in presets.items()},
            "feedback": None if feedback is None else dataclasses.asdict(feedback),
            "names": str(c.names_file) if c.names_file else "shipped", "names_sha256": names_digest,
            "pamr": c.pamr,
        }
        if c.sweep:  # every setting of the grid (a run without a sweep keeps its record as it was)
            record["sweep"] = [{"key": point.key, "feedback": dataclasses.asdict(point.feedback)}
                               for point in self.sweep_points(backbone)]
        return record

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> EvaluationResult:
        from ..segmenter import Segmenter  # model loading and text features, shared with the app

        c = self.config
        started = time.perf_counter()
        samples = datasets.list_samples(self.bench, c.data_root)  # layout errors before any model loads
        if c.limit is not None:
            samples = samples[:c.limit]
        names = datasets.class_lines(self.bench, c.names_file)
        vocab = Vocabulary(tuple(tuple(n) for n in names))
        class_names = datasets.class_names(self.bench, c.names_file)
        presets = resolve_presets(c)

        ctx = DistContext.from_env(c.device)
        try:
            segmenter = Segmenter(c.backbone, checkpoint=c.checkpoint, device=ctx.local_device(c.device),
                                  proxy=c.proxy, cache=self.cache, text_cache=self.text_cache)
            # every sweep setting checked against the tower before any model loads
            points = self.sweep_points(segmenter.backbone_name, depth=vision_depth(segmenter.backbone_name))
            settings = self.settings_record(segmenter.backbone_name, presets, names)
            store = None
            if c.output is not None:
                store = RecordStore(Path(c.output), settings, rank=ctx.rank, world=ctx.world, resume=c.resume)
                dropped = store.prepare(is_main=ctx.is_main)
                if dropped and self.show_progress:
                    print(f"starting afresh: the {dropped} image(s) scored earlier in {c.output} are dropped "
                          "(pass --resume to continue them)", file=sys.stderr)
                ctx.barrier()
            done = store.load() if store is not None else {}
            clip = segmenter.load()
            proxy = None
            if c.method == "proxyclip":
                proxy = segmenter.cache.get_proxy(segmenter.proxy_name, device=segmenter.device)
            text = segmenter.text_cache.encode(clip, vocab.queries)
            feedback = self._feedback(segmenter.backbone_name)
            # key → FSA setting scored beside the baseline: one per sweep point, else "fsa" (or none)
            feedbacks = ({point.key: point.feedback for point in points} if points
                         else {} if feedback is None else {"fsa": feedback})

            fsa_keys = list(feedbacks)
            decisions = plan_decisions(presets, vocab, self.bench, fsa_keys=fsa_keys)
            passes = plan_passes(presets, fsa_keys=fsa_keys)

            mine = samples[ctx.rank::ctx.world]
            totals = {k: np.zeros((3, self.bench.num_classes), dtype=np.int64) for k in ["baseline", *fsa_keys]}
            skipped: list[tuple[str, str]] = []
            scored = 0
            bar = self._progress_bar(len(mine), ctx)
            try:
                for count, sample in enumerate(mine, 1):
                    record = done.get(sample.id)
                    if record is None:
                        record = self._score_sample(sample, clip, proxy, text, feedbacks, passes, decisions, c)
                        if store is not None:
                            store.append(record)
                    if "skipped" in record:
                        skipped.append((sample.id, record["skipped"]))
                    else:
                        for key in totals:
                            totals[key] += stats_from_json(record[key], self.bench.num_classes)
                        scored += 1
                    if bar is not None:
                        bar.update(1)
                    if self.on_image is not None:
                        self.on_image(count, len(mine), sample.id)
            finally:
                if bar is not None:
                    bar.close()
                if store is not None:
                    store.close()

            totals = {k: ctx.sum(v) for k, v in totals.items()}
            scored = int(ctx.sum(np.array([scored]))[0])
            skipped = [item for part in ctx.gather(skipped) for item in part]
            if scored == 0:
                raise datasets.DatasetError(f"no image of {c.benchmark} could be scored"
                                            + (f" ({len(skipped)} skipped)" if skipped else ""))
            depth = len(clip.model.visual.transformer.resblocks)
            result = EvaluationResult(
                benchmark=c.benchmark, method=c.method, backbone=segmenter.backbone_name, images=scored,
                class_names=class_names, settings=settings, baseline=scores(totals["baseline"]),
                fsa=scores(totals["fsa"]) if "fsa" in totals else None, skipped=sorted(skipped),
                seconds=time.perf_counter() - started,
                sweep={point.key: scores(totals[point.key]) for point in points},
                sweep_settings={point.key: point.setting() for point in points},
                beyond_paper=tuple(point.key for point in points if point.beyond_paper(depth)),
                proxy=segmenter.proxy_name if c.method == "proxyclip" else None)
            if ctx.is_main and c.output is not None:
                write_json_atomic(Path(c.output) / "result.json", result.to_json())
            return result
        finally:
            ctx.close()

    def _score_sample(self, sample, clip, proxy, text, feedbacks, passes, decisions, c: EvalConfig) -> dict:
        """The record of one image: per-class areas for each key, or why it was skipped."""
        try:
            rgb = datasets.read_image(sample.image)
            label = datasets.read_label(sample.label, self.bench, image_shape=rgb.shape[:2])
        except datasets.DatasetError as exc:
            if not c.skip_bad:
                raise
            return {"id": sample.id, "skipped": str(exc)}
        predictions = self.predict(rgb, clip, proxy, text, feedbacks, passes, decisions)
        if c.save_predictions is not None:
            for key, pred in predictions.items():
                _save_label_png(Path(c.save_predictions) / key / f"{sample.id}.png", pred)
        record = {"id": sample.id}
        for key, pred in predictions.items():
            record[key] = stats_to_json(area_stats(pred, label, self.bench.num_classes))
        return record

    def predict(self, rgb: np.ndarray, clip, proxy, text,
                feedbacks: Union[None, FeedbackConfig, Mapping[str, FeedbackConfig]], passes,
                decisions) -> dict[str, np.ndarray]:
        """Label maps (H, W) of one image for each key of `passes`, in the benchmark's label space.

        feedbacks: key → FSA setting (a single FeedbackConfig is the key "fsa"); each pass runs the
        settings of its keys with one encoder pass per window.
        """
        c = self.config
        if feedbacks is None or isinstance(feedbacks, FeedbackConfig):
            feedbacks = {} if feedbacks is None else {"fsa": feedbacks}
        height, width = rgb.shape[:2]
        out: dict[str, np.ndarray] = {}
        for preset, keys in passes:
            wh, ww = working_size(height, width, preset.short_side, min_side=clip.patch_size)
            pixels = clip_pixels(resize_rgb(rgb, (wh, ww)), clip.mean, clip.std, device=clip.device, dtype=clip.dtype)
            cosines = window_cosines(
                clip.model, pixels, text, c.method, feedbacks={k: feedbacks[k] for k in keys if k in feedbacks},
                options=MethodOptions(), crop=preset.crop, stride=preset.stride,
                pad_multiple=resolve_pad_multiple(METHOD_DEFAULTS[c.method].pad_to, clip.patch_size), proxy=proxy,
                window_batch=c.window_batch)
            for key in keys:
                cos = cosines.maps[key]
                if c.pamr:
                    cos = _pamr_refined(cos, pixels, (height, width))
                labels, _ = decide(cos, (height, width), decisions[key])
                out[key] = labels.astype(np.uint8)
        return out

    def _progress_bar(self, total: int, ctx: DistContext):
        if not self.show_progress or not ctx.is_main:
            return None
        from tqdm.auto import tqdm

        label = f"{self.config.benchmark} {self.config.method}" + (" + FSA" if self.config.fsa else "")
        if self.config.sweep:
            label += " sweep"
        if ctx.world > 1:
            label += f" (rank 0 of {ctx.world})"
        return tqdm(total=total, desc=label, unit="img", file=sys.stderr, dynamic_ncols=True)


def _pamr_refined(cos, pixels, size: tuple[int, int]):
    """NACLIP's PAMR step: cosines and the CLIP-normalised input, both resized bilinearly to the original
    size, the cosines refined by the image's local affinities. (Q, a, b) → (Q, H, W)."""
    import torch.nn.functional as F

    from ..pamr import pamr

    full = F.interpolate(cos[None].float(), size=size, mode="bilinear", align_corners=False)
    guide = F.interpolate(pixels.float(), size=size, mode="bilinear", align_corners=False)
    return pamr(guide, full, iterations=10, dilations=(8, 16))[0]


def _save_label_png(path: Path, labels: np.ndarray) -> None:
    """Single-channel PNG of labels, written through a temporary name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), mode="L").save(tmp)
    tmp.replace(path)


def evaluate(benchmark: str, data_root, method: str = "proxyclip", **kwargs) -> EvaluationResult:
    """Evaluate `method` (and `method` + FSA unless fsa=False) on `benchmark`; see `EvalConfig` for options.

    >>> res = fsa.evaluate("voc21", "~/data", method="clearclip", limit=50)
    >>> res.baseline.miou, res.fsa.miou
    """
    progress = kwargs.pop("progress", True)
    on_image = kwargs.pop("on_image", None)
    cache = kwargs.pop("cache", None)
    return Evaluator(EvalConfig(benchmark, data_root, method, **kwargs), cache=cache, progress=progress,
                     on_image=on_image).run()


__all__ = ["BENCHMARK_ORDER", "EvalConfig", "EvaluationResult", "Evaluator", "evaluate", "resolve_presets"]
