"""High-level segmentation: image + vocabulary string → label map, confidence, diagnostics."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .backbones import LoadedClip, resolve_backbone_name
from .cache import ModelCache
from .hub import WeightsUnavailableError, resolve_device
from .config import TINY_TEST, SegmentSettings
from .diagnostics import DiagnosticsStore, PatchExplanation
from .images import limit_size, resize_rgb, to_rgb_uint8, working_size
from .inference import (Decision, WindowCosines, WindowGeometry, WindowJob, clip_pixels, decide, resolve_pad_multiple,
                        window_geometry, window_passes)
from .proxies import proxy_for_backbone
from .sliding import Window
from .text import TextFeatureCache
from .vocabulary import parse_vocabulary

Progress = Callable[[float, str], None]


@dataclass
class SegmentationResult:
    """One segmentation. Pixel arrays refer to `image` (the input, downscaled only if huge)."""

    labels: np.ndarray  #: (H, W) int64 index into class_names
    confidence: np.ndarray  #: (H, W) float32, the probability of the chosen class (before the threshold)
    class_names: list[str]
    image: np.ndarray  #: (H, W, 3) uint8
    method: str
    fsa_enabled: bool
    backbone: str
    is_test_model: bool
    grid: tuple[int, int]  #: attention grid of one window (the proxy grid for proxyclip)
    clip_grid: tuple[int, int]  #: CLIP patch grid of one window
    working_size: tuple[int, int]  #: (H', W') the network saw
    windows: list[Window]  #: in pixels of `image`
    timings: dict[str, float] = field(default_factory=dict)  #: seconds
    notes: list[str] = field(default_factory=list)
    diagnostics: Optional[DiagnosticsStore] = field(default=None, repr=False)

    def explain(self, x: float, y: float) -> PatchExplanation:
        """Attention rows of the patch under (x, y), in pixels of `image` (docs/method.md §5)."""
        if self.diagnostics is None:
            raise ValueError("no diagnostics in this result: run with FSA on and keep_diagnostics=True")
        h, w = self.labels.shape
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"point ({x:.0f}, {y:.0f}) is outside the {w}×{h} image")
        return self.diagnostics.explain(x, y)

    def class_shares(self) -> dict[str, float]:
        """Fraction of pixels per class name."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.class_names))
        return {name: float(c) / self.labels.size for name, c in zip(self.class_names, counts)}


@dataclass
class ComparisonResult:
    """Baseline and baseline + FSA from the same forward pass (fsa None: settings without FSA, only in
    `Segmenter.compare_methods`)."""

    baseline: SegmentationResult
    fsa: Optional[SegmentationResult]


