"""Typed settings shared by every layer of the package.

Nothing here computes; the values are the defaults of docs/method.md (§1-§4).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional, Union

from .checks import check_number

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
#: ProxyCLIP's proxy models, as the published FSA code offers them (`vfm_model` dino, dinov2, mae, sam).
PROXIES: tuple[str, ...] = ("dino-b8", "dinov2-b14-reg", "mae-b16", "sam-b16")
#: The small random stand-in of each proxy that runs with the tiny-test backbone (no download).
TINY_PROXIES: Mapping[str, str] = MappingProxyType({"dino-b8": TINY_TEST, "dinov2-b14-reg": "tiny-test-dinov2",
                                                    "mae-b16": "tiny-test-mae", "sam-b16": "tiny-test-sam"})
PROXY_LABELS: Mapping[str, str] = MappingProxyType({
    "dino-b8": "DINO ViT-B/8", "dinov2-b14-reg": "DINOv2 ViT-B/14 (registers)", "mae-b16": "MAE ViT-B/16",
    "sam-b16": "SAM ViT-B/16", TINY_TEST: "random DINO stand-in", "tiny-test-dinov2": "random DINOv2 stand-in",
    "tiny-test-mae": "random MAE stand-in", "tiny-test-sam": "random SAM stand-in",
})
#: FSA's λ with an MAE proxy, whatever the backbone (FSA's hyper_param.txt).
MAE_LAMBDA = 4.5

# --- allowed ranges of the settings (checked in __post_init__, before any model loads) -------------
#: λ bound: FSA computes ℓ = Ŝ·exp(λŜ) in float32 (or wider) with Ŝ ∈ (0, 1], so the largest logit
#: is exp(λ). float32's largest value is 3.4028e38 = exp(88.72): above λ ≈ 88.7 the row maximum is
#: inf, softmax gives inf − inf = NaN and every pixel lands in class 0. 88 keeps exp(λ) ≈ 1.65e38
#: finite. λ < 0 would flatten A_new instead of sharpening it (below −1 it even ranks dissimilar
#: patches first); the paper uses 2.3-4.5.
LAMBDA_MAX = 88.0
#: Scales multiply cosines in [-1, 1]: at 1000 every softmax is already one-hot in float32
#: (exp(-2000) = 0), so larger scales change nothing and, near 1e38, overflow to inf.
SCALE_MAX = 1000.0
#: ε of G = log(Π + ε): at least float32's smallest normal number (a smaller ε can flush to 0, and
#: then 0·log(0) = NaN); at most 1e-3, so it stays a guard for near-zero probabilities and does
#: not flatten ordinary ones (published value 1e-10).
EPS_MIN, EPS_MAX = 1.1754944e-38, 1e-3
#: Short side in pixels: at least one patch of the largest patch size (16); at most the long-side
#: cap of docs/method.md §1 (2048), beyond which the resize is capped anyway.
SHORT_SIDE_MIN, SHORT_SIDE_MAX = 16, 2048
#: A window crop smaller than one patch (16 px) has no patch grid.
CROP_MIN = 16
#: NACLIP σ in patches: at 0.01 Ω is already the identity in float32 (exp(−1/(2·0.01²)) = 0), and a
#: tiny σ underflows 2σ² to 0 (0/0 = NaN on Ω's diagonal); above 1e4 Ω is constant for any grid.
SIGMA_MIN, SIGMA_MAX = 0.01, 1e4
#: ProxyCLIP's β (published 1.2) scales the mean cosine subtracted from cosines in [-1, 1]: |β| ≤ 100
#: keeps γ(Ŝ − β·mean Ŝ) within ±1000·101, far from overflow; beyond, it prunes all or nothing.
PROXY_BETA_MAX = 100.0


#: `MethodDefaults.pad_to` value: pad each window to a multiple of the CLIP patch size.
PAD_TO_PATCH = "patch"


@dataclass(frozen=True)
class MethodDefaults:
    """Per-method inference defaults (docs/method.md §1) and the published code's window rules.

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
    """FSA settings (docs/method.md §3). Each component is a switch."""

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
        checked = {
            "lam": check_number("FeedbackConfig.lam", self.lam, low=0.0, high=LAMBDA_MAX,
                                why=f"λ; above {LAMBDA_MAX:g}, exp(λ) overflows float32; the paper uses 2.3-4.5"),
            "p": check_number("FeedbackConfig.p", self.p, low=0.0, high=1.0, low_open=True,
                              why="the top-p share of each similarity row kept by pruning"),
            "feedback_scale": check_number("FeedbackConfig.feedback_scale", self.feedback_scale, low=0.0,
                                           high=SCALE_MAX, low_open=True),
            "isolation_scale": check_number("FeedbackConfig.isolation_scale", self.isolation_scale, low=0.0,
                                            high=SCALE_MAX, low_open=True),
            "eps": check_number("FeedbackConfig.eps", self.eps, low=EPS_MIN, high=EPS_MAX,
                                why="ε of log(Π + ε); published value 1e-10"),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)


