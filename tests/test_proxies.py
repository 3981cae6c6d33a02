"""fsa.proxies: the proxy feature extractor (tiny random ViT; the real ones need hub weights)."""
from __future__ import annotations

import pytest
import torch

from fsa.proxies import ProxyModel, load_proxy, proxy_cache_key, resolve_proxy_name, tiny_test_proxy

IMAGENET_MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def proxy() -> ProxyModel:
    return load_proxy("tiny-test", device="cpu")


def test_resolve_proxy_name():
    assert resolve_proxy_name("DINO-B8") == "dino-b8"
    assert resolve_proxy_name(None) == "dino-b8"
    assert resolve_proxy_name("dinov2-b14-reg") == "dinov2-b14-reg"
    with pytest.raises(ValueError, match="unknown proxy model 'sam'.*dino-b8, dinov2-b14-reg, tiny-test"):
        resolve_proxy_name("sam")
    assert proxy_cache_key("tiny-test", "cpu") != proxy_cache_key("dino-b8", "cpu")


def test_tiny_proxy_attributes(proxy):
    assert proxy.name == "tiny-test" and proxy.is_test_model and proxy.patch_size == 8
    assert proxy.device == torch.device("cpu")
    assert not proxy.model.training and not any(p.requires_grad for p in proxy.model.parameters())


@pytest.mark.parametrize("h, w", [(64, 96), (72, 40), (70, 100)])
def test_features_match_timm_feature_map(proxy, h, w):
    """Against timm's own NCHW feature map of the last block (after the final norm)."""
    rgb = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    out = proxy.features(rgb)
    assert out.shape == (2, 32, h // 8, w // 8) and out.dtype == torch.float32
    assert not out.requires_grad
    x = (rgb[:, :, : h // 8 * 8, : w // 8 * 8] - IMAGENET_MEAN) / IMAGENET_STD
    with torch.no_grad():
        expected = proxy.model.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW",
                                                     intermediates_only=True)[-1]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_features_accept_other_dtypes_and_depend_on_the_image(proxy):
    rgb = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    ref = proxy.features(rgb)
    torch.testing.assert_close(proxy.features(rgb.double()), ref)
    assert proxy.features(rgb.half()).dtype == torch.float32
    other = proxy.features(torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1)))
    assert (other - ref).abs().max() > 1e-3


def test_tiny_proxy_is_seeded():
    a, b = tiny_test_proxy(), tiny_test_proxy()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_features_reject_bad_input(proxy):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        proxy.features(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="smaller than one 8-pixel proxy patch"):
        proxy.features(torch.rand(1, 3, 4, 32))


def test_proxy_checkpoint_env_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("FSA_PROXY_CHECKPOINT", str(tmp_path / "dino.safetensors"))
    with pytest.raises(FileNotFoundError, match="proxy checkpoint not found.*FSA_PROXY_CHECKPOINT"):
        load_proxy("dino-b8", device="cpu")
