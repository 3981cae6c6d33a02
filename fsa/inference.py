"""The inference pipeline of the app, the CLI and the evaluation harness: the published protocol.

    image (H, W, 3) uint8
    → resize by f = min(2048 / long side, S / short side) to int(side·f + 0.5), OpenCV bilinear on uint8
    → CLIP pixels (x − mean) / std with the published 0-255 constants, in the model's dtype
    → windows (crop c, stride t; c = 0: the whole image), each padded, centred, to the method's multiple
      (zeros in CLIP-normalised space); a window's patch cosines are upsampled (bilinear) to the padded
      window and cropped back, summed on a canvas and divided by the per-pixel count
    → that canvas (whole image without padding: the patch grid itself, as the published code does)
      resized bilinearly to (H, W), a band of rows at a time
    → P = softmax over all names of τ·cos, max over each class's names, [SCLIP's area rule], argmax,
      [probability threshold → background].

Baseline and baseline + FSA come from the same forward pass of each window; so do several FSA
settings at once (an ablation sweep: `window_cosines(..., feedbacks={key: setting})`), and several
methods whose windows lie in the same places (compare-all: `window_passes` with one `WindowJob` per
method runs blocks 1..L-1 once per window batch for all of them, `fsa.trunk`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PAD_TO_PATCH, FeedbackConfig, MethodOptions
from .checks import check_finite
from .images import pixel_stats_255
from .logits import FeedbackDetails, MethodRun, compute_methods_logits
from .sliding import LogitCanvas, Window, resized_row_bands, window_layout
from .vocabulary import Vocabulary, aggregate_synonyms

Progress = Callable[[float, str], None]
Padding = tuple[int, int, int, int]  #: (left, right, top, bottom) pixels
NO_PADDING: Padding = (0, 0, 0, 0)


def clip_pixels(rgb: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], *, device=None,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """(H, W, 3) uint8 RGB → (1, 3, H, W) CLIP-normalised pixels, normalised in float32, then cast.

    mean/std: the model's statistics on [0, 1]; OpenAI's become the published rounded 0-255 constants.
    """
    mean255, std255 = pixel_stats_255(tuple(mean), tuple(std))
    x = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1)[None].float()
    m = torch.tensor(mean255, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std255, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)


def resolve_pad_multiple(pad_to: Union[int, str], patch_size: int) -> int:
    """The multiple windows are padded to (0 = none) for a `MethodDefaults.pad_to` value."""
    if pad_to == PAD_TO_PATCH:
        return int(patch_size)
    if isinstance(pad_to, str) or int(pad_to) < 0:
        raise ValueError(f"pad_to must be {PAD_TO_PATCH!r} or a number >= 0, got {pad_to!r}")
    return int(pad_to)


def centred_padding(height: int, width: int, multiple: int) -> Padding:
    """Zero padding (left, right, top, bottom) that makes both sides multiples of `multiple`.

    The published rule: the missing pixels split in two, the smaller half on the left / top.
    """
    if multiple <= 1:
        return NO_PADDING
    def split(size: int) -> tuple[int, int]:
        missing = (-size) % multiple
        return missing // 2, missing - missing // 2
    left, right = split(width)
    top, bottom = split(height)
    return left, right, top, bottom


@dataclass
class WindowCosines:
    """Mean patch cosines of one image, baseline and (when FSA ran) baseline + FSA per setting.

    `maps` has "baseline" and one entry per FSA setting ("fsa" for `feedback=`). `maps[key]` is
    (Q, a, b): the canvas on the working image (a, b) = (H', W'), or, for one unpadded window over
    the whole image, the patch grid itself; either is resized to the output size last.
    """

    maps: dict[str, Tensor]
    windows: list[Window]  #: on the working image
    pads: list[Padding]  #: per window
    grid: tuple[int, int]  #: attention grid of one window (the proxy grid for proxyclip)
    clip_grid: tuple[int, int]
    details: list[FeedbackDetails] = field(default_factory=list)  #: per window, when kept


@dataclass(frozen=True)
class WindowJob:
    """One method of `window_passes`: its FSA settings by key (each its own maps entry next to "baseline"),
    options, and whether to keep `FeedbackDetails` per window (one setting at most)."""

    method: str
    feedbacks: Mapping[str, FeedbackConfig] = field(default_factory=dict)
    options: MethodOptions = field(default_factory=MethodOptions)
    keep_details: bool = False

    def __post_init__(self) -> None:
        if "baseline" in self.feedbacks:
            raise ValueError('"baseline" is the key of the baseline\'s maps; name the FSA settings otherwise')
        if self.keep_details and len(self.feedbacks) > 1:
            raise ValueError(f"keep_details needs one FSA setting, got {len(self.feedbacks)}; explain one setting "
                             "at a time")


@dataclass(frozen=True)
class WindowGeometry:
    """Where the windows of one working image lie and how they are padded (what `window_passes` shares)."""

    windows: tuple[Window, ...]
    pad: Padding
    direct: bool  #: one unpadded window over the whole image: its patch grid is the map itself
    crop: int = 0  #: the sliding-window crop (0: one window); MAE squashes each window to crop × crop


def window_geometry(height: int, width: int, *, crop: int, stride: int, pad_multiple: int,
                    with_proxy: bool) -> WindowGeometry:
    """The windows of an (height × width) working image (see the module docstring). The published
    whole-image path runs the image unpadded; a proxy still needs whole proxy patches (with_proxy)."""
    whole = crop <= 0
    windows = window_layout(height, width, crop, stride)
    multiple = pad_multiple if (not whole or with_proxy) else 0
    pad = centred_padding(windows[0].height, windows[0].width, multiple)
    return WindowGeometry(tuple(windows), pad, whole and pad == NO_PADDING, max(int(crop), 0))


@dataclass
class WindowMaps:
    """Patch cosines of every window of one working image, per maps key, before they are averaged."""

    maps: dict[str, list[Tensor]]  #: key → one (Q, h, w) grid map per window
    geometry: WindowGeometry
    size: tuple[int, int]  #: (H', W') of the working image
    grid: tuple[int, int]
    clip_grid: tuple[int, int]
    details: list[FeedbackDetails] = field(default_factory=list)

    def cosines(self) -> WindowCosines:
        """The mean cosines: each key's windows added on a canvas in window order, then divided by the count."""
        geo = self.geometry
        maps: dict[str, Tensor] = {}
        for key, grids in self.maps.items():
            if geo.direct:
                maps[key] = grids[0].float()
                continue
            canvas = LogitCanvas(grids[0].shape[0], *self.size, device=grids[0].device)
            for win, grid_map in zip(geo.windows, grids):
                canvas.add(win, grid_map, padding=geo.pad)
            maps[key] = canvas.take_mean()
        return WindowCosines(maps, list(geo.windows), [geo.pad] * len(geo.windows), self.grid, self.clip_grid,
                             self.details)


