"""The CUDA configuration (fp16 model, fp32 feedback maths), exercised on the CPU."""
import pytest
import torch
import torch.nn.functional as F

import fsa
from fsa.backbones import tiny_test_clip
from fsa.feedback import output_similarity


@pytest.fixture(scope="module")
def models():
    return tiny_test_clip().eval(), tiny_test_clip().half().eval()


#: FSA settings (the last-block switches resolved per model in the test) and the fp16 tolerance. Measured max
#: |fp16 − fp32| over the methods: paper 5e-4 (MaskCLIP, SCLIP, vanilla) to 2.4e-3 (ProxyCLIP); sym_kl with
#: blocks 2.5e-3; js with blocks 2.6e-3; two iterations 6.7e-3 (NACLIP: pass 2 feeds back 20·Z, amplifying
#: the fp16 noise of pass 1). FSA itself moves SCLIP by only 0.048, and Π computed in float16 instead of
#: float32 moves NACLIP by 6e-3. JS runs without pruning: it compresses Ŝ into [0.59, 1], and on the tiny
#: model's near-uniform Π the fp16 noise (2e-3 in Π) flips top-p cuts (GCLIP: 8 entries, 1.2e-2 on the
#: output), a precision effect, not a dtype bug; JS's pruning is checked in float32/64 elsewhere.
FP16_CASES = {
    "paper": (dict(), 5e-3),
    "sym_kl+blocks": (dict(similarity="sym_kl", blocks="last two"), 5e-3),
    "js+blocks": (dict(similarity="js", blocks="last two", pruning=False), 5e-3),
    "iterations=2": (dict(iterations=2), 1e-2),
}


@pytest.mark.parametrize("case", list(FP16_CASES))
@pytest.mark.parametrize("method", fsa.METHODS)
def test_fp16_model_agrees_with_fp32(models, method, case):
    """The CUDA configuration (fp16 model, fp32 feedback maths) on the CPU, for the paper and each switch."""
    m32, m16 = models
    kw, tol = FP16_CASES[case]
    depth = len(m32.visual.transformer.resblocks)
    if kw.get("blocks") == "last two":  # ProxyCLIP adapts the last block only
        kw = dict(kw, blocks=None if method == "proxyclip" else (depth - 1, depth))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 80, 112, generator=g)
    text = F.normalize(torch.randn(5, m32.visual.output_dim, generator=g), dim=-1)
    proxy = torch.randn(2, 16, 6, 9, generator=g)
    cfg = fsa.FeedbackConfig(**kw)
    ref = fsa.patch_logits(m32, pixels, text, method, feedback=cfg, proxy_features=proxy)
    half = fsa.patch_logits(m16, pixels.half(), text.half(), method, feedback=cfg, proxy_features=proxy.half())
    assert half.dtype == torch.float32  # cosines and the feedback step are computed in float32
    assert half.shape == ref.shape and torch.isfinite(half).all()
    assert (half - ref).abs().max() < tol


def test_feedback_similarity_is_float32_from_fp16_input():
    """ε = 1e-10 vanishes in fp16 (log(0 + ε) = -inf); the step must widen first."""
    pi = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float16)
    sim = output_similarity(pi, 1e-10)
    assert sim.dtype == torch.float32
    assert torch.isfinite(sim).all()
    # KL(one-hot_0 ‖ one-hot_1) = log((1 + ε) / ε) ≈ 23.03 in float32
    assert sim[0, 0, 1].item() == pytest.approx(1.0 / (1.0 + 23.02585), rel=1e-4)
    assert torch.equal(sim.diagonal(dim1=-2, dim2=-1), torch.ones(1, 2))
