"""Fixtures and helpers of the independent verification suite (reference.py vs `fsa`).

Import from the test modules: ``from _fixtures_ref import *`` (conftest.py stays untouched).
"""
from __future__ import annotations

import atexit
import json
import os
from dataclasses import dataclass

import pytest
import torch

import reference as R

DT = torch.float64

#: tolerance of fsa vs the reference (max abs, float64). The issue accepts 1e-6; we measure
#: ~1e-14 and hold 1e-10, because some switches move the output of the residual methods by only
#: ~1e-8 (pruning barely matters for vanilla/MaskCLIP/SCLIP: the pruned entries carry ~e^-20 of
#: the softmax mass), so a 1e-6 tolerance would not see a pruning bug there.
TOL = 1e-10
#: tolerance against the published golden outputs.
GOLDEN_TOL = 1e-9

# ------------------------------------------------------------------------------------------------
# measured differences, dumped as JSON at exit when FSA_REF_DIFF_LOG names a file
# ------------------------------------------------------------------------------------------------
DIFFS: dict[str, float] = {}


def record(name: str, diff: float) -> float:
    DIFFS[name] = max(float(diff), DIFFS.get(name, 0.0))
    return diff


def _dump() -> None:
    path = os.environ.get("FSA_REF_DIFF_LOG")
    if path and DIFFS:
        with open(path, "w") as f:
            json.dump(dict(sorted(DIFFS.items())), f, indent=1)


atexit.register(_dump)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return float((a.to(DT) - b.to(DT)).abs().max())


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny tensors: one intra-op thread is ~10-30x faster on this 2-core box when anything else
    runs (thread oversubscription). Restored after each of our modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# the package under test (imported directly by the test modules: a rename or a crash is a failure)
# ------------------------------------------------------------------------------------------------

def feedback_cfg(**kw):
    """(fsa.FeedbackConfig, RefFeedback) with the same fields."""
    from fsa.config import FeedbackConfig

    return FeedbackConfig(**kw), R.RefFeedback(**kw)


def method_options(naclip_sigma=5.0, proxy_beta=1.2, proxy_gamma=3.0, channel_suppression=True,
                   attention_fusion=True, suppression_blocks=None, fusion_blocks=None):
    """(fsa.MethodOptions, RefOptions) with the same values."""
    from fsa.config import GClipConfig, MethodOptions

    g = GClipConfig(channel_suppression=channel_suppression, attention_fusion=attention_fusion,
                    suppression_blocks=None if suppression_blocks is None else tuple(suppression_blocks),
                    fusion_blocks=None if fusion_blocks is None else tuple(fusion_blocks))
    m = MethodOptions(naclip_sigma=naclip_sigma, proxy_beta=proxy_beta, proxy_gamma=proxy_gamma, gclip=g)
    r = R.RefOptions(naclip_sigma=naclip_sigma, proxy_beta=proxy_beta, proxy_gamma=proxy_gamma,
                     channel_suppression=channel_suppression, attention_fusion=attention_fusion,
                     suppression_blocks=suppression_blocks, fusion_blocks=fusion_blocks)
    return m, r


def state_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model, snap) -> None:
    now = model.state_dict()
    assert now.keys() == snap.keys()
    changed = [k for k in snap if not torch.equal(now[k], snap[k])]
    assert not changed, f"model weights changed by the call: {changed}"


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    name: str
    pixels: torch.Tensor  # (B, 3, H, W) float64, normalised
    text: torch.Tensor  # (K, E) L2-normalised
    proxy: torch.Tensor  # (B, C, I, J)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=DT)


def _unit(t):
    return t / t.norm(dim=-1, keepdim=True)


INPUT_NAMES = ("golden", "nonsquare", "batch2", "pretrain_grid")


def make_inputs(name: str, golden) -> Inputs:
    text_g = torch.from_numpy(golden["text"]).to(DT)
    E = text_g.shape[1]
    gen = torch.Generator().manual_seed({"nonsquare": 1, "batch2": 2, "pretrain_grid": 3}.get(name, 0))
    if name == "golden":
        return Inputs(name, torch.from_numpy(golden["pixels"]).to(DT), text_g,
                      torch.from_numpy(golden["proxy"]).to(DT))
    if name == "nonsquare":  # 5 x 8 CLIP grid, 6 x 10 proxy grid, K = 5
        return Inputs(name, _randn(gen, 1, 3, 80, 128), _unit(_randn(gen, 5, E)), _randn(gen, 1, 24, 6, 10))
    if name == "batch2":  # two images, 3 x 7 grid (pos-embed shrunk in h, grown in w), 5 x 7 proxy
        return Inputs(name, _randn(gen, 2, 3, 48, 112), text_g, _randn(gen, 2, 16, 5, 7))
    if name == "pretrain_grid":  # 4 x 4 = the pre-training grid: positional embedding unchanged
        return Inputs(name, _randn(gen, 1, 3, 64, 64), _unit(_randn(gen, 3, E)), _randn(gen, 1, 8, 4, 4))
    raise KeyError(name)


@pytest.fixture(scope="session")
def ref_inputs(golden):
    return {n: make_inputs(n, golden) for n in INPUT_NAMES}


@pytest.fixture(scope="session")
def deep_model(golden):
    """A random 12-block float64 open_clip CLIP (QuickGELU, width 32, 2 heads) for the depth-12
    GCLIP defaults (suppression 8..12, fusion 7, 8) and a second activation."""
    import open_clip

    cfg = json.loads(str(golden["config_json"]))
    cfg["vision_cfg"] = dict(cfg["vision_cfg"], layers=12, width=32, head_width=16)
    torch.manual_seed(1234)
    model = open_clip.CLIP(**cfg, quick_gelu=True).double().eval()
    with torch.no_grad():  # open_clip leaves some vision params at trivial inits: make them generic
        for name, p in model.visual.named_parameters():
            if p.ndim >= 1:
                p.add_(0.05 * torch.randn_like(p))
    return model


def run_fsa(fsa, model, inp: Inputs, method: str, feedback=None, options=None):
    with torch.no_grad():
        return fsa.patch_logits(model, inp.pixels, inp.text, method, feedback=feedback,
                                proxy_features=inp.proxy if method == "proxyclip" else None,
                                options=options)


def run_ref(model, inp: Inputs, method: str, feedback=None, options=None, **kw):
    return R.reference_patch_logits(model, inp.pixels, inp.text, method, feedback=feedback,
                                    proxy_features=inp.proxy if method == "proxyclip" else None,
                                    options=options, **kw)
