"""fsa.proxies: the MAE and SAM proxies, exact against the published code, and the stand-ins of each family.

Goldens: tests/data/published_mae_small.npz and published_sam_small.npz hold features of small random
MAE and SAM encoders computed by the published model files as FSA_Proxy_segmentor.py runs them (see
the README there). The real ViT-B sizes are checked with seeded random weights saved as the original
release files (marked slow).
"""
from __future__ import annotations

import json
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_sam import VisionTransformerSAM

from _golden import load_golden
from _pixels import CPU, OPENAI_MEAN, OPENAI_STD
from _pixels import channels as _chan
from _pixels import imagenet as _imagenet
from fsa.hub import WeightsUnavailableError
from fsa.config import PROXIES, TINY_PROXIES, default_lambda
from fsa.proxies import (
    ProxyModel,
    load_proxy,
    mae_position_table,
    proxy_cache_key,
    proxy_for_backbone,
    proxy_spec,
    resolve_proxy_name,
)
from fsa.proxy_models import build_proxy_model, load_proxy_state

MAE_INPUTS = ("224x224", "336x336", "448x448", "280x392")
SAM_INPUTS = ("336x336", "224x224", "280x392")


def _rgb01(golden, key: str) -> torch.Tensor:
    return torch.from_numpy(golden[f"rgb255/{key}"]).permute(2, 0, 1)[None].double() / 255.0


