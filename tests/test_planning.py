"""fsa.planning: what a request costs before any forward pass (working size, windows, tokens, heads, depth),
checked against hand arithmetic; the proxies' geometry against the models themselves; the demo's budgets
on a plan; and that the demo decodes an upload and parses a vocabulary once per request."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import fsa
from fsa import planning, segmenter as segmenter_module
from fsa.config import SegmentSettings
from fsa.planning import RequestPlan, VisionGeometry, clip_geometry, plan_request, plan_windows
from fsa.proxies import proxy_spec, tiny_test_proxy
from fsa.vocabulary import Vocabulary, parse_vocabulary

VIT_B16 = VisionGeometry(patch_size=16, heads=12, depth=12)
DINO_B8 = proxy_spec("dino-b8")


def settings(method: str, **kwargs) -> SegmentSettings:
    return SegmentSettings(method=method, **kwargs)


# --------------------------------------------------------------------------- geometry of the models
@pytest.mark.parametrize("name, timm_name", [("dino-b8", "vit_base_patch8_224.dino"),
                                             ("dinov2-b14-reg", "vit_base_patch14_reg4_dinov2.lvd142m")])
def test_proxy_geometry_is_the_models(name, timm_name):
    with torch.device("meta"):  # the architecture only: no weights, no memory
        model = timm.create_model(timm_name, pretrained=False, dynamic_img_size=True, num_classes=0)
    geometry = proxy_spec(name.upper())
    assert geometry.patch_size == model.patch_embed.patch_size[0]
    assert geometry.heads == model.blocks[-1].attn.num_heads
    assert geometry.prefix_tokens == model.num_prefix_tokens
    assert geometry.grid(336, 448) == (336 // geometry.patch_size, 448 // geometry.patch_size)
    assert geometry.tokens(336, 448) == (336 // geometry.patch_size) * (448 // geometry.patch_size) + \
        model.num_prefix_tokens


def test_tiny_proxy_geometry_is_the_models():
    model = tiny_test_proxy()
    geometry = proxy_spec(fsa.TINY_TEST)
    assert (geometry.patch_size, geometry.heads, geometry.prefix_tokens) == (8, 2, 1)
    assert (model.patch_embed.patch_size[0], model.blocks[0].attn.num_heads, model.num_prefix_tokens) == (8, 2, 1)
    for name in fsa.PROXIES:
        assert proxy_spec(name).patch_size >= 8
    with pytest.raises(ValueError, match="unknown proxy model"):
        proxy_spec("no-such-proxy")


def test_clip_geometry_of_the_tiny_model():
    clip = fsa.Segmenter(fsa.TINY_TEST, device="cpu").load()
    # tiny_test_clip: patch 16, width 64 in heads of 16 channels, 4 blocks
    assert clip_geometry(clip) == VisionGeometry(patch_size=16, heads=64 // 16, depth=4)


# --------------------------------------------------------------------------- windows by hand
def test_clearclip_windows_on_a_4_3_photo():
    # 480×640 (h×w) at short side 448: 448 × round(640·448/480 = 597.3) = 597
    plan = plan_windows(settings("clearclip"), (480, 640), VIT_B16)
    assert plan.working_size == (448, 597)
    # crop 448 ≥ 448 rows: one row of windows; columns start at 0 and 597 − 448 = 149
    assert plan.windows == 2 and plan.window_size == plan.padded_size == (448, 448)
    assert plan.clip_grid == (28, 28) and plan.proxy_grid is None
    assert plan.tokens == 784 and plan.heads == 12


def test_sclip_windows_are_not_padded():
    # short side 336: 336 × 448; crop 224, stride 112 → rows {0, 112}, columns {0, 112, 224}
    plan = plan_windows(settings("sclip"), (480, 640), VIT_B16)
    assert plan.working_size == (336, 448) and plan.windows == 2 * 3
    assert plan.window_size == plan.padded_size == (224, 224) and plan.tokens == 14 * 14


def test_a_crop_that_is_no_multiple_of_the_patch_is_padded():
    # ClearCLIP pads each window to a multiple of the patch: 100 → 112, a 7 × 7 grid
    plan = plan_windows(settings("clearclip", crop=100, stride=100), (480, 640), VIT_B16)
    assert plan.window_size == (100, 100) and plan.padded_size == (112, 112) and plan.tokens == 49
    # rows of 448: starts 0, 100, 200, 300 and 348 (the last one ends at the border); columns of 597: 0, 100,
    # ..., 400 and 497
    assert plan.windows == 5 * 6


def test_proxyclip_counts_the_proxys_patches_and_heads():
    # 336 × 448, crop 336 stride 112: one row, columns {0, 112}; 336 is a multiple of 56: no padding
    plan = plan_windows(settings("proxyclip"), (480, 640), VIT_B16, DINO_B8)
    assert plan.windows == 2 and plan.padded_size == (336, 336)
    assert plan.clip_grid == (21, 21) and plan.proxy_grid == (42, 42)
    assert plan.tokens == 42 * 42 and plan.heads == 12
    tiny = plan_windows(settings("proxyclip"), (480, 640), VisionGeometry(16, 4, 4), proxy_spec(fsa.TINY_TEST))
    assert tiny.heads == 4 and tiny.proxy_attention == (2, 42 * 42 + 1)  # CLIP's heads; the proxy's apart


def test_whole_image_passes_pad_only_for_a_proxy():
    # 500×700 at short side 336: 336 × round(470.4) = 470
    whole = plan_windows(settings("proxyclip", crop=0), (500, 700), VIT_B16, DINO_B8)
    assert whole.working_size == (336, 470) and whole.windows == 1
    # a proxy needs whole proxy patches: 470 → the next multiple of 56, 504
    assert whole.padded_size == (336, 504)
    assert whole.clip_grid == (21, 504 // 16) and whole.proxy_grid == (42, 63) and whole.tokens == 42 * 63
    # without a proxy the published whole-image pass runs unpadded: the patch embedding drops the rest
    plain = plan_windows(settings("clearclip", crop=0), (500, 700), VIT_B16)
    assert plain.working_size == (448, 627) and plain.padded_size == (448, 627)
    assert plain.clip_grid == (28, 39) and plain.tokens == 28 * 39


# --------------------------------------------------------------------------- a request
@pytest.fixture
def photo(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (120, 180, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(rgb).save(path)
    return str(path)


def test_plan_request_decodes_once_to_the_largest_working_size(photo):
    seg = fsa.Segmenter(fsa.TINY_TEST, device="cpu")
    plan = plan_request(seg, photo, "cat; kitten, sofa", [settings("clearclip", short_side=48),
                                                          settings("proxyclip", short_side=64)])
    assert isinstance(plan, RequestPlan) and plan.queries == 3
    assert plan.vocabulary == parse_vocabulary("cat; kitten, sofa")
    # the larger short side: 64 × 180·64/120 = 96, decoded at that size
    assert plan.working_size == (64, 96) and plan.image.rgb.shape == (64, 96, 3)
    assert plan.image.source_size == (180, 120)
    assert plan.clip == VisionGeometry(16, 4, 4)
    first, second = plan.windows
    assert first.working_size == (48, 72) and first.proxy_grid is None
    # tiny proxy, patch 8; proxyclip's crop 336 covers 64 × 96 whole, padded to multiples of 56: 112 × 112
    assert second.padded_size == (112, 112) and second.proxy_grid == (14, 14) and second.tokens == 196
    with pytest.raises(ValueError, match="the vocabulary is empty"):
        plan_request(seg, photo, " , ", [settings("clearclip")])
    with pytest.raises(ValueError, match="decodes at most"):
        plan_request(seg, photo, "cat", [settings("clearclip")], max_pixels=100)


def test_a_parsed_vocabulary_passes_through_with_its_size_checked():
    vocab = parse_vocabulary("cat; kitten, sofa")
    assert parse_vocabulary(vocab) is vocab
    with pytest.raises(ValueError, match="the vocabulary has 3 names; at most 2"):
        parse_vocabulary(vocab, max_names=2)


# --------------------------------------------------------------------------- the demo's budgets on a plan
def test_fit_to_budget_shrinks_the_batch_and_refuses_a_window_too_large(photo):
    from fsa.demo.limits import ATTENTION_BUDGET_BYTES, OverBudget, RuntimeLimits, fit_to_budget

    def plan_of(*window_plans, queries=3):
        vocab = Vocabulary(tuple((f"c{i}",) for i in range(queries)))
        return RequestPlan(image=None, vocabulary=vocab, clip=VIT_B16, working_size=(336, 448),
                           windows=tuple(window_plans))

    proxy = plan_windows(settings("proxyclip"), (480, 640), VIT_B16, DINO_B8)
    # the DINO proxy's own forward, 12 heads × (1764 + 1)² float32, two copies (more than CLIP's and the
    # affinity's): 3 windows fit in 1 GiB, not the default 4
    per_window = 12 * 1765 ** 2 * 4 * 2
    assert ATTENTION_BUDGET_BYTES // per_window == 3
    fitted = fit_to_budget(plan_of(proxy), RuntimeLimits(), [settings("proxyclip")])
    assert fitted == [settings("proxyclip", window_batch=3)]
    small = plan_windows(settings("sclip"), (480, 640), VIT_B16)
    assert fit_to_budget(plan_of(small), RuntimeLimits(), [settings("sclip")])[0] is not None
    huge = plan_windows(settings("clearclip", crop=0, short_side=2048), (1500, 2000), VIT_B16)
    with pytest.raises(OverBudget, match=rf"A 2048×1536-pixel window \({96 * 128} patches\)"):
        fit_to_budget(plan_of(huge), RuntimeLimits(), [settings("clearclip", crop=0, short_side=2048)])
    with pytest.raises(OverBudget, match="has 4 names"):
        fit_to_budget(plan_of(small, queries=4), RuntimeLimits(max_classes=3), [settings("sclip")])


def test_the_demo_decodes_and_parses_once_per_request(photo, monkeypatch):
    from fsa.demo.handlers import DemoApp

    app = DemoApp(short_side=64)
    seen = {"decoded": 0, "parsed": [], "segmenter_images": []}
    real_read, real_parse = planning.read_bounded, segmenter_module.parse_vocabulary
    real_to_rgb = segmenter_module.to_rgb_uint8

    def read(*args, **kwargs):
        seen["decoded"] += 1
        return real_read(*args, **kwargs)

    def parse(text, **kwargs):
        seen["parsed"].append(type(text).__name__)
        return real_parse(text, **kwargs)

    def to_rgb(image):
        seen["segmenter_images"].append(type(image).__name__)
        return real_to_rgb(image)

    monkeypatch.setattr(planning, "read_bounded", read)
    monkeypatch.setattr(planning, "parse_vocabulary", parse)
    monkeypatch.setattr(segmenter_module, "parse_vocabulary", parse)
    monkeypatch.setattr(segmenter_module, "to_rgb_uint8", to_rgb)
    app.api_segment(None, photo, "cup; mug, table", "clearclip", True, True, True, True, 3.0, 0.45, progress=None)
    # one decode and one parse of the text; the segmenter gets the decoded pixels and the parsed vocabulary
    assert seen == {"decoded": 1, "parsed": ["str", "Vocabulary"], "segmenter_images": ["ndarray"]}
