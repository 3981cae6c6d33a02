"""fsa.proxies: the proxy feature extractor (tiny random ViT; the real ones need hub weights).

Golden: tests/data/published_dino_small.npz holds features of a small random DINO computed by
the published facebookresearch/dino model file (see the README there).
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from _golden import load_golden
from _pixels import CPU, IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD
from _pixels import channels as _chan
from _pixels import imagenet as _imagenet
from fsa.images import CLIP_PIXEL_MEAN_255, CLIP_PIXEL_STD_255
from fsa.proxies import (
    ProxyModel,
    dino_position_table,
    load_proxy,
    proxy_cache_key,
    resolve_proxy_name,
    tiny_test_proxy,
)



def _plain_forward(model: VisionTransformer, x: torch.Tensor, patch_table: torch.Tensor, **layout) -> torch.Tensor:
    """Reference: a fixed-size timm ViT (no resampling at all) whose positional table IS ``patch_table``
    (1, C, rows, cols) (with ``model``'s CLS row in front unless ``no_embed_class``); final-norm patch
    tokens as (B, C, rows, cols)."""
    rows, cols = patch_table.shape[-2:]
    dim = patch_table.shape[1]
    patch_size = model.patch_embed.patch_size[0]
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten; keep the global RNG as it was
        fixed = VisionTransformer(
            img_size=(rows * patch_size, cols * patch_size), patch_size=patch_size, embed_dim=dim,
            depth=len(model.blocks), num_heads=model.blocks[0].attn.num_heads, num_classes=0, **layout,
        ).to(model.pos_embed.dtype).eval()
    state = dict(model.state_dict())
    flat = patch_table.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    state["pos_embed"] = flat if layout.get("no_embed_class") else torch.cat([model.pos_embed[:, :1], flat], dim=1)
    fixed.load_state_dict(state)
    with torch.no_grad():
        tokens = fixed.forward_features(x.to(fixed.pos_embed.dtype))
    patches = tokens[:, fixed.num_prefix_tokens:]
    return patches.transpose(1, 2).reshape(x.shape[0], dim, rows, cols)


def _published_dino_table(model: VisionTransformer, rows: int, cols: int) -> torch.Tensor:
    """The published DINO rule written out: bicubic, no antialias, scale_factor (rows first)."""
    side = int(round((model.pos_embed.shape[1] - 1) ** 0.5))
    table = model.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if (rows, cols) == (side, side):
        return table
    return F.interpolate(table, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic",
                         align_corners=False, antialias=False)


@pytest.fixture(scope="module")
def proxy() -> ProxyModel:
    return load_proxy("tiny-test", device="cpu")


@pytest.fixture(scope="module")
def proxy64() -> ProxyModel:
    return ProxyModel("tiny-test", tiny_test_proxy().double().eval(), device=CPU, is_test_model=True)


@pytest.fixture(scope="module")
def golden():
    return load_golden("published_dino_small.npz")


@pytest.fixture(scope="module")
def golden_dino(golden) -> ProxyModel:
    """The golden's DINO weights in the timm container, as a dino-b8 proxy (float64)."""
    cfg = json.loads(str(golden["config_json"]))
    model = VisionTransformer(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"], depth=cfg["depth"],
        num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"], qkv_bias=cfg["qkv_bias"], num_classes=0,
        dynamic_img_size=True,
    ).double().eval()
    state = {k[len("state/"):]: torch.from_numpy(golden[k]) for k in golden.files if k.startswith("state/")}
    model.load_state_dict(checkpoint_filter_fn(state, model))
    return ProxyModel("dino-b8", model, device=CPU, is_test_model=True)


def _golden_input(golden, size: int) -> torch.Tensor:
    rgb = torch.from_numpy(golden[f"rgb255/{size}x{size}"]).permute(2, 0, 1)[None].double()
    return _imagenet(rgb / 255.0)


# -- names, loading ---------------------------------------------------------------------------------
def test_resolve_proxy_name():
    assert resolve_proxy_name("DINO-B8") == "dino-b8"
    assert resolve_proxy_name(None) == "dino-b8"
    assert resolve_proxy_name("dinov2-b14-reg") == "dinov2-b14-reg"
    with pytest.raises(ValueError, match="unknown proxy model 'sam2'.*dino-b8, dinov2-b14-reg, mae-b16, sam-b16, "
                                         "tiny-test"):
        resolve_proxy_name("sam2")
    assert proxy_cache_key("tiny-test", "cpu") != proxy_cache_key("dino-b8", "cpu")


def test_tiny_proxy_attributes(proxy):
    assert proxy.name == "tiny-test" and proxy.is_test_model and proxy.patch_size == 8
    assert proxy.device == CPU and proxy.uses_dino_positions
    assert proxy.mean_rgb == IMAGENET_MEAN and proxy.std_rgb == IMAGENET_STD
    assert not proxy.model.training and not any(p.requires_grad for p in proxy.model.parameters())


def test_tiny_proxy_is_seeded():
    a, b = tiny_test_proxy(), tiny_test_proxy()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_proxy_checkpoint_env_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("FSA_PROXY_CHECKPOINT", str(tmp_path / "dino.safetensors"))
    with pytest.raises(FileNotFoundError, match="proxy checkpoint not found.*FSA_PROXY_CHECKPOINT"):
        load_proxy("dino-b8", device="cpu")


def test_proxy_model_rejects_wrong_layouts():
    static = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        ProxyModel("dino-b8", static, device=CPU, is_test_model=True)
    registers = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0,
                                  reg_tokens=4, no_embed_class=True, dynamic_img_size=True)
    with pytest.raises(ValueError, match="needs DINO's token layout"):
        ProxyModel("dino-b8", registers, device=CPU, is_test_model=True)
    assert not ProxyModel("dinov2-b14-reg", registers, device=CPU, is_test_model=True).uses_dino_positions


