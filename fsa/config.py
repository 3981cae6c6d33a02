"""Typed settings shared by every layer of the package.

Nothing here computes; the values are the defaults of method.md (§1-§4).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional, Union

#: Last-block variants, in the order the UI lists them.
METHODS: tuple[str, ...] = ("maskclip", "sclip", "clearclip", "naclip", "proxyclip", "gclip", "vanilla")

METHOD_LABELS: dict[str, str] = {
    "vanilla": "Vanilla CLIP",
    "maskclip": "MaskCLIP",
    "sclip": "SCLIP",
    "clearclip": "ClearCLIP",
    "naclip": "NACLIP",
    "proxyclip": "ProxyCLIP",
    "gclip": "GCLIP (reconstruction)",
}

BACKBONES: tuple[str, ...] = ("ViT-B-16", "ViT-L-14", "ViT-H-14")
TINY_TEST = "tiny-test"
PROXIES: tuple[str, ...] = ("dino-b8", "dinov2-b14-reg")


#: `MethodDefaults.pad_to` value: pad each window to a multiple of the CLIP patch size.
PAD_TO_PATCH = "patch"


@dataclass(frozen=True)
class MethodDefaults:
    """Per-method inference defaults (method.md §1) and the published code's window rules.

    ``pad_to``: how a sliding window whose side is not a multiple of it is padded (centred, zeros in
    CLIP-normalised space, the logits cropped back): ``PAD_TO_PATCH`` (ClearCLIP's code, which also
    implements vanilla and MaskCLIP), 56 (ProxyCLIP's and FSA's code: a multiple of both DINO's 8 and
    DINOv2's 14), or 0 = no padding (SCLIP's and NACLIP's code: the patch embedding drops the rest).
    """

    crop: int  #: sliding-window crop in pixels of the resized image; 0 = whole image
    stride: int
    logit_scale: float
    residual: bool  #: last block keeps its residual connection
    ffn: bool  #: last block keeps its FFN
    short_side: int = 448  #: the published default short side of the method's configs
    pad_to: Union[int, str] = PAD_TO_PATCH


# Short sides, crops and strides: the methods' released configs (SCLIP, NACLIP, ProxyCLIP: Resize to
# (2048, 336); ClearCLIP (2048, 448)); vanilla, MaskCLIP and GCLIP are ours.
METHOD_DEFAULTS: dict[str, MethodDefaults] = {
    "vanilla": MethodDefaults(448, 224, 40.0, residual=True, ffn=True),
    "maskclip": MethodDefaults(448, 224, 40.0, residual=True, ffn=True),
    "sclip": MethodDefaults(224, 112, 40.0, residual=True, ffn=True, short_side=336, pad_to=0),
    "clearclip": MethodDefaults(448, 224, 50.0, residual=False, ffn=False),
    "naclip": MethodDefaults(224, 112, 40.0, residual=False, ffn=False, short_side=336, pad_to=0),
    "proxyclip": MethodDefaults(336, 112, 40.0, residual=False, ffn=False, short_side=336, pad_to=56),
    "gclip": MethodDefaults(448, 224, 40.0, residual=False, ffn=False),
}


def check_method(method: str) -> str:
    """Return ``method`` lower-cased, or raise ``ValueError`` naming the valid ones."""
    name = str(method).lower()
    if name not in METHOD_DEFAULTS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return name


#: Output-similarity forms of FeedbackConfig.similarity (fsa.feedback.output_similarity).
SIMILARITIES: tuple[str, ...] = ("kl", "sym_kl", "js")


@dataclass(frozen=True)
class FeedbackConfig:
    """FSA settings (method.md §3). Each component is a switch."""

    lam: float = 3.0  #: λ of the scaling step ℓ = Ŝ·exp(λŜ)
    p: float = 0.45  #: top-p of the confidence-based pruning
    isolation: bool = True  #: subtract the uniform-attention logits U before the softmax
    pruning: bool = True  #: top-p pruning of each similarity row
    ensemble: bool = True  #: A_ens = (A_new A₀ + A₀ A_new + A_new) / 3 instead of A_new
    feedback_scale: float = 20.0  #: scale of the feedback logits Z
    isolation_scale: float = 35.0  #: scale of the uniform-attention logits U
    eps: float = 1e-10  #: ε in G = log(Π + ε)
    #: Ŝ from "kl" (the paper: 1/(1 + KL_ij)), "sym_kl" (1/(1 + ½(KL_ij + KL_ji))) or "js" (1/(1 + JS_ij))
    similarity: str = "kl"
    iterations: int = 1  #: feedback passes; pass t adapts with Π of pass t−1's output (the baseline's for t = 1)
    #: 1-based blocks that receive the adapted attention; None = the last block only (the paper)
    blocks: Optional[tuple[int, ...]] = None

    def _check_switches(self) -> None:
        """Validate similarity, iterations and blocks; blocks becomes a sorted tuple."""
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"FeedbackConfig.similarity must be one of {', '.join(SIMILARITIES)}, "
                             f"got {self.similarity!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, numbers.Integral) \
                or self.iterations < 1:
            raise ValueError(f"FeedbackConfig.iterations must be an integer >= 1, got {self.iterations!r}")
        object.__setattr__(self, "iterations", int(self.iterations))
        if self.blocks is not None:
            try:
                blocks = tuple(self.blocks) if not isinstance(self.blocks, str) else (self.blocks,)
            except TypeError:  # a single number
                blocks = (self.blocks,)
            bad = [b for b in blocks if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1]
            if not blocks or bad or len(set(blocks)) != len(blocks):
                raise ValueError("FeedbackConfig.blocks must be None (the last block) or distinct 1-based block "
                                 f"numbers, e.g. (11, 12), got {self.blocks!r}")
            object.__setattr__(self, "blocks", tuple(sorted(int(b) for b in blocks)))

    def __post_init__(self) -> None:
        self._check_switches()
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"FeedbackConfig.p must be in (0, 1], got {self.p}")
        if self.eps <= 0:
            raise ValueError("FeedbackConfig.eps must be positive")


def default_lambda(backbone: str) -> float:
    """λ the paper uses for a backbone (method.md §3 step 5)."""
    return 2.3 if "H-14" in backbone else 3.0


@dataclass(frozen=True)
class GClipConfig:
    """GCLIP switches (method.md §4, a reconstruction). Blocks are 1-based; None = scaled from 12."""

    channel_suppression: bool = True
    attention_fusion: bool = True
    suppression_blocks: Optional[tuple[int, ...]] = None  #: default: blocks 8..12 of 12
    fusion_blocks: Optional[tuple[int, ...]] = None  #: default: blocks 7 and 8 of 12

    def resolved_suppression_blocks(self, depth: int) -> tuple[int, ...]:
        """1-based blocks whose largest c_proj row is suppressed: b ≥ ⌈2·depth/3⌉ (8..12 of 12)."""
        if self.suppression_blocks is not None:
            blocks = tuple(self.suppression_blocks)
        else:
            blocks = tuple(range(-(-2 * depth // 3), depth + 1))
        _check_blocks(blocks, depth, "suppression_blocks", allow_last=True)
        return blocks

    def resolved_fusion_blocks(self, depth: int) -> tuple[int, ...]:
        """1-based blocks whose attention is fused: round(7·depth/12), round(8·depth/12) (7, 8 of 12)."""
        if self.fusion_blocks is not None:
            blocks = tuple(self.fusion_blocks)
        else:
            blocks = tuple(sorted({int(7 * depth / 12 + 0.5), int(8 * depth / 12 + 0.5)}))
        _check_blocks(blocks, depth, "fusion_blocks", allow_last=False)
        return blocks


def _check_blocks(blocks: tuple[int, ...], depth: int, what: str, *, allow_last: bool) -> None:
    top = depth if allow_last else depth - 1
    bad = [b for b in blocks if not 1 <= b <= top]
    if bad:
        raise ValueError(f"GCLIP {what} {bad} outside 1..{top} for a {depth}-block vision tower")


@dataclass(frozen=True)
class MethodOptions:
    """Method parameters beyond the attention rule itself (method.md §2, §4)."""

    naclip_sigma: float = 5.0  #: σ of NACLIP's Gaussian, in patches
    proxy_beta: float = 1.2  #: β of ProxyCLIP's S' = γ(Ŝ − β·mean Ŝ)
    proxy_gamma: float = 3.0  #: γ of the same
    gclip: GClipConfig = field(default_factory=GClipConfig)


@dataclass(frozen=True)
class SegmentSettings:
    """Everything that decides one segmentation, besides the image and the vocabulary."""

    method: str = "clearclip"
    #: FSA on top of the method; None = the baseline alone.
    feedback: Optional[FeedbackConfig] = field(default_factory=FeedbackConfig)
    short_side: Optional[int] = None  #: resize so the short side is this many pixels; None = the method's default
    crop: Optional[int] = None  #: None = the method's default; 0 = one pass over the whole image
    stride: Optional[int] = None  #: None = the method's default
    logit_scale: Optional[float] = None  #: None = the method's default
    prob_threshold: float = 0.0  #: pixels whose best probability is below become background
    #: SCLIP's area rule: non-background classes covering at most this share of the non-background
    #: prediction are dropped before the final argmax; None = off
    area_threshold: Optional[float] = None
    window_batch: int = 4  #: windows per forward pass
    options: "MethodOptions" = field(default_factory=lambda: MethodOptions())
    keep_diagnostics: bool = True  #: keep per-window data for `SegmentationResult.explain`

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", check_method(self.method))
        if self.short_side is not None and self.short_side < 1:
            raise ValueError("short_side must be a positive number of pixels")
        if self.area_threshold is not None and not 0.0 <= self.area_threshold < 1.0:
            raise ValueError("area_threshold must be in [0, 1) or None")
        if self.crop is not None and self.crop < 0:
            raise ValueError("crop must be >= 0 (0 = whole image)")
        if self.stride is not None and self.stride < 1:
            raise ValueError("stride must be >= 1")
        if not 0.0 <= self.prob_threshold < 1.0:
            raise ValueError("prob_threshold must be in [0, 1)")
        if self.window_batch < 1:
            raise ValueError("window_batch must be >= 1")

    @property
    def defaults(self) -> MethodDefaults:
        return METHOD_DEFAULTS[self.method]

    def resolved_short_side(self) -> int:
        return self.defaults.short_side if self.short_side is None else self.short_side

    def resolved_crop(self) -> int:
        return self.defaults.crop if self.crop is None else self.crop

    def resolved_stride(self) -> int:
        return self.defaults.stride if self.stride is None else self.stride

    def resolved_logit_scale(self) -> float:
        return self.defaults.logit_scale if self.logit_scale is None else self.logit_scale