@torch.no_grad()
def window_passes(
    model: nn.Module,
    pixels: Tensor,
    text: Tensor,
    jobs: Sequence[WindowJob],
    geometry: WindowGeometry,
    *,
    proxy=None,
    window_batch: int = 4,
    progress: Optional[Progress] = None,
    progress_span: tuple[float, float] = (0.0, 1.0),
) -> list[WindowMaps]:
    """Every job's window cosines on one working image, each batch of windows through one shared trunk
    (`fsa.logits.compute_methods_logits`): job i's maps equal, bit for bit, those of the job run alone.

    pixels: (1, 3, H', W') CLIP-normalised in the model's dtype; text: (Q, E) L2-normalised; proxy: a
    `fsa.proxies.ProxyModel`, its features given to the proxyclip jobs. `progress(fraction, message)` is called
    before each batch of windows, with fractions inside `progress_span`.
    """
    windows, pad = list(geometry.windows), geometry.pad
    outs = [WindowMaps({key: [] for key in ("baseline", *job.feedbacks)}, geometry, tuple(pixels.shape[-2:]),
                       (0, 0), (0, 0)) for job in jobs]
    lo, hi = progress_span
    for start in range(0, len(windows), window_batch):
        chunk = windows[start:start + window_batch]
        if progress is not None:  # e.g. "windows 1-4 of 6", "proxy sam-b16 window 3 of 6": which model runs
            which = f"window {start + 1}" if len(chunk) == 1 else f"windows {start + 1}-{start + len(chunk)}"
            runs_proxy = proxy is not None and any(job.method == "proxyclip" for job in jobs)
            progress(lo + (hi - lo) * start / len(windows),
                     (f"proxy {proxy.name} " if runs_proxy else "") + f"{which} of {len(windows)}")
        crops = torch.cat([pixels[:, :, w.y0:w.y1, w.x0:w.x1] for w in chunk])
        if pad != NO_PADDING:
            crops = F.pad(crops, pad)  # zeros in CLIP-normalised space, as the published code
        proxy_feats = None
        if proxy is not None and any(job.method == "proxyclip" for job in jobs):
            # MAE squashes each window to crop × crop (the published slide_crop); the others ignore it
            proxy_feats = proxy.features_from_clip_pixels(crops, crop=geometry.crop or None)
        runs = [MethodRun(job.method, tuple(job.feedbacks.values()), job.options,
                          proxy_feats if job.method == "proxyclip" else None, job.keep_details) for job in jobs]
        clip_grid = (crops.shape[-2] // _patch_size(model), crops.shape[-1] // _patch_size(model))
        for job, out, got in zip(jobs, outs, compute_methods_logits(model, crops, text, runs)):
            out.grid, out.clip_grid = got.grid, clip_grid
            for key, grid_maps in zip(out.maps, (got.baseline, *got.fsa)):
                out.maps[key].extend(grid_maps[i] for i in range(len(chunk)))
            if got.details:
                out.details.extend(got.details[0].select(i) for i in range(len(chunk)))
    return outs


@torch.no_grad()
def window_cosines(
    model: nn.Module,
    pixels: Tensor,
    text: Tensor,
    method: str,
    *,
    feedback: Optional[FeedbackConfig] = None,
    feedbacks: Optional[Mapping[str, FeedbackConfig]] = None,
    options: MethodOptions,
    crop: int,
    stride: int,
    pad_multiple: int,
    proxy=None,
    window_batch: int = 4,
    keep_details: bool = False,
    progress: Optional[Progress] = None,
    progress_span: tuple[float, float] = (0.0, 1.0),
) -> WindowCosines:
    """Sliding-window cosines of one working image (see the module docstring).

    pixels: (1, 3, H', W') CLIP-normalised in the model's dtype; text: (Q, E) L2-normalised; proxy: a
    `fsa.proxies.ProxyModel` for proxyclip. FSA settings: `feedback` (maps key "fsa") or `feedbacks`
    (key → setting, each its own maps entry; the encoder runs once per window for all of them), not
    both; `keep_details` needs at most one setting. `progress(fraction, message)` is called before
    each batch of windows, with fractions inside `progress_span`.
    """
    job = WindowJob(method, _feedback_settings(feedback, feedbacks), options, keep_details)
    geometry = window_geometry(pixels.shape[-2], pixels.shape[-1], crop=crop, stride=stride,
                               pad_multiple=pad_multiple, with_proxy=proxy is not None)
    return window_passes(model, pixels, text, [job], geometry, proxy=proxy, window_batch=window_batch,
                         progress=progress, progress_span=progress_span)[0].cosines()


def _feedback_settings(feedback: Optional[FeedbackConfig],
                       feedbacks: Optional[Mapping[str, FeedbackConfig]]) -> dict[str, FeedbackConfig]:
    """key → FSA setting of a `window_cosines` call: {"fsa": feedback}, `feedbacks`, or none."""
    if feedback is not None and feedbacks is not None:
        raise ValueError("pass either feedback= (one FSA setting) or feedbacks= (several), not both")
    if feedbacks is None:
        return {} if feedback is None else {"fsa": feedback}
    settings = dict(feedbacks)
    if "baseline" in settings:
        raise ValueError('"baseline" is the key of the baseline\'s maps; name the FSA settings otherwise')
    return settings


def _patch_size(model: nn.Module) -> int:
    return int(model.visual.conv1.kernel_size[0])


@dataclass(frozen=True)
class Decision:
    """How mean cosines become labels (docs/method.md §1 "Decision"; the published postprocessing)."""

    vocabulary: Vocabulary
    logit_scale: float
    #: label given to pixels whose best probability is below `prob_threshold` (None: no threshold)
    background: Optional[int] = None
    prob_threshold: float = 0.0
    #: SCLIP: classes other than `background` whose argmax area is at most this share of the area of
    #: all classes other than `background` get probability 0 before the final argmax
    area_threshold: Optional[float] = None


def decide(cos: Tensor, size: tuple[int, int], decision: Decision) -> tuple[np.ndarray, np.ndarray]:
    """Mean cosines (Q, a, b) → labels (H, W) int64 and confidence (H, W) float32 at size (H, W).

    Bilinear resize to (H, W), P = softmax_Q(τ·cos), max over each class's synonyms, argmax, then the
    thresholds. The confidence is the chosen class's probability. Works on bands of rows, so no
    (Q, H, W) tensor of a large image is ever held. The area rule needs the whole first argmax, so it
    makes two passes.
    """
    height, width = size
    source = check_finite(cos.float(), "the mean window cosines")  # no NaN may reach a mask silently
    vocab = decision.vocabulary
    num_vocab = len(vocab.classes)
    dropped: Optional[Tensor] = None
    if decision.area_threshold is not None:
        counts = torch.zeros(num_vocab, dtype=torch.float64)
        for _, _, band in resized_row_bands(source, height, width):
            idx = _class_probs(band, decision).argmax(dim=0)
            counts += torch.bincount(idx.flatten().cpu(), minlength=num_vocab).double()
        others = torch.ones(num_vocab, dtype=torch.bool)
        if decision.background is not None and decision.background < num_vocab:
            others[decision.background] = False
        dropped = others & (counts <= decision.area_threshold * counts[others].sum())
    labels = np.empty((height, width), dtype=np.int64)
    confidence = np.empty((height, width), dtype=np.float32)
    for y0, y1, band in resized_row_bands(source, height, width):
        probs = _class_probs(band, decision)
        if dropped is not None and bool(dropped.any()):
            probs[dropped.to(probs.device)] = 0.0
        best, idx = probs.max(dim=0)
        if decision.background is not None and decision.prob_threshold > 0:
            idx = torch.where(best < decision.prob_threshold, torch.full_like(idx, decision.background), idx)
        labels[y0:y1] = idx.cpu().numpy()
        confidence[y0:y1] = best.cpu().numpy()
    return labels, confidence


def _class_probs(band: Tensor, decision: Decision) -> Tensor:
    """(Q, rows, W) cosines → (C, rows, W) class probabilities (max over synonyms of one softmax)."""
    return aggregate_synonyms((decision.logit_scale * band).softmax(dim=0), decision.vocabulary, dim=0)
