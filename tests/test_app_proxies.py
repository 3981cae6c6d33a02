"""ProxyCLIP's four proxies in the demo: the selector's λ, the run summary and the progress naming the proxy,
the clicked-patch view on every proxy grid (tiny-test stand-ins), and the memory budget per proxy (CLIP's heads,
the proxy's own forward, ProxyCLIP's one N×N affinity) against hand arithmetic."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from fsa.config import METHOD_DEFAULTS, PROXIES, TINY_PROXIES, SegmentSettings
from fsa.demo import limits
from fsa.demo.forms import MEAN_HEADS
from fsa.demo.guards import friendly_errors
from fsa.demo.handlers import DemoApp
from fsa.demo.limits import ATTENTION_BUDGET_BYTES, OverBudget, RuntimeLimits, fit_to_budget
from fsa.planning import RequestPlan, VisionGeometry, plan_windows
from fsa.proxies import proxy_spec
from fsa.proxy_models import build_proxy_model, sam_features
from fsa.vocabulary import Vocabulary

REPO = Path(__file__).resolve().parents[1]
VOCAB = "cup; mug, table, background"
W, H = 200, 64  # a wide image: at short side 64 one 64×200 window, padded to 112×224 (multiples of 56)
VIT_B16 = VisionGeometry(patch_size=16, heads=12, depth=12)
#: the tiny stand-ins' grids of a 112×224 window at ProxyCLIP's crop 336, by hand: DINO patch 8 → 14×28;
#: DINOv2 patch 14 → 8×16; MAE squashed to 336² → 21×21; SAM squashed to 1024² → 64×64
TINY_GRIDS = {"dino-b8": (14, 28), "dinov2-b14-reg": (8, 16), "mae-b16": (21, 21), "sam-b16": (64, 64)}
TINY_LABELS = {"dino-b8": "random DINO stand-in", "dinov2-b14-reg": "random DINOv2 stand-in",
               "mae-b16": "random MAE stand-in", "sam-b16": "random SAM stand-in"}


@pytest.fixture(scope="module")
def app():
    return DemoApp(short_side=64)


@pytest.fixture(scope="module")
def wide():
    return Image.open(REPO / "examples" / "coffee.jpg").convert("RGB").resize((W, H))


def run(app, image, proxy, progress=None, method="proxyclip"):
    d = METHOD_DEFAULTS[method]
    return friendly_errors(app.run)(None, image, VOCAB, method, app.default_backbone, True, True, True, True, 3.0,
                                    0.45, 64, d.crop, d.stride, d.logit_scale, 0.0, proxy=proxy, progress=progress)


def select(x, y):
    return gr.SelectData(None, {"index": [x, y], "value": None})


# --------------------------------------------------------------------------- the page's handlers
@pytest.mark.parametrize("proxy", PROXIES)
def test_proxyclip_runs_and_clicks_on_every_proxy_grid(app, wide, proxy):
    messages = []
    outputs = run(app, wide, proxy, progress=lambda fraction, desc=None: messages.append(desc))
    summary, record = outputs[2], outputs[3]
    gh, gw = TINY_GRIDS[proxy]
    assert f"ProxyCLIP + FSA with {TINY_LABELS[proxy]} proxy" in summary
    assert f"**{gh}×{gw}** grid per window" in summary
    assert f"proxy {TINY_PROXIES[proxy]} window 1 of 1" in messages  # the progress says which model runs
    for x, y in ((W * 0.8, H * 0.3), (3, H - 2)):
        original, new, adapted, similarity, chart, text, _, record2 = app.click_mask(record, MEAN_HEADS, select(x, y))
        for picture in (original, new, adapted, similarity):
            assert picture.shape == (H, W, 3) and picture.dtype == np.uint8
        assert f"of a {gh}×{gw} grid" in text
        exp = record2.explain(x, y)
        assert exp.grid == (gh, gw) and exp.attn_new.shape == (gh, gw)
        assert 0 <= exp.patch[0] < gh and 0 <= exp.patch[1] < gw


def test_a_proxy_is_part_of_the_sessions_record(app, wide):
    dino, sam = run(app, wide, "dino-b8")[3], run(app, wide, "sam-b16")[3]
    assert dino.key != sam.key
    # the other methods run no proxy: the hidden selector changes nothing for them
    assert run(app, wide, "sam-b16", method="clearclip")[3].key == run(app, wide, "dino-b8", method="clearclip")[3].key


def test_lambda_follows_the_proxy_and_the_selector_shows_for_proxyclip_only(app):
    assert DemoApp.backbone_defaults("ViT-B-16", "proxyclip", "mae-b16") == pytest.approx(4.5)
    assert DemoApp.backbone_defaults("ViT-H-14", "proxyclip", "mae-b16") == pytest.approx(4.5)
    assert DemoApp.backbone_defaults("ViT-H-14", "proxyclip", "sam-b16") == pytest.approx(2.3)
    assert DemoApp.backbone_defaults("ViT-B-16", "clearclip", "mae-b16") == pytest.approx(3.0)
    shown, lam = app.proxy_visibility("proxyclip", "ViT-B-16", "mae-b16")
    assert shown["visible"] is True and lam == pytest.approx(4.5)
    hidden, lam = app.proxy_visibility("sclip", "ViT-B-16", "mae-b16")
    assert hidden["visible"] is False and lam == pytest.approx(3.0)
    _, untouched = app.proxy_visibility("proxyclip", "ViT-B-16", "dino-b8")
    assert untouched == gr.skip()


def test_an_unknown_proxy_is_a_clear_error(app, wide):
    with pytest.raises(gr.Error, match="unknown proxy"):
        run(app, wide, "clip-proxy")


def test_compare_all_uses_the_chosen_proxy(app, wide, monkeypatch):
    seen = []
    original = app._infer_cells_impl

    def spy(backbone, image, vocabulary, settings_list, progress=None, proxy=None):
        seen.append(app.segmenter(backbone, proxy).proxy_name)
        return original(backbone, image, vocabulary, settings_list[:1], progress, proxy)

    monkeypatch.setattr(app, "_infer_cells", spy)
    args = (wide, "cup, table", None, True, True, True, True, 3.0, 0.45, 64, 0.0)
    _, text = app.compare_all(*args, progress=None)
    assert seen == ["tiny-test"] and "random DINO stand-in proxy" in text
    _, text = app.compare_all(*args, proxy="mae-b16", progress=None)
    assert seen[-1] == "tiny-test-mae" and "random MAE stand-in proxy" in text


# --------------------------------------------------------------------------- the memory budget per proxy
def _plan(*windows):
    vocab = Vocabulary((("a",), ("b",), ("c",)))
    return RequestPlan(image=None, vocabulary=vocab, clip=VIT_B16, working_size=(336, 448), windows=windows)


def test_a_sam_request_on_a_640x480_photo_fits_with_a_smaller_batch():
    plan = plan_windows(SegmentSettings(method="proxyclip"), (480, 640), VIT_B16, proxy_spec("sam-b16"))
    assert plan.proxy_grid == (64, 64) and plan.proxy_attention == (2, 4096) and plan.heads == 12
    # CLIP: 12 × 442² × 4 B × 2 copies; SAM's global blocks: 2 heads at once × 4096² × 4 B × 2 copies;
    # ProxyCLIP's one affinity: 8 N×N float32 at N = 4096 → 512 MiB per window, the largest: 2 windows a batch
    needs = [12 * 442 ** 2 * 8, 2 * 4096 ** 2 * 8, 8 * 4096 ** 2 * 4]
    assert [need for _, need in limits.window_needs(plan)] == needs
    assert ATTENTION_BUDGET_BYTES // max(needs) == 2
    fitted = fit_to_budget(_plan(plan), RuntimeLimits(), [SegmentSettings(method="proxyclip")])
    assert fitted == [SegmentSettings(method="proxyclip", window_batch=2)]
    # MAE: 21×21 on a 336 crop, 12 heads over 442 tokens: the default batch of 4 fits
    mae = plan_windows(SegmentSettings(method="proxyclip"), (480, 640), VIT_B16, proxy_spec("mae-b16"))
    assert mae.proxy_grid == (21, 21) and mae.proxy_attention == (12, 442)
    assert fit_to_budget(_plan(mae), RuntimeLimits(), [SegmentSettings(method="proxyclip")])[0].window_batch == 4


def test_what_does_not_fit_is_refused_naming_the_proxy(monkeypatch):
    sam = plan_windows(SegmentSettings(method="proxyclip"), (480, 640), VIT_B16, proxy_spec("sam-b16"))
    monkeypatch.setattr(limits, "ATTENTION_BUDGET_BYTES", 8 * 4096 ** 2 * 4 - 1)  # a smaller server
    with pytest.raises(OverBudget, match=r"with the SAM ViT-B/16 proxy \(sam-b16\): ProxyCLIP's 4096×4096 affinity "
                                         r"over the SAM ViT-B/16 proxy \(sam-b16\)'s 64×64 grid takes 512 MiB"):
        fit_to_budget(_plan(sam), RuntimeLimits(), [SegmentSettings(method="proxyclip")])
    monkeypatch.undo()
    # DINO over a whole 2000×1500 photo at short side 2048 (2048×1536, padded to 2072×1568): its own 12 heads
    # over 259 × 196 + 1 tokens
    whole = SegmentSettings(method="proxyclip", crop=0, short_side=2048)
    dino = plan_windows(whole, (1500, 2000), VIT_B16, proxy_spec("dino-b8"))
    assert dino.proxy_attention == (12, 196 * 259 + 1)
    with pytest.raises(OverBudget, match=r"with the DINO ViT-B/8 proxy \(dino-b8\): the DINO ViT-B/8 proxy "
                                         r"\(dino-b8\)'s own attention \(12 heads at once over 50765 tokens\)"):
        fit_to_budget(_plan(dino), RuntimeLimits(), [whole])


def test_sam_features_run_a_few_heads_at_a_time_exactly():
    """`sam_features` (what keeps SAM's window within the budget) = timm's own forward, float64."""
    model = build_proxy_model("sam", stand_in=True).double().eval()
    x = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        want = model.forward_features(x)
        for heads_at_once in (1, 3):
            torch.testing.assert_close(sam_features(model, x, heads_at_once), want, rtol=0, atol=1e-12)
