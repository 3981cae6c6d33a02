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


@pytest.mark.parametrize("method", fsa.METHODS)
def test_fp16_model_agrees_with_fp32(models, method):
    m32, m16 = models
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 80, 112, generator=g)
    text = F.normalize(torch.randn(5, m32.visual.output_dim, generator=g), dim=-1)
    proxy = torch.randn(2, 16, 6, 9, generator=g)
    cfg = fsa.FeedbackConfig()
    ref = fsa.patch_logits(m32, pixels, text, method, feedback=cfg, proxy_features=proxy)
    half = fsa.patch_logits(m16, pixels.half(), text.half(), method, feedback=cfg, proxy_features=proxy.half())
    assert half.dtype == torch.float32  # cosines and the feedback step are computed in float32
    assert half.shape == ref.shape
    # measured 5e-4 (MaskCLIP, SCLIP, vanilla) to 2.4e-3 (ProxyCLIP); FSA itself moves SCLIP by only 0.048, and
    # Π computed in float16 instead of float32 moves NACLIP by 6e-3
    assert (half - ref).abs().max() < 5e-3


def test_feedback_similarity_is_float32_from_fp16_input():
    """ε = 1e-10 vanishes in fp16 (log(0 + ε) = -inf); the step must widen first."""
    pi = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float16)
    sim = output_similarity(pi, 1e-10)
    assert sim.dtype == torch.float32
    assert torch.isfinite(sim).all()
    # KL(one-hot_0 ‖ one-hot_1) = log((1 + ε) / ε) ≈ 23.03 in float32
    assert sim[0, 0, 1].item() == pytest.approx(1.0 / (1.0 + 23.02585), rel=1e-4)
    assert torch.equal(sim.diagonal(dim1=-2, dim2=-1), torch.ones(1, 2))