class Segmenter:
    """CLIP + a training-free baseline (+ FSA), with its models and text features cached.

    >>> seg = Segmenter()                       # ViT-B/16, or $FSA_MODEL
    >>> res = seg.segment("cat.jpg", "cat; kitten, sofa, background")
    >>> res.labels, res.class_names, res.explain(120, 80)
    """

    def __init__(self, backbone: Optional[str] = None, *, checkpoint: Optional[str] = None, device=None,
                 proxy: str = "dino-b8", cache: Optional[ModelCache] = None,
                 text_cache: Optional[TextFeatureCache] = None):
        self.backbone_name = resolve_backbone_name(backbone)
        self.checkpoint = checkpoint
        self.device = resolve_device(device)
        self.proxy_name = proxy_for_backbone(proxy, self.backbone_name)  # tiny-test: the proxy's random stand-in
        self.cache = cache if cache is not None else ModelCache()
        self.text_cache = text_cache if text_cache is not None else TextFeatureCache()

        self._given: Optional[LoadedClip] = None
        self._given_proxy = None

    @classmethod
    def from_model(cls, model, *, name: str = "custom", device=None, tokenizer=None,
                   proxy: str = TINY_TEST, proxy_model=None) -> "Segmenter":
        """A segmenter over an open_clip CLIP already in memory (e.g. random weights for benchmarks).

        Pixels are normalised with OpenAI CLIP's mean and std; `tokenizer` defaults to open_clip's;
        `proxy_model`: a `fsa.proxies.ProxyModel` already in memory for ProxyCLIP (else `proxy` is loaded).
        """
        import open_clip

        param = next(model.parameters())
        seg = cls(TINY_TEST, device=device or param.device, proxy=proxy)
        seg.backbone_name = name
        seg.proxy_name = proxy
        seg._given = LoadedClip(
            model=model.eval().requires_grad_(False), tokenizer=tokenizer or open_clip.get_tokenizer("ViT-B-16"),
            name=name, is_test_model=True, device=param.device, dtype=param.dtype,
            mean=tuple(open_clip.OPENAI_DATASET_MEAN), std=tuple(open_clip.OPENAI_DATASET_STD),
            patch_size=int(model.visual.conv1.kernel_size[0]), key=f"given|{name}|{id(model)}|{param.dtype}",
        )
        seg._given_proxy = proxy_model
        return seg

    @property
    def is_test_model(self) -> bool:
        return self._given.is_test_model if self._given is not None else self.backbone_name == TINY_TEST

    def load(self, progress: Optional[Progress] = None) -> LoadedClip:
        """Load (or fetch from the cache) the CLIP model; raises WeightsUnavailableError offline."""
        if self._given is not None:
            return self._given
        return self.cache.get_clip(self.backbone_name, checkpoint=self.checkpoint, device=self.device,
                                   progress=progress)

    def segment(self, image, vocabulary: str, settings: SegmentSettings = SegmentSettings(),
                progress: Optional[Progress] = None) -> SegmentationResult:
        """Segment `image` (path, PIL image or array) into the classes of `vocabulary`."""
        results = self._run(image, vocabulary, settings, progress, want_baseline=settings.feedback is None)
        return results[0]

    def compare(self, image, vocabulary: str, settings: SegmentSettings = SegmentSettings(),
                progress: Optional[Progress] = None) -> ComparisonResult:
        """Baseline and baseline + FSA in one forward pass (settings.feedback must be set)."""
        if settings.feedback is None:
            raise ValueError("compare needs FSA settings (settings.feedback is None)")
        baseline, fsa = self._run(image, vocabulary, settings, progress, want_baseline=True)
        return ComparisonResult(baseline, fsa)

    def compare_methods(self, image, vocabulary: str, settings_list: Sequence[SegmentSettings],
                        progress: Optional[Progress] = None) -> list["MethodOutcome"]:
        """Several settings (e.g. every baseline, with or without FSA) on one image, sharing the work they have
        in common; one `MethodOutcome` per settings, in their order (see `iter_compare_methods`)."""
        outcomes = sorted(self.iter_compare_methods(image, vocabulary, settings_list, progress), key=lambda o: o.index)
        return outcomes

    def iter_compare_methods(self, image, vocabulary: str, settings_list: Sequence[SegmentSettings],
                             progress: Optional[Progress] = None) -> Iterator["MethodOutcome"]:
        """Each settings' baseline (and, with settings.feedback, baseline + FSA), yielded as soon as it exists.

        Settings whose windows lie on the same resized image in the same places are one group: each batch
        of their windows runs the vision tower's blocks 1..L-1 once for all of them (once per distinct
        weights: GCLIP from its first changed block) and only the last block per method
        (`fsa.inference.window_passes`). Every result equals, bit for bit, `compare` (or `segment` without
        FSA) of its settings alone. The image, the vocabulary's text features and each resized image are
        prepared once. A settings whose proxy model cannot be loaded (WeightsUnavailableError) gets an
        outcome with that error and the others go on. Only one group's canvases are alive at a time.
        """
        report = progress or (lambda fraction, message: None)
        settings_list = list(settings_list)
        prep = self._prepare(image, vocabulary, report)
        plans: list[_Plan] = []
        for index, settings in enumerate(settings_list):
            try:
                plans.append(self._plan(prep, index, settings, progress))
            except WeightsUnavailableError as exc:
                yield MethodOutcome(index, settings, None, exc)
        groups: dict[tuple, list[_Plan]] = {}
        for plan in plans:
            groups.setdefault(plan.group_key, []).append(plan)
        done = 0
        for members in groups.values():
            span = (0.2 + 0.7 * done / max(1, len(plans)), 0.2 + 0.7 * (done + len(members)) / max(1, len(plans)))
            for outcome in self._run_group(prep, members, report, span):
                yield outcome
            done += len(members)
        report(1.0, "done")

    # -- the pipeline -------------------------------------------------------------------------
    def _proxy(self, progress: Optional[Progress]):
        if self._given_proxy is not None:
            return self._given_proxy
        return self.cache.get_proxy(self.proxy_name, device=self.device, progress=progress)

    def _run(self, image, vocabulary: str, settings: SegmentSettings, progress: Optional[Progress],
             want_baseline: bool) -> list[SegmentationResult]:
        report = progress or (lambda fraction, message: None)
        prep = self._prepare(image, vocabulary, report, settings)
        plan = self._plan(prep, 0, settings, progress)
        (outcome,) = self._run_group(prep, [plan], report, (0.2, 0.9))
        report(1.0, "done")
        pair = outcome.result
        return ([pair.baseline] if want_baseline else []) + ([pair.fsa] if pair.fsa is not None else [])

    def _prepare(self, image, vocabulary: str, report: Progress, settings: Optional[SegmentSettings] = None) -> "_Prep":
        """The image, the vocabulary, the CLIP model (and, for one proxyclip settings, its proxy) and the text."""
        t_start = time.perf_counter()
        rgb = to_rgb_uint8(image)
        rgb, notes = limit_size(rgb)
        vocab = parse_vocabulary(vocabulary)

        report(0.0, f"loading {self.backbone_name}")
        t0 = time.perf_counter()
        clip = self.load(report)
        if settings is not None and settings.method == "proxyclip":
            self._proxy(report)
        timings = {"load": time.perf_counter() - t0}

        report(0.1, f"encoding {len(vocab.queries)} text queries")
        t0 = time.perf_counter()
        text = self.text_cache.encode(clip, vocab.queries, progress=lambda f, message: report(0.1 + 0.1 * f, message))
        timings["text"] = time.perf_counter() - t0
        return _Prep(rgb, notes, vocab, clip, text, timings, t_start, {})

    def _plan(self, prep: "_Prep", index: int, settings: SegmentSettings, progress: Optional[Progress]) -> "_Plan":
        """Where one settings' windows lie (its group) and its proxy; raises WeightsUnavailableError for a
        proxy that cannot be loaded."""
        t0 = time.perf_counter()
        proxy = None
        if settings.method == "proxyclip":
            proxy = self._proxy(progress)
        load = time.perf_counter() - t0
        height, width = prep.rgb.shape[:2]
        clip = prep.clip
        size = working_size(height, width, settings.resolved_short_side(), min_side=clip.patch_size)
        geometry = window_geometry(*size, crop=settings.resolved_crop(), stride=settings.resolved_stride(),
                                   pad_multiple=resolve_pad_multiple(settings.defaults.pad_to, clip.patch_size),
                                   with_proxy=proxy is not None)
        keep = settings.keep_diagnostics and settings.feedback is not None
        job = WindowJob(settings.method, {} if settings.feedback is None else {"fsa": settings.feedback},
                        settings.options, keep)
        return _Plan(index, settings, job, proxy, size, geometry, (size, geometry, settings.window_batch), load)

    def _run_group(self, prep: "_Prep", plans: list["_Plan"], report: Progress,
                   span: tuple[float, float]) -> Iterator["MethodOutcome"]:
        """The window passes of plans that share their windows (one trunk per batch), then each one's decision."""
        first = plans[0]
        t0 = time.perf_counter()
        pixels = prep.pixels.get(first.size)
        if pixels is None:
            clip = prep.clip
            pixels = clip_pixels(resize_rgb(prep.rgb, first.size), clip.mean, clip.std, device=self.device,
                                 dtype=clip.dtype)
            prep.pixels[first.size] = pixels
        proxy = next((plan.proxy for plan in plans if plan.proxy is not None), None)
        passes = window_passes(prep.clip.model, pixels, prep.text, [plan.job for plan in plans], first.geometry,
                               proxy=proxy, window_batch=first.settings.window_batch, progress=report,
                               progress_span=span)
        windows_time = time.perf_counter() - t0
        for plan, maps in zip(plans, passes):
            cosines = maps.cosines()
            results = self._decide(prep, plan, cosines, windows_time, report, span[1] + 0.02)
            yield MethodOutcome(plan.index, plan.settings, ComparisonResult(*results))
            del cosines, results

    def _decide(self, prep: "_Prep", plan: "_Plan", cosines: WindowCosines, windows_time: float,
                report: Progress, fraction: float) -> tuple[SegmentationResult, Optional[SegmentationResult]]:
        settings, rgb, vocab = plan.settings, prep.rgb, prep.vocab
        timings = {**prep.timings, "load": prep.timings["load"] + plan.load, "windows": windows_time}
        report(fraction, "probabilities at the original size")
        t0 = time.perf_counter()
        height, width = rgb.shape[:2]
        names = list(vocab.class_names)
        threshold = settings.prob_threshold
        background = vocab.background_index
        if threshold > 0 and background is None:
            names.append("background")  # an implicit label with no text query
            background = len(names) - 1
        decision = Decision(vocab, settings.resolved_logit_scale(), background=background, prob_threshold=threshold,
                            area_threshold=settings.area_threshold)
        decided = {key: decide(cos, (height, width), decision) for key, cos in cosines.maps.items()}
        timings["postprocess"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - prep.t_start

        wh, ww = plan.size
        sy, sx = wh / height, ww / width
        notes = prep.notes
        common = dict(class_names=names, image=rgb, method=settings.method, backbone=self.backbone_name,
                      is_test_model=self.is_test_model, grid=cosines.grid, clip_grid=cosines.clip_grid,
                      working_size=(wh, ww), windows=[w.scaled(1.0 / sy, 1.0 / sx) for w in cosines.windows],
                      timings=timings, notes=notes)
        labels, confidence = decided["baseline"]
        baseline = SegmentationResult(labels=labels, confidence=confidence, fsa_enabled=False,
                                      **{**common, "timings": dict(timings), "notes": list(notes)})
        fsa = None
        if settings.feedback is not None:
            labels, confidence = decided["fsa"]
            # the attention grid of a padded window covers the padding too: locate and draw on that extent
            grid_extents = [w.padded(pad) for w, pad in zip(cosines.windows, cosines.pads)]
            keep = plan.job.keep_details
            store = DiagnosticsStore(grid_extents, cosines.details, (sy, sx), vocab) if keep else None
            fsa = SegmentationResult(labels=labels, confidence=confidence, fsa_enabled=True,
                                     diagnostics=store, **{**common, "notes": list(notes)})
        return baseline, fsa


@dataclass
class MethodOutcome:
    """One settings of `Segmenter.compare_methods`: its results, or why there are none."""

    index: int  #: position in the settings list
    settings: SegmentSettings
    result: Optional[ComparisonResult]  #: baseline and (with settings.feedback) baseline + FSA
    error: Optional[Exception] = None  #: a WeightsUnavailableError of the settings' proxy model


@dataclass
class _Prep:
    rgb: np.ndarray
    notes: list[str]
    vocab: object
    clip: LoadedClip
    text: object
    timings: dict[str, float]
    t_start: float
    pixels: dict  #: working size → CLIP pixels, made once


@dataclass
class _Plan:
    index: int
    settings: SegmentSettings
    job: WindowJob
    proxy: object
    size: tuple[int, int]
    geometry: WindowGeometry
    group_key: tuple
    load: float  #: seconds loading its proxy
