"""Every door to the four proxies (tiny-test stand-ins): Segmenter, the clicked-patch view on square and
64×64 grids over non-square windows, FSA's O(N²) memory at SAM's N = 4096, the CLI, evaluate, bench."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

import fsa
from fsa import cli
from fsa.backbones import tiny_test_clip
from fsa.config import FeedbackConfig, SegmentSettings, default_lambda
from fsa.images import resize_rgb
from fsa.inference import clip_pixels
from fsa.logits import compute_patch_logits
from fsa.visualize import patch_box
from tests._eval_data import FAST, SMALL_SIZES, make_dataset

H, W = 112, 168  # a non-square image whose working size is itself (short side 112) and a multiple of 56


@pytest.fixture(scope="module")
def cache():
    return fsa.ModelCache()


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _proxy_attention(features: torch.Tensor, beta: float = 1.2, gamma: float = 3.0) -> torch.Tensor:
    """ProxyCLIP's A from proxy features (1, C, I, J), written out: (N, N) float64."""
    f = F.normalize(features.flatten(2)[0].T.double(), dim=-1)
    s = f @ f.T
    s = gamma * (s - beta * s.mean())
    return s.masked_fill(s < 0, float("-inf")).softmax(dim=-1)


@pytest.mark.parametrize("proxy, crop, grid", [("mae-b16", 224, (14, 14)), ("sam-b16", 224, (64, 64)),
                                               ("dinov2-b14-reg", 224, (8, 12)), ("dino-b8", 224, (14, 21))])