def default_lambda(backbone: str, proxy: Optional[str] = None) -> float:
    """λ the paper uses for a backbone (docs/method.md §3 step 5; FSA's hyper_param.txt).

    proxy: ProxyCLIP's proxy model (leave None for the other methods): 4.5 with an MAE proxy (or its
    tiny-test stand-in) for every backbone; otherwise 2.3 for ViT-H/14 and 3.0 for the others.
    """
    if proxy is not None and str(proxy).strip().lower() in ("mae-b16", TINY_PROXIES["mae-b16"]):
        return MAE_LAMBDA
    return 2.3 if "H-14" in backbone else 3.0


@dataclass(frozen=True)
class GClipConfig:
    """GCLIP switches (docs/method.md §4, a reconstruction). Blocks are 1-based; None = scaled from 12."""

    channel_suppression: bool = True
    attention_fusion: bool = True
    suppression_blocks: Optional[tuple[int, ...]] = None  #: default: blocks 8..12 of 12
    fusion_blocks: Optional[tuple[int, ...]] = None  #: default: blocks 7 and 8 of 12

    def __post_init__(self) -> None:
        # The upper bound depends on the tower's depth: resolved_*_blocks checks it.
        for name in ("suppression_blocks", "fusion_blocks"):
            blocks = getattr(self, name)
            if blocks is None:
                continue
            if isinstance(blocks, (str, bytes)) or not hasattr(blocks, "__iter__"):
                raise ValueError(f"GClipConfig.{name} must be a sequence of 1-based block numbers, got {blocks!r}")
            checked = tuple(check_number(f"every entry of GClipConfig.{name}", b, low=1, integer=True) for b in blocks)
            if len(set(checked)) != len(checked):
                raise ValueError(f"GClipConfig.{name} lists a block twice: {list(checked)}")
            object.__setattr__(self, name, checked)  # a tuple, so that settings stay hashable

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
    """Method parameters beyond the attention rule itself (docs/method.md §2, §4)."""

    naclip_sigma: float = 5.0  #: σ of NACLIP's Gaussian, in patches
    proxy_beta: float = 1.2  #: β of ProxyCLIP's S' = γ(Ŝ − β·mean Ŝ)
    proxy_gamma: float = 3.0  #: γ of the same
    gclip: GClipConfig = field(default_factory=GClipConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "naclip_sigma", check_number(
            "MethodOptions.naclip_sigma", self.naclip_sigma, low=SIGMA_MIN, high=SIGMA_MAX,
            why="NACLIP's σ in patches; published value 5"))
        object.__setattr__(self, "proxy_beta", check_number(
            "MethodOptions.proxy_beta", self.proxy_beta, low=-PROXY_BETA_MAX, high=PROXY_BETA_MAX,
            why="ProxyCLIP's β; published value 1.2"))
        object.__setattr__(self, "proxy_gamma", check_number(
            "MethodOptions.proxy_gamma", self.proxy_gamma, low=0.0, high=SCALE_MAX, low_open=True,
            why="ProxyCLIP's γ; published value 3"))
        if not isinstance(self.gclip, GClipConfig):
            raise ValueError(f"MethodOptions.gclip must be a GClipConfig, got {type(self.gclip).__name__}")


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
        if self.feedback is not None and not isinstance(self.feedback, FeedbackConfig):
            raise ValueError(f"SegmentSettings.feedback must be a FeedbackConfig or None, "
                             f"got {type(self.feedback).__name__}")
        if not isinstance(self.options, MethodOptions):
            raise ValueError(f"SegmentSettings.options must be a MethodOptions, got {type(self.options).__name__}")

        def check(name: str, optional: bool = True, **rule) -> None:
            value = getattr(self, name)
            if value is not None or not optional:
                object.__setattr__(self, name, check_number(f"SegmentSettings.{name}", value, **rule))

        # short_side None: the method's published default
        check("short_side", low=SHORT_SIDE_MIN, high=SHORT_SIDE_MAX, integer=True,
              why="pixels of the resized image's short side")
        if self.crop != 0:  # 0 = one pass over the whole image
            check("crop", low=CROP_MIN, integer=True,
                  why=f"pixels; 0 = the whole image, else at least one {CROP_MIN}-pixel patch")
        else:
            object.__setattr__(self, "crop", 0)  # 0.0 or False from a form → 0
        check("stride", low=1, integer=True, why="pixels between window starts")
        check("logit_scale", low=0.0, high=SCALE_MAX, low_open=True, why="τ of the decision softmax(τ·cos)")
        check("prob_threshold", optional=False, low=0.0, high=1.0, high_open=True,
              why="the best class probability below which a pixel becomes background")
        check("window_batch", optional=False, low=1, integer=True)
        check("area_threshold", low=0.0, high=1.0, high_open=True,
              why="SCLIP's area rule: the largest share of the non-background prediction a dropped class covers")
        crop, stride = self.resolved_crop(), self.resolved_stride()
        if crop > 0 and stride > crop:  # windows would leave pixels uncovered: 0/0 = NaN there
            default = f" ({self.method}'s default)"
            stride_text = f"{stride}{default if self.stride is None else ''}"
            crop_text = f"{crop}{default if self.crop is None else ''}"
            raise ValueError(f"SegmentSettings.stride/crop: the window stride {stride_text} is larger than the crop "
                             f"{crop_text}, so the windows would leave gaps; choose a stride ≤ the crop, or crop 0 "
                             "for one pass over the whole image")

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
