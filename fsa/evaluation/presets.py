"""The published evaluation settings of each method on each benchmark, as data.

Sources (the methods' released mmseg configs and segmentor defaults, ViT-B/16):
- ProxyCLIP: github mc-lan/ProxyCLIP `configs/cfg_*.py` (DINO ViT-B/8 proxy);
- ProxyCLIP + FSA: github chi-chi-zx/FSA `configs/cfg_*.py` and `hyper_param.txt` (λ);
- ClearCLIP: github mc-lan/ClearCLIP `configs/cfg_*.py`, `clearclip_segmentor.py` defaults;
- SCLIP: github wangf3014/SCLIP `configs/cfg_*.py`, `clip_segmentor.py` defaults;
- NACLIP: github sinahmr/NACLIP `configs/cfg_*.py`, `naclip.py` defaults (PAMR: 10 steps, dilations 8, 16).
MaskCLIP, vanilla CLIP and GCLIP have no published training-free configs of this family: their rows
are our defaults (`fsa.METHOD_DEFAULTS`), labelled "ours".
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from ..config import METHOD_DEFAULTS, check_method

#: Benchmarks in the paper's column order.
BENCHMARK_ORDER = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k")
#: Benchmarks whose class 0 is a background class: the probability threshold applies only there.
BACKGROUND_BENCHMARKS = ("voc21", "context60", "coco_object")


@dataclass(frozen=True)
class Preset:
    """Everything the protocol needs besides the model: resize, windows, decision."""

    short_side: int
    crop: int  #: 0 = one window over the whole image
    stride: int
    logit_scale: float
    prob_thd: float = 0.0  #: only on benchmarks with a background class
    area_thd: Optional[float] = None  #: SCLIP's area rule
    source: str = "ours"


def _base(method: str, source: str, **changes) -> Preset:
    d = METHOD_DEFAULTS[method]
    return replace(Preset(d.short_side, d.crop, d.stride, d.logit_scale, source=source), **changes)


_PROXY = "ProxyCLIP configs"
_CLEAR = "ClearCLIP configs"
_SCLIP = "SCLIP configs"
_NACLIP = "NACLIP configs"
_FSA = "FSA configs"

#: method -> benchmark -> the published baseline setting ("*" = every other benchmark).
PUBLISHED: dict[str, dict[str, Preset]] = {
    "proxyclip": {
        "*": _base("proxyclip", _PROXY, short_side=336, crop=336, stride=112, logit_scale=40.0),
        "voc21": _base("proxyclip", _PROXY, prob_thd=0.2),
        "context60": _base("proxyclip", _PROXY, prob_thd=0.15),
        "coco_object": _base("proxyclip", _PROXY, prob_thd=0.25),
        "cityscapes": _base("proxyclip", _PROXY, short_side=448, crop=224, stride=112),
        "ade20k": _base("proxyclip", _PROXY, short_side=448),
    },
    "clearclip": {
        "*": _base("clearclip", _CLEAR, short_side=448, crop=448, stride=224, logit_scale=50.0),
        "voc21": _base("clearclip", _CLEAR, prob_thd=0.5),
        "context60": _base("clearclip", _CLEAR, prob_thd=0.15),
        "coco_object": _base("clearclip", _CLEAR, prob_thd=0.4),
        "cityscapes": _base("clearclip", _CLEAR, crop=224, stride=224),
    },
    "sclip": {
        "*": _base("sclip", _SCLIP, short_side=336, crop=224, stride=112, logit_scale=40.0),
        "voc21": _base("sclip", _SCLIP, logit_scale=65.0, prob_thd=0.1, area_thd=0.1),
        "context60": _base("sclip", _SCLIP, logit_scale=50.0, prob_thd=0.1),
        "coco_object": _base("sclip", _SCLIP, logit_scale=50.0, prob_thd=0.1),
        "coco_stuff": _base("sclip", _SCLIP, short_side=448),
        "cityscapes": _base("sclip", _SCLIP, short_side=560),
    },
    "naclip": {
        "*": _base("naclip", _NACLIP, short_side=336, crop=224, stride=112, logit_scale=40.0),
        "voc21": _base("naclip", _NACLIP, crop=0, prob_thd=0.1),
        "voc20": _base("naclip", _NACLIP, crop=0),
        "context60": _base("naclip", _NACLIP, prob_thd=0.1),
        "coco_object": _base("naclip", _NACLIP, prob_thd=0.1),
        "cityscapes": _base("naclip", _NACLIP, short_side=560),
    },
}

#: Where the published FSA setting differs from its baseline's (ProxyCLIP + FSA, FSA configs).
FSA_CHANGES: dict[tuple[str, str], dict] = {
    ("proxyclip", "context60"): dict(prob_thd=0.14, source=_FSA),
    ("proxyclip", "coco_object"): dict(prob_thd=0.30, source=_FSA),
    ("proxyclip", "cityscapes"): dict(stride=80, source=_FSA),
}


def published_preset(method: str, benchmark: str, *, fsa: bool = False) -> Preset:
    """The published setting of `method` (with FSA if `fsa`) on `benchmark`; ours where none is published."""
    method = check_method(method)
    if benchmark not in BENCHMARK_ORDER:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARK_ORDER)}")
    table = PUBLISHED.get(method)
    if table is None:
        preset = _base(method, "ours")
    else:
        preset = table.get(benchmark, table["*"])
    if benchmark not in BACKGROUND_BENCHMARKS:
        preset = replace(preset, prob_thd=0.0, area_thd=None)
    if fsa and (method, benchmark) in FSA_CHANGES:
        preset = replace(preset, **FSA_CHANGES[(method, benchmark)])
    return preset


def with_overrides(preset: Preset, *, short_side: Optional[int] = None, crop: Optional[int] = None,
                   stride: Optional[int] = None, logit_scale: Optional[float] = None,
                   prob_thd: Optional[float] = None) -> Preset:
    """The preset with the user's command-line overrides (None = keep)."""
    changes = {k: v for k, v in dict(short_side=short_side, crop=crop, stride=stride, logit_scale=logit_scale,
                                     prob_thd=prob_thd).items() if v is not None}
    if not changes:
        return preset
    return replace(preset, **changes, source=preset.source + " + overrides")