def test_clicked_patch_on_every_proxy_grid(cache, rgb, proxy, crop, grid):
    """One 112×168 window: MAE and SAM squash it to a square grid, DINO/DINOv2 keep its shape. A click at
    a patch's centre finds that patch, the drawn box holds the click, and A₀'s row is the proxy's."""
    segmenter = fsa.Segmenter("tiny-test", proxy=proxy, cache=cache)
    lam = default_lambda("tiny-test", proxy)
    settings = SegmentSettings(method="proxyclip", short_side=H, crop=crop, stride=112,
                               feedback=FeedbackConfig(lam=lam))
    result = segmenter.segment(rgb, "sky, road, car", settings)
    assert segmenter.proxy_name == fsa.proxies.proxy_for_backbone(proxy, "tiny-test")
    assert result.working_size == (H, W) and len(result.windows) == 1 and result.grid == grid
    assert lam == (4.5 if proxy == "mae-b16" else 3.0)
    clip = segmenter.load()
    loaded = cache.get_proxy(segmenter.proxy_name, device="cpu")
    pixels = clip_pixels(resize_rgb(rgb, (H, W)), clip.mean, clip.std, dtype=clip.dtype)
    attention = _proxy_attention(loaded.features_from_clip_pixels(pixels, crop=crop))
    gh, gw = grid
    for row, col in [(0, 0), (gh - 1, gw - 1), (gh // 3, gw - 2), (gh - 2, 1)]:
        x, y = (col + 0.5) * W / gw, (row + 0.5) * H / gh
        explained = result.explain(x, y)
        assert explained.grid == grid and explained.patch == (row, col)
        y0, x0, y1, x1 = patch_box(explained.window, explained.grid, explained.patch, rgb.shape)
        assert y0 <= y < y1 and x0 <= x < x1
        expected = attention[row * gw + col].reshape(gh, gw).numpy()
        np.testing.assert_allclose(explained.attn_original[0], expected, rtol=0, atol=1e-5)


def test_mae_grid_follows_the_window_crop(cache, rgb):
    segmenter = fsa.Segmenter("tiny-test", proxy="mae", cache=cache)
    for crop, grid in ((112, (7, 7)), (224, (14, 14)), (0, (10, 10))):  # 0: the whole image, squashed to 168²
        settings = SegmentSettings(method="proxyclip", short_side=H, crop=crop, stride=56, feedback=None)
        assert segmenter.segment(rgb, "sky, road", settings).grid == grid


class LargestTensor(TorchDispatchMode):
    """The largest storage (in elements) any operation creates while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.untyped_storage().nbytes() // item.element_size())
        return out


def test_fsa_and_proxyclip_stay_quadratic_at_sam_grid():
    """N = 4096 (SAM's 64×64), K = 12: no tensor beyond 2·N² elements (the published N×N×K KL would be
    12·N²); the instrument itself sees the N×N×K tensor of the naive formulation."""
    from fsa.bench_timing import naive_feedback_step

    model = tiny_test_clip().eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 64, 64, generator=g)
    text = F.normalize(torch.randn(12, model.visual.output_dim, generator=g), dim=-1)
    proxy = torch.randn(1, 32, 64, 64, generator=g)
    n = 64 * 64
    with torch.no_grad(), LargestTensor() as mode:
        out = compute_patch_logits(model, pixels, text, "proxyclip", feedback=FeedbackConfig(), proxy_features=proxy)
    assert out.fsa.shape == (1, 12, 64, 64) and torch.isfinite(out.fsa).all()
    assert n * n <= mode.largest <= 2 * n * n
    small = 32 * 32
    pi = torch.softmax(torch.randn(1, small, 12, generator=g), dim=-1)
    a0 = torch.softmax(torch.randn(1, 1, small, small, generator=g), dim=-1)
    v = torch.randn(1, 2, small, 8, generator=g)
    with torch.no_grad(), LargestTensor() as naive:
        naive_feedback_step(pi, a0, v, FeedbackConfig())
    assert naive.largest >= 12 * small * small


def test_cli_proxy_names_the_proxy_and_uses_its_lambda(tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("FSA_MODEL", "tiny-test")
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(image)
    code = cli.main(["segment", str(image), "--classes", "sky, road", "--method", "proxyclip", "--proxy", "SAM",
                     "--short-side", "48", "--out", str(tmp_path / "m.png")])
    out = capsys.readouterr().out
    assert code == 0
    assert "with the random SAM stand-in proxy (tiny-test-sam, grid 64×64)" in out
    args = cli.build_parser().parse_args(["segment", "x.png", "--classes", "a", "--method", "proxyclip",
                                          "--proxy", "mae-b16"])
    assert cli._settings_from_args(args, "ViT-L-14")[0].lam == 4.5
    args = cli.build_parser().parse_args(["segment", "x.png", "--classes", "a", "--method", "clearclip",
                                          "--proxy", "mae-b16"])
    assert cli._settings_from_args(args, "ViT-L-14")[0].lam == 3.0  # the proxy only matters for ProxyCLIP


def test_evaluate_with_the_mae_proxy(tmp_path, cache):
    make_dataset(tmp_path, "voc21", n=2, sizes=SMALL_SIZES[:2], seed=2)
    result = fsa.evaluate("voc21", tmp_path, "proxyclip", proxy="MAE", cache=cache, **FAST)
    assert result.proxy == "tiny-test-mae" and result.settings["proxy"] == "mae-b16"
    assert result.settings["feedback"]["lam"] == 4.5  # FSA's published λ with MAE
    assert result.to_json()["proxy"] == "tiny-test-mae"
    from fsa.evaluation.cli import format_result, paper_table

    assert format_result(result).startswith("ProxyCLIP (random MAE stand-in) + FSA on voc21")
    assert "| ProxyCLIP (random MAE stand-in) + FSA |" in paper_table([result])
    with pytest.raises(ValueError, match="unknown proxy model 'sam-h'"):
        fsa.EvalConfig("voc21", tmp_path, "proxyclip", proxy="sam-h")


def test_evaluate_cli_names_the_proxy_in_json_and_paths(tmp_path, monkeypatch):
    from fsa.evaluation.cli import main

    monkeypatch.setenv("FSA_MODEL", "tiny-test")
    make_dataset(tmp_path / "data", "voc21", n=1, sizes=SMALL_SIZES[:1], seed=3)
    out = tmp_path / "out"
    assert main(["voc21", "--data-root", str(tmp_path / "data"), "--proxy", "sam-b16", "--short-side", "64",
                 "--output", str(out), "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["proxy"] == "tiny-test-sam" and saved["settings"]["feedback"]["lam"] == 3.0


def test_bench_quick_has_mae_and_sam_rows(capsys):
    from fsa.bench import main

    assert main(["--quick", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "ProxyCLIP, random MAE stand-in proxy 4×4 (N=16), K=5" in out
    assert "ProxyCLIP, random SAM stand-in proxy 64×64 (N=4096), K=5" in out
    assert main(["--proxy-forward", "--quick", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    row = r"\| random SAM stand-in \(tiny-test-sam\) +\| 112×112 \| 1024×1024 +\| 64×64 \(4096\) +\|"
    assert re.search(row, out)