def _openai_pixels(rgb01: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised pixels whose un-normalisation (x·std + mean, OpenAI's) gives rgb01 back in float64."""
    return (rgb01 - _chan(OPENAI_MEAN)) / _chan(OPENAI_STD)


# -- goldens -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mae_golden():
    return load_golden("published_mae_small.npz")


@pytest.fixture(scope="module")
def sam_golden():
    return load_golden("published_sam_small.npz")


@pytest.fixture(scope="module")
def mae64(mae_golden) -> ProxyModel:
    """The golden's 224 checkpoint in the timm container, as an mae-b16 proxy (float64)."""
    cfg = json.loads(str(mae_golden["config_json"]))
    model = VisionTransformer(img_size=cfg["checkpoint_img_size"], patch_size=cfg["patch_size"],
                              embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"],
                              mlp_ratio=cfg["mlp_ratio"], qkv_bias=cfg["qkv_bias"], num_classes=0,
                              dynamic_img_size=True).double().eval()
    model.load_state_dict({k[6:]: torch.from_numpy(mae_golden[k]) for k in mae_golden.files if k.startswith("state/")})
    return ProxyModel("mae-b16", model, device=CPU, is_test_model=True)


def _sam_container(cfg: dict, eps: float = 1e-6) -> VisionTransformerSAM:
    return VisionTransformerSAM(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"], depth=cfg["depth"],
        num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"], qkv_bias=cfg["qkv_bias"],
        use_rel_pos=cfg["use_rel_pos"], window_size=cfg["window_size"],
        global_attn_indexes=tuple(cfg["global_attn_indexes"]), neck_chans=cfg["out_chans"], num_classes=0,
        norm_layer=partial(torch.nn.LayerNorm, eps=eps)).double().eval()


@pytest.fixture(scope="module")
def sam64(sam_golden, tmp_path_factory) -> ProxyModel:
    """The golden's encoder (sam_vit_b_01ec64.pth key names, a prompt-encoder key beside it) loaded by
    fsa's strict SAM loading, float64."""
    model = _sam_container(json.loads(str(sam_golden["config_json"])))
    state = {k[6:]: torch.from_numpy(sam_golden[k]) for k in sam_golden.files if k.startswith("state/")}
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.zeros(2, 16)  # dropped
    path = tmp_path_factory.mktemp("sam") / "sam_small.pth"
    torch.save(state, path)
    load_proxy_state(model, "sam", str(path), what="SAM")
    return ProxyModel("sam-b16", model, device=CPU, is_test_model=True)


@pytest.mark.parametrize("crop", [336, 224, 448])
def test_mae_position_table_is_published_interpolate_pos_embed(mae_golden, mae64, crop):
    table = mae64.model.pos_embed.detach()
    out = mae_position_table(table, crop // 16)
    assert out.shape == (1, 1 + (crop // 16) ** 2, 64)
    assert torch.equal(out, torch.from_numpy(mae_golden[f"pos_embed/{crop}"]))
    assert mae_position_table(table, 14) is table  # the stored grid: as stored


@pytest.mark.parametrize("crop", [336, 224, 448])
@pytest.mark.parametrize("key", MAE_INPUTS)
def test_mae_matches_published_through_both_doors(mae_golden, mae64, crop, key):
    """float64: features(rgb01, crop) and the published chain from CLIP-normalised pixels, every input
    (280x392 included: squashed to crop²) at every slide_crop."""
    expected = torch.from_numpy(mae_golden[f"features/{crop}/{key}"])
    rgb01 = _rgb01(mae_golden, key)
    for out in (mae64.features(rgb01, crop=crop), mae64.features_from_clip_pixels(_openai_pixels(rgb01), crop=crop)):
        assert out.shape == expected.shape == (1, 64, crop // 16, crop // 16) and out.dtype == torch.float64
        assert (out - expected).abs().max().item() <= 1e-10
    assert mae64.grid(*rgb01.shape[-2:], crop) == (crop // 16, crop // 16)


@pytest.mark.parametrize("crop", [336, 448])
def test_timm_resampling_is_not_published_mae(mae_golden, mae64, crop):
    """The test above can fail: timm's own (antialiased) resampling on the same squashed input is far off."""
    expected = torch.from_numpy(mae_golden[f"features/{crop}/336x336"])
    x = F.interpolate(_imagenet(_rgb01(mae_golden, "336x336")), size=(crop, crop), mode="bilinear",
                      align_corners=False)
    with torch.no_grad():
        tokens = mae64.model.forward_features(x)
    timm_out = tokens[:, 1:].transpose(1, 2).reshape(expected.shape)
    assert (timm_out - expected).abs().max().item() > 0.05


def test_mae_without_crop_squashes_to_the_longer_side(mae64):
    x = torch.rand(1, 3, 112, 168, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = mae64.features(x)
    assert out.shape == (1, 64, 10, 10) and mae64.grid(112, 168) == (10, 10) == proxy_spec("mae-b16").grid(112, 168)
    assert torch.equal(out, mae64.features(x, crop=168))


@pytest.mark.parametrize("key", SAM_INPUTS)
def test_sam_matches_published_through_both_doors(sam_golden, sam64, key):
    """float64: 1024² squash, block LayerNorm eps 1e-6, neck output (B, 32, 64, 64)."""
    expected = torch.from_numpy(sam_golden[f"features/{key}"])
    rgb01 = _rgb01(sam_golden, key)
    for out in (sam64.features(rgb01), sam64.features_from_clip_pixels(_openai_pixels(rgb01), crop=336)):
        assert out.shape == expected.shape == (1, 32, 64, 64) and out.dtype == torch.float64
        assert (out - expected).abs().max().item() <= 1e-10
    assert sam64.grid(*rgb01.shape[-2:]) == (64, 64) == proxy_spec("sam-b16").grid(*rgb01.shape[-2:])


def test_sam_block_eps_matters(sam_golden, sam64):
    """The test above can fail: timm's registered eps (1e-5) gives other features."""
    cfg = json.loads(str(sam_golden["config_json"]))
    other = _sam_container(cfg, eps=1e-5)
    other.load_state_dict(sam64.model.state_dict())
    proxy = ProxyModel("sam-b16", other, device=CPU, is_test_model=True)
    diff = (proxy.features(_rgb01(sam_golden, "224x224")) - torch.from_numpy(sam_golden["features/224x224"]))
    assert diff.abs().max().item() > 1e-6


# -- names, specs, stand-ins --------------------------------------------------------------------------
def test_names_aliases_and_stand_ins():
    assert PROXIES == ("dino-b8", "dinov2-b14-reg", "mae-b16", "sam-b16")
    assert resolve_proxy_name("MAE-B16") == "mae-b16" and resolve_proxy_name("sam") == "sam-b16"
    assert resolve_proxy_name("dinov2") == "dinov2-b14-reg" and resolve_proxy_name("tiny-test-sam") == "tiny-test-sam"
    with pytest.raises(ValueError, match="unknown proxy model 'sam-l16'.*mae-b16, sam-b16"):
        resolve_proxy_name("sam-l16")
    assert proxy_for_backbone("SAM", "tiny-test") == "tiny-test-sam" == TINY_PROXIES["sam-b16"]
    assert proxy_for_backbone("dino-b8", "tiny-test") == "tiny-test"
    assert proxy_for_backbone("mae", "ViT-B-16") == "mae-b16"
    assert len({proxy_cache_key(n, "cpu") for n in (*PROXIES, *TINY_PROXIES.values())}) == 8


def test_lambda_per_proxy():
    """FSA's hyper_param.txt: 4.5 for MAE with every backbone; SAM, DINO, DINOv2 as without a proxy."""
    for backbone in ("ViT-B-16", "ViT-L-14", "ViT-H-14", "tiny-test"):
        assert default_lambda(backbone, "mae-b16") == default_lambda(backbone, "tiny-test-mae") == 4.5
        for proxy in ("sam-b16", "dino-b8", "dinov2-b14-reg", None):
            assert default_lambda(backbone, proxy) == default_lambda(backbone) == (2.3 if "H-14" in backbone else 3.0)


def test_specs_of_the_real_proxies():
    sam, mae = proxy_spec("sam-b16"), proxy_spec("mae-b16")
    assert (sam.family, sam.patch_size, sam.heads, sam.channels, sam.label) == ("sam", 16, 12, 256, "SAM ViT-B/16")
    assert sam.hub_repo == "timm/samvit_base_patch16.sa1b" and sam.original_file == "sam_vit_b_01ec64.pth"
    assert mae.hub_repo == "timm/vit_base_patch16_224.mae" and mae.original_file == "mae_pretrain_vit_base.pth"
    assert sam.tokens(336, 448, 336) == 4096 and sam.grid(56, 1008) == (64, 64)
    assert mae.grid(280, 392, 336) == (21, 21) and mae.tokens(336, 336, 336) == 442
    dino, dinov2 = proxy_spec("dino-b8"), proxy_spec("dinov2-b14-reg")
    assert dino.grid(280, 392, 336) == (35, 49) and dino.tokens(336, 336) == 42 * 42 + 1
    assert dinov2.grid(336, 448) == (24, 32) and dinov2.tokens(336, 448) == 24 * 32 + 5
    assert all(proxy_spec(n).heads == 12 and not proxy_spec(n).is_test_model for n in PROXIES)


@pytest.mark.parametrize("name", sorted(TINY_PROXIES.values()))
@pytest.mark.parametrize("h, w, crop", [(112, 168, 112), (168, 112, None), (224, 224, 224)])
def test_stand_ins_have_their_family_geometry(name, h, w, crop):
    """Each stand-in's features have the grid its spec announces (square for MAE and SAM on non-square
    windows), and the stand-ins are seeded."""
    proxy = load_proxy(name, device="cpu")
    spec = proxy.spec
    assert proxy.is_test_model and spec.is_test_model and proxy.family == spec.family
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h + w))
    out = proxy.features_from_clip_pixels(x, crop=crop)
    assert out.shape == (1, spec.channels, *spec.grid(h, w, crop)) == (1, 32, *proxy.grid(h, w, crop))
    again = load_proxy(name, device="cpu").features_from_clip_pixels(x, crop=crop)
    assert torch.equal(out, again)


# -- weights: strict, original files, offline --------------------------------------------------------------
def test_wrong_family_is_refused_with_the_file_name(tmp_path, monkeypatch):
    path = tmp_path / "sam_small.pth"
    torch.save(build_proxy_model("sam", stand_in=True).state_dict(), path)
    monkeypatch.setenv("FSA_PROXY_CHECKPOINT", str(path))
    with pytest.raises(WeightsUnavailableError, match=r"sam_small\.pth is not proxy mae-b16 \(MAE ViT-B/16\) "
                                                      r"weights: it looks like a SAM image encoder"):
        load_proxy("mae-b16", device="cpu")


def test_missing_keys_are_refused_and_nothing_is_loaded(tmp_path):
    """Published MAE loads with strict=False (a missing final norm stays at its init): we refuse, and the
    container keeps its weights."""
    source = build_proxy_model("mae", stand_in=True, seed=1).state_dict()
    del source["norm.weight"]
    path = tmp_path / "mae_finetuned.pth"
    torch.save({"model": source}, path)
    target = build_proxy_model("mae", stand_in=True, seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsUnavailableError, match=r"mae_finetuned\.pth .*1 missing keys \(e\.g\. norm\.weight\)"):
        load_proxy_state(target, "mae", str(path), what="MAE")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_unreadable_checkpoint_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    monkeypatch.setenv("FSA_PROXY_CHECKPOINT", str(path))
    with pytest.raises(WeightsUnavailableError, match=r"could not read proxy checkpoint .*notes\.pth"):
        load_proxy("sam-b16", device="cpu")


@pytest.mark.parametrize("name, repo, original", [
    ("mae-b16", "timm/vit_base_patch16_224.mae", "mae_pretrain_vit_base.pth"),
    ("sam-b16", "timm/samvit_base_patch16.sa1b", "sam_vit_b_01ec64.pth"),
])
def test_offline_names_repo_file_and_the_way_out(name, repo, original, monkeypatch):
    import huggingface_hub

    import fsa.hub
    import fsa.proxies

    monkeypatch.delenv("FSA_PROXY_CHECKPOINT", raising=False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: True)
    # fails fast: before probing the hub, downloading or building the ViT-B (its time: `python -m fsa bench
    # --startup`)
    slow_steps = []
    for module, attr in ((fsa.hub, "_hub_unreachable"), (huggingface_hub, "hf_hub_download"),
                         (fsa.proxies, "build_proxy_model"), (fsa.proxies.timm, "create_model")):
        monkeypatch.setattr(module, attr, lambda *a, _attr=attr, **k: slow_steps.append(_attr) or None)
    with pytest.raises(WeightsUnavailableError) as info:
        load_proxy(name, device="cpu")
    assert slow_steps == []
    message = str(info.value)
    assert "\n" not in message
    for text in (repo, "model.safetensors", "FSA_PROXY_CHECKPOINT", original, f"proxy {name}"):
        assert text in message, text


# -- real ViT-B sizes, random weights saved as the original release files -------------------------------
def _random_real(family: str, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "mae":
            model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        else:
            model = timm.create_model("samvit_base_patch16", pretrained=False, num_classes=0,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
            with torch.no_grad():  # timm leaves these at zero
                for key, param in model.named_parameters():
                    if key == "pos_embed" or key.endswith(("rel_pos_h", "rel_pos_w")):
                        param.normal_(0.0, 0.05)
    return model.eval()


@pytest.mark.slow
def test_original_mae_file_full_size(tmp_path, monkeypatch):
    """mae_pretrain_vit_base.pth layout ({'model': ...}, plus decoder keys of the full pre-training files):
    float32 features within 1e-3 of the published path in float64 (a model built at img_size=crop with
    the table resampled by interpolate_pos_embed, the input squashed to crop²)."""
    source = _random_real("mae", seed=3)
    state = dict(source.state_dict())
    path = tmp_path / "mae_pretrain_vit_base.pth"
    decoder = {"mask_token": torch.zeros(1, 1, 512), "decoder_embed.weight": torch.zeros(512, 768)}
    torch.save({"model": {**state, **decoder}}, path)
    monkeypatch.setenv("FSA_PROXY_CHECKPOINT", str(path))
    proxy = load_proxy("mae-b16", device="cpu")
    assert proxy.dtype == torch.float32 and proxy.grid(280, 392, 448) == (28, 28)
    rgb01 = torch.rand(1, 3, 280, 392, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    crop = 448
    reference = VisionTransformer(img_size=crop, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                  num_classes=0).double().eval()
    table = state["pos_embed"].double()
    grid = F.interpolate(table[:, 1:].reshape(1, 14, 14, 768).permute(0, 3, 1, 2), size=(28, 28), mode="bicubic",
                         align_corners=False)
    reference.load_state_dict({**{k: v.double() for k, v in state.items()},
                               "pos_embed": torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], 1)})
    x = F.interpolate(_imagenet(rgb01), size=(crop, crop), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = reference.forward_features(x)[:, 1:].transpose(1, 2).reshape(1, 768, 28, 28)
    out = proxy.features(rgb01.float(), crop=crop)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert (out.double() - expected).abs().max().item() <= 1e-3
    assert expected.abs().max().item() > 0.5  # not a degenerate comparison


@pytest.mark.slow
def test_original_sam_file_full_size(tmp_path, monkeypatch):
    """sam_vit_b_01ec64.pth layout (the whole SAM state: image_encoder.* with mlp.lin1/lin2, prompt encoder
    and mask decoder beside it): float32 features within 1e-3 of the float64 encoder on the 1024² squash."""
    source = _random_real("sam", seed=4)
    state = {f"image_encoder.{k.replace('mlp.fc', 'mlp.lin')}": v for k, v in source.state_dict().items()}
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    state["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(state, path)
    monkeypatch.setenv("FSA_PROXY_CHECKPOINT", str(path))
    proxy = load_proxy("sam-b16", device="cpu")
    rgb01 = torch.rand(1, 3, 280, 392, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    reference = source.double()
    x = F.interpolate(_imagenet(rgb01), size=(1024, 1024), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = reference.forward_features(x)
    out = proxy.features(rgb01.float())
    assert out.dtype == torch.float32 and out.shape == expected.shape == (1, 256, 64, 64)
    assert (out.double() - expected).abs().max().item() <= 1e-3
    assert expected.abs().max().item() > 0.5