# -- the published DINO positional rule ---------------------------------------------------------------
@pytest.mark.parametrize("size", [224, 336, 448])
def test_dino_proxy_matches_published_dino(golden, golden_dino, size):
    """float64, published facebookresearch/dino features at 224 (table as stored), 336 and 448."""
    expected = torch.from_numpy(golden[f"features/{size}x{size}"])
    out = golden_dino.encode(_golden_input(golden, size))
    assert out.shape == expected.shape == (1, 64, size // 8, size // 8) and out.dtype == torch.float64
    assert (out - expected).abs().max().item() <= 1e-10


@pytest.mark.parametrize("size", [224, 336, 448])
def test_timm_resampling_is_not_published_dino(golden, golden_dino, size):
    """The test above can fail: timm's own (antialiased, exact-size) resampling is far from golden
    wherever it resamples; at the stored grid both use the table as stored."""
    expected = torch.from_numpy(golden[f"features/{size}x{size}"])
    with torch.no_grad():
        tokens = golden_dino.model.forward_features(_golden_input(golden, size))
    timm_out = tokens[:, 1:].transpose(1, 2).reshape(expected.shape)
    diff = (timm_out - expected).abs().max().item()
    if size == 224:
        assert diff <= 1e-10
    else:
        assert diff > 0.05


def test_features_float32_path_matches_published_dino(golden, golden_dino):
    rgb01 = torch.from_numpy(golden["rgb255/336x336"]).permute(2, 0, 1)[None].float() / 255.0
    out = golden_dino.features(rgb01)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.from_numpy(golden["features/336x336"]).float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("h, w", [(336, 448), (224, 392), (448, 224), (112, 448)])
def test_dino_non_square_follows_published_rule_per_axis(golden_dino, h, w):
    """Rows get (rows + 0.1)/28, columns (cols + 0.1)/28; 112x448 has 28*28 patches but is not the stored
    grid, so it is resampled too (published: ``npatch == N and w == h``)."""
    x = _imagenet(torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h + w), dtype=torch.float64))
    model = golden_dino.model
    expected = _plain_forward(model, x, _published_dino_table(model, h // 8, w // 8))
    out = golden_dino.encode(x)
    assert out.shape == (2, 64, h // 8, w // 8)
    assert (out - expected).abs().max().item() <= 1e-10
    # rows and columns swapped in the table would be visibly different
    swapped = _published_dino_table(model, w // 8, h // 8).transpose(-1, -2)
    assert (swapped - _published_dino_table(model, h // 8, w // 8)).abs().max() > 1e-3


def test_dino_position_table_contract(golden_dino):
    table = golden_dino.model.pos_embed
    assert dino_position_table(table, (28, 28)) is table  # the stored grid: as stored
    out = dino_position_table(table, (42, 35))
    assert out.shape == (1, 1 + 42 * 35, 64) and out.dtype == table.dtype
    assert torch.equal(out[:, 0], table[:, 0])  # CLS row untouched
    expected = _published_dino_table(golden_dino.model, 42, 35).permute(0, 2, 3, 1).reshape(1, -1, 64)
    assert torch.equal(out[:, 1:], expected)
    with pytest.raises(ValueError, match="not a square grid"):
        dino_position_table(table[:, :-1], (4, 4))
    with pytest.raises(ValueError, match="must be positive"):
        dino_position_table(table, (0, 4))


def test_dino_position_table_works_in_fp16():
    table = torch.randn(1, 1 + 28 * 28, 8).half()
    out = dino_position_table(table, (42, 42))
    assert out.dtype == torch.float16 and out.shape == (1, 1 + 42 * 42, 8)


@pytest.mark.parametrize("h, w", [(64, 96), (72, 40), (224, 224)])
def test_tiny_proxy_follows_published_dino_rule(proxy64, h, w):
    x = _imagenet(torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h * w), dtype=torch.float64))
    expected = _plain_forward(proxy64.model, x, _published_dino_table(proxy64.model, h // 8, w // 8))
    out = proxy64.encode(x)
    assert out.shape == (2, 32, h // 8, w // 8) and out.dtype == torch.float64
    assert (out - expected).abs().max().item() <= 1e-10


def test_dinov2_keeps_timm_rule_which_is_published_dinov2():
    """DINOv2 with registers (published: size=(rows, cols), bicubic, antialias, float32; registers without
    position; timm folds the CLS position into the CLS token) on a small random model, non-square."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = VisionTransformer(img_size=70, patch_size=14, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                                  reg_tokens=4, no_embed_class=True, init_values=1e-5,
                                  dynamic_img_size=True).double().eval()
        torch.nn.init.normal_(model.pos_embed, std=0.5)
    proxy = ProxyModel("dinov2-b14-reg", model, device=CPU, is_test_model=True)
    x = _imagenet(torch.rand(1, 3, 98, 140, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    table = model.pos_embed.reshape(1, 5, 5, -1).permute(0, 3, 1, 2)
    published = F.interpolate(table.float(), size=(7, 10), mode="bicubic", align_corners=False,
                              antialias=True).double()
    layout = dict(reg_tokens=4, no_embed_class=True, init_values=1e-5)
    out = proxy.encode(x)
    assert out.shape == (1, 32, 7, 10)
    assert (out - _plain_forward(model, x, published, **layout)).abs().max().item() <= 1e-10
    dino_rule = F.interpolate(table, scale_factor=(7.1 / 5, 10.1 / 5), mode="bicubic", align_corners=False)
    assert (out - _plain_forward(model, x, dino_rule, **layout)).abs().max().item() > 1e-3


# -- input chains -----------------------------------------------------------------------------------
def test_features_from_clip_pixels_follows_published_chain(proxy64):
    """mmseg-normalised 0-255 RGB (zero-padded in that space) -> x*OpenAI std + OpenAI mean ->
    (x - ImageNet mean)/ImageNet std, in float32 -> the model's dtype."""
    g = torch.Generator().manual_seed(11)
    rgb255 = torch.randint(0, 256, (2, 3, 40, 56), generator=g).float()
    pixels = (rgb255 - _chan(CLIP_PIXEL_MEAN_255, torch.float32)) / _chan(CLIP_PIXEL_STD_255, torch.float32)
    pixels = F.pad(pixels, (4, 4, 0, 8))  # (2, 3, 48, 64): zero padding in CLIP-normalised space
    unnorm = pixels * _chan(OPENAI_STD, torch.float32) + _chan(OPENAI_MEAN, torch.float32)
    proxy_input = ((unnorm - _chan(IMAGENET_MEAN, torch.float32)) / _chan(IMAGENET_STD, torch.float32)).double()
    expected = _plain_forward(proxy64.model, proxy_input, _published_dino_table(proxy64.model, 6, 8))
    out = proxy64.features_from_clip_pixels(pixels)
    assert out.shape == (2, 32, 6, 8) and out.dtype == torch.float64
    assert (out - expected).abs().max().item() <= 1e-10
    # the padding is OpenAI's mean colour to the proxy, not black: it matters
    black = proxy_input.clone()
    black[..., -8:, :] = _imagenet(torch.zeros(1, 3, 1, 1, dtype=torch.float64))
    assert (proxy64.encode(black) - out).abs().max() > 1e-3
    # mmseg's constants are OpenAI's * 255 rounded, so the chain is close to, not equal to, plain ImageNet
    assert max(abs(a * 255 - b) for a, b in zip(OPENAI_STD, CLIP_PIXEL_STD_255)) > 1e-4


def test_features_from_clip_pixels_keeps_model_dtype():
    model = tiny_test_proxy().half().eval()
    proxy = ProxyModel("tiny-test", model, device=CPU, is_test_model=True)
    pixels = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    out = proxy.features_from_clip_pixels(pixels)
    assert out.dtype == torch.float16 and out.shape == (1, 32, 4, 6)
    ref = ProxyModel("tiny-test", tiny_test_proxy().eval(), device=CPU, is_test_model=True)
    torch.testing.assert_close(out.float(), ref.features_from_clip_pixels(pixels), rtol=0, atol=5e-3)  # measured 2.5e-3


def test_features_from_clip_pixels_rejects_bad_input(proxy):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        proxy.features_from_clip_pixels(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="not a whole number of 8-pixel proxy patches"):
        proxy.features_from_clip_pixels(torch.rand(1, 3, 36, 32))


@pytest.mark.parametrize("h, w", [(64, 96), (72, 40), (70, 100)])
def test_features_normalise_with_imagenet_and_crop(proxy, h, w):
    rgb = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    out = proxy.features(rgb)
    assert out.shape == (2, 32, h // 8, w // 8) and out.dtype == torch.float32 and not out.requires_grad
    x = _imagenet(rgb[:, :, : h // 8 * 8, : w // 8 * 8])
    expected = _plain_forward(proxy.model, x, _published_dino_table(proxy.model, h // 8, w // 8))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_features_accept_other_dtypes_and_depend_on_the_image(proxy):
    rgb = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    ref = proxy.features(rgb)
    torch.testing.assert_close(proxy.features(rgb.double()), ref)
    assert proxy.features(rgb.half()).dtype == torch.float32
    other = proxy.features(torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1)))
    assert (other - ref).abs().max() > 1e-3


def test_features_reject_bad_input(proxy):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        proxy.features(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="smaller than one 8-pixel proxy patch"):
        proxy.features(torch.rand(1, 3, 4, 32))
