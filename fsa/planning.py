"""One planning step before any forward pass: the image decoded once, the vocabulary parsed once, and the
geometry a memory budget needs (working size, windows, tokens per window, heads, depth).

A server that must refuse a request before it costs anything (the demo's budgets) asks a `RequestPlan`
instead of reaching into the models; the plan's decoded image and parsed vocabulary then go to
`Segmenter.segment` / `compare` as they are. The window geometry follows `fsa.inference.window_cosines`
exactly: windows of `fsa.sliding.window_layout` on the working image, each padded, centred, to the
method's multiple (a whole-image pass only when a proxy needs whole proxy patches).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .backbones import LoadedClip
from .config import SegmentSettings
from .images import DEFAULT_MAX_PIXELS, BoundedImage, read_bounded, working_size
from .inference import centred_padding, resolve_pad_multiple
from .proxies import ProxySpec, proxy_spec
from .sliding import window_layout
from .vocabulary import Vocabulary, parse_vocabulary


@dataclass(frozen=True)
class VisionGeometry:
    """CLIP's vision tower as far as attention costs go."""

    patch_size: int
    heads: int  #: attention heads of the last block (the block every method replaces)
    depth: int  #: residual blocks


def clip_geometry(clip: LoadedClip) -> VisionGeometry:
    """Patch size, heads and depth of a loaded CLIP's vision tower (open_clip's VisionTransformer)."""
    blocks = clip.model.visual.transformer.resblocks
    return VisionGeometry(patch_size=int(clip.patch_size), heads=int(blocks[-1].attn.num_heads), depth=len(blocks))


@dataclass(frozen=True)
class WindowPlan:
    """The windows one `SegmentSettings` runs: sizes in pixels (h, w) of its working image."""

    method: str
    working_size: tuple[int, int]  #: (H', W') the image is resized to for this settings' short side
    window_size: tuple[int, int]  #: one window before padding (all windows have the same size)
    padded_size: tuple[int, int]  #: one window as the networks see it, padding included
    windows: int  #: how many windows cover the working image
    clip_grid: tuple[int, int]  #: CLIP's patch grid of one window
    proxy_grid: Optional[tuple[int, int]]  #: the proxy's patch grid of one window (ProxyCLIP only)
    heads: int  #: heads of CLIP's attention over a window
    #: the proxy's name and label (ProxyCLIP only), e.g. "sam-b16", "SAM ViT-B/16"
    proxy_name: Optional[str] = None
    proxy_label: Optional[str] = None
    #: (matrices, tokens) of the proxy's own forward at its largest (`fsa.proxies.ProxySpec.attention`)
    proxy_attention: Optional[tuple[int, int]] = None

    @property
    def clip_tokens(self) -> int:
        """CLIP's patch tokens of one window (its CLS token not counted)."""
        return self.clip_grid[0] * self.clip_grid[1]

    @property
    def proxy_tokens(self) -> int:
        """N of ProxyCLIP's N×N affinity over the proxy grid (0 without a proxy)."""
        return 0 if self.proxy_grid is None else self.proxy_grid[0] * self.proxy_grid[1]

    @property
    def tokens(self) -> int:
        """Patch tokens of the largest grid over one window (CLS and register tokens not counted)."""
        return max(self.clip_tokens, self.proxy_tokens)


@dataclass(frozen=True)
class RequestPlan:
    """What a request will cost, known before any forward pass; `image` and `vocabulary` are reused by it."""

    image: BoundedImage  #: decoded once, no larger than the largest working size asked for
    vocabulary: Vocabulary  #: parsed once
    clip: VisionGeometry
    working_size: tuple[int, int]  #: the largest working size of the settings (the class budget's)
    windows: tuple[WindowPlan, ...]  #: one per settings, in their order

    @property
    def queries(self) -> int:
        """Text queries: class names and synonyms."""
        return len(self.vocabulary.queries)


def plan_windows(settings: SegmentSettings, image_hw: tuple[int, int], clip: VisionGeometry,
                 proxy: Optional[ProxySpec] = None) -> WindowPlan:
    """The windows `settings` lays on an image of `image_hw` pixels (h, w) before it is resized.

    `proxy`: the proxy's `fsa.proxies.ProxySpec`, used when the method is ProxyCLIP (without it, the plan has
    no proxy grid).
    """
    working = working_size(*image_hw, settings.resolved_short_side(), min_side=clip.patch_size)
    crop = settings.resolved_crop()
    first = window_layout(*working, crop, settings.resolved_stride())
    is_proxyclip = settings.method == "proxyclip"
    uses_proxy = is_proxyclip and proxy is not None
    # a whole-image pass runs unpadded, unless a proxy needs whole proxy patches
    multiple = resolve_pad_multiple(settings.defaults.pad_to, clip.patch_size) if crop > 0 or is_proxyclip else 0
    left, right, top, bottom = centred_padding(first[0].height, first[0].width, multiple)
    ph, pw = first[0].height + top + bottom, first[0].width + left + right
    proxy_grid = proxy.grid(ph, pw, crop or None) if uses_proxy else None
    return WindowPlan(
        method=settings.method, working_size=working, window_size=(first[0].height, first[0].width),
        padded_size=(ph, pw), windows=len(first), clip_grid=(ph // clip.patch_size, pw // clip.patch_size),
        proxy_grid=proxy_grid, heads=clip.heads, proxy_name=proxy.name if uses_proxy else None,
        proxy_label=proxy.label if uses_proxy else None,
        proxy_attention=proxy.attention(ph, pw, crop or None) if uses_proxy else None)


def plan_request(segmenter, image, vocabulary, settings_list: Sequence[SegmentSettings], *,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_names: int = 1 << 30) -> RequestPlan:
    """Parse `vocabulary`, decode `image` to the largest working size of `settings_list` (refusing more than
    `max_pixels` decoded pixels), load the segmenter's CLIP (cached) and lay out every settings' windows.

    segmenter: an `fsa.Segmenter` (its CLIP and proxy name). max_names: names parsed at most (the default
    only counts them, so that a budget can say how many it allows). Raises what parsing, decoding and
    loading raise: ValueError, FileNotFoundError, WeightsUnavailableError.
    """
    if not settings_list:
        raise ValueError("no settings to plan")
    vocab = parse_vocabulary(vocabulary, max_names=max_names)
    short_side = max(settings.resolved_short_side() for settings in settings_list)
    name = Path(image).name if isinstance(image, (str, Path)) else None
    decoded = read_bounded(image, short_side, max_pixels=max_pixels, name=name)
    clip = clip_geometry(segmenter.load())
    proxy = proxy_spec(segmenter.proxy_name) if any(s.method == "proxyclip" for s in settings_list) else None
    image_hw = decoded.rgb.shape[:2]
    windows = tuple(plan_windows(settings, image_hw, clip, proxy) for settings in settings_list)
    working = working_size(*image_hw, short_side, min_side=clip.patch_size)
    return RequestPlan(image=decoded, vocabulary=vocab, clip=clip, working_size=working, windows=windows)
