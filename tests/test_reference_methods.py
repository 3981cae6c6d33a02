"""`fsa.patch_logits` vs the naive float64 reference, every method x FSA on/off x each switch.

Inputs (see _fixtures_ref.make_inputs): the golden image (7x7 grid, 9x9 proxy), a non-square
image (5x8 grid, 6x10 proxy, K=5), a batch of two images (3x7 grid, 5x7 proxy) and an image on
the pre-training grid itself (4x4: positional embedding used unchanged).
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import fsa
import reference as R
from _fixtures_ref import (DT, INPUT_NAMES, TOL, assert_state_unchanged, feedback_cfg,
                           max_abs, method_options, record, run_fsa, run_ref, state_snapshot)
from _fixtures_ref import _single_thread, deep_model, ref_inputs  # noqa: F401  (fixtures)
from fsa.attention import baseline_attention

METHODS = ("vanilla", "maskclip", "sclip", "clearclip", "naclip", "proxyclip", "gclip")

#: FSA configurations: name -> FeedbackConfig kwargs
FSA_CONFIGS = {
    "default": {},
    "isolation_off": dict(isolation=False),
    "pruning_off": dict(pruning=False),
    "ensemble_off": dict(ensemble=False),
    "all_off": dict(isolation=False, pruning=False, ensemble=False),
    "lam4.5": dict(lam=4.5),
    "lam2.3": dict(lam=2.3),
    "lam0": dict(lam=0.0),
    "p0.2": dict(p=0.2),
    "p1.0": dict(p=1.0),
    "scales10_50": dict(feedback_scale=10.0, isolation_scale=50.0),
    "eps1e-6": dict(eps=1e-6),
}


# ---------------------------------------------------------------------------------------------
# the reference checks itself against torch where that is possible
# ---------------------------------------------------------------------------------------------

def test_reference_manual_block_equals_module(golden_model, ref_inputs):
    visual = golden_model.visual
    x, _, _ = R.embed(visual, ref_inputs["nonsquare"].pixels)
    for blk in visual.transformer.resblocks:
        with torch.no_grad():
            want = blk(x)
        got = torch.stack([R.block_forward_manual(blk, x[b])[0] for b in range(x.shape[0])])
        assert max_abs(got, want) < 1e-12
        x = want


def test_reference_embedding_equals_open_clip_on_pretrain_grid(golden_model, ref_inputs):
    visual = golden_model.visual
    px = ref_inputs["pretrain_grid"].pixels
    with torch.no_grad():
        want = visual._embeds(px)
    got, gh, gw = R.embed(visual, px)
    assert (gh, gw) == tuple(visual.grid_size)
    assert max_abs(got, want) < 1e-12


def test_reference_vanilla_equals_open_clip_forward(golden_model, ref_inputs):
    """On the pre-training grid the reference's vanilla CLIP is open_clip's own forward:
    transformer -> ln_post -> proj on the patch tokens."""
    visual = golden_model.visual
    inp = ref_inputs["pretrain_grid"]
    with torch.no_grad():
        x = visual.transformer(visual._embeds(inp.pixels))
        f = visual.ln_post(x)[:, 1:] @ visual.proj
        f = f / f.norm(dim=-1, keepdim=True)
        want = (f @ inp.text.T).permute(0, 2, 1).reshape(1, -1, *visual.grid_size)
    assert max_abs(run_ref(golden_model, inp, "vanilla"), want) < 1e-12


def test_reference_channel_suppression():
    torch.manual_seed(0)
    w = torch.randn(16, 64, dtype=DT)
    w[5] *= 4
    out = R.suppressed_c_proj(w)
    norms = w.norm(dim=1)
    assert torch.equal(out[torch.arange(16) != 5], w[torch.arange(16) != 5])
    assert abs(float(out[5].norm()) - float(norms[torch.arange(16) != 5].mean())) < 1e-12
    assert max_abs(out[5] / out[5].norm(), w[5] / w[5].norm()) < 1e-15  # rescaled, same direction


@pytest.mark.parametrize("g0,gh,gw", [(4, 7, 7), (4, 5, 8), (4, 3, 7), (14, 28, 21), (14, 9, 40)])
def test_reference_bicubic_equals_torch_scale_factor(g0, gh, gw):
    torch.manual_seed(0)
    img = torch.randn(1, 6, g0, g0, dtype=DT)
    sf = ((gh + 0.1) / g0, (gw + 0.1) / g0)
    want = F.interpolate(img, scale_factor=sf, mode="bicubic", align_corners=False)
    got = R.bicubic_resize_scale(img[0], *sf)
    assert tuple(want.shape[-2:]) == (gh, gw)
    assert max_abs(got, want[0]) < 1e-12


@pytest.mark.parametrize("hw,size", [((7, 7), (9, 9)), ((5, 8), (6, 10)), ((3, 7), (5, 7)), ((6, 4), (12, 3))])
def test_reference_bilinear_equals_torch(hw, size):
    torch.manual_seed(0)
    img = torch.randn(1, 5, *hw, dtype=DT)
    want = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
    assert max_abs(R.bilinear_resize_size(img[0], *size), want[0]) < 1e-12


def test_reference_default_gclip_blocks():
    assert R.default_gclip_blocks(12) == ((8, 9, 10, 11, 12), (7, 8))
    assert R.default_gclip_blocks(4) == ((3, 4), (2, 3))
    assert R.default_gclip_blocks(24) == (tuple(range(16, 25)), (14, 16))


@pytest.mark.parametrize("method", METHODS)
def test_reference_attention_row_sums(golden_model, ref_inputs, method):
    """Baseline attention rows sum to 1 (2 for SCLIP); FSA's A_new rows to 1; A_ens rows to
    (2 s + 1) / 3 where s is A0's row sum; with CLS, A_new is diag(1, A_new)."""
    inp = ref_inputs["nonsquare"]
    _, det = run_ref(golden_model, inp, method, feedback=R.RefFeedback(), return_details=True)
    info = det[0]
    s = 2.0 if method == "sclip" else 1.0
    for A in info["A0"]:
        assert torch.allclose(A.sum(-1), torch.full((A.shape[0],), s, dtype=DT), atol=1e-12)
    assert torch.allclose(info["A_new"].sum(-1), torch.ones(info["A_new"].shape[0], dtype=DT), atol=1e-12)
    for A in info["A_fsa"]:
        assert torch.allclose(A.sum(-1), torch.full((A.shape[0],), (2 * s + 1) / 3, dtype=DT), atol=1e-12)
    assert (info["A_new"][~info["keep"]] == 0).all()


# ---------------------------------------------------------------------------------------------
# fsa.patch_logits vs the reference
# ---------------------------------------------------------------------------------------------

def _compare(model, inp, method, fb_kw=None, opt_kw=None, tag=""):
    fb_fsa, fb_ref = feedback_cfg(**fb_kw) if fb_kw is not None else (None, None)
    opt_fsa, opt_ref = method_options(**(opt_kw or {}))
    snap = state_snapshot(model)
    got = run_fsa(fsa, model, inp, method, fb_fsa, opt_fsa)
    assert_state_unchanged(model, snap)
    want = run_ref(model, inp, method, fb_ref, opt_ref)
    assert got.dtype == torch.float64
    assert tuple(got.shape) == tuple(want.shape), (tuple(got.shape), tuple(want.shape))
    assert torch.isfinite(got).all()
    d = record(f"{tag or 'ref'}/{method}/{inp.name}", max_abs(got, want))
    assert d <= TOL, f"{method} {inp.name} {fb_kw} {opt_kw}: max abs {d:.3e}"
    return got, want


@pytest.mark.parametrize("inputs", INPUT_NAMES)
@pytest.mark.parametrize("method", METHODS)
def test_baseline_vs_reference(golden_model, ref_inputs, method, inputs):
    inp = ref_inputs[inputs]
    got, _ = _compare(golden_model, inp, method, tag="baseline")
    B = inp.pixels.shape[0]
    grid = inp.proxy.shape[-2:] if method == "proxyclip" else (inp.pixels.shape[-2] // 16, inp.pixels.shape[-1] // 16)
    assert tuple(got.shape) == (B, inp.text.shape[0], *grid)


@pytest.mark.parametrize("config", list(FSA_CONFIGS))
@pytest.mark.parametrize("inputs", INPUT_NAMES)
@pytest.mark.parametrize("method", METHODS)
def test_fsa_vs_reference(golden_model, ref_inputs, method, inputs, config):
    _compare(golden_model, ref_inputs[inputs], method, FSA_CONFIGS[config], tag=f"fsa[{config}]")


@pytest.mark.parametrize("method", METHODS)
def test_fsa_switches_matter(golden_model, ref_inputs, method):
    """Non-vacuity: on the golden image every FSA switch / parameter moves the reference output
    well beyond TOL (except ensemble for MaskCLIP, where A0 = I makes A_ens = A_new). Pruning
    moves the residual methods (vanilla, MaskCLIP, SCLIP) by only ~1e-8: hence TOL = 1e-10."""
    inp = ref_inputs["golden"]
    outs = {k: run_ref(golden_model, inp, method, R.RefFeedback(**v)) for k, v in FSA_CONFIGS.items()}
    base = run_ref(golden_model, inp, method)
    assert max_abs(outs["default"], base) > 1e-3
    for k, o in outs.items():
        if k == "default":
            continue
        d = max_abs(o, outs["default"])
        if method == "maskclip" and k == "ensemble_off":
            assert d <= 1e-12
        else:
            assert d > 30 * TOL, f"{k} does not change {method}: {d:.3e}"
    assert max_abs(outs["p1.0"], outs["pruning_off"]) == 0.0


# --- method parameters -------------------------------------------------------------------------

@pytest.mark.parametrize("fb", [None, {}], ids=["baseline", "fsa"])
@pytest.mark.parametrize("sigma", [1.0, 2.5, 50.0])
def test_naclip_sigma(golden_model, ref_inputs, sigma, fb):
    _compare(golden_model, ref_inputs["nonsquare"], "naclip", fb, dict(naclip_sigma=sigma), tag=f"naclip_sigma{sigma}")


@pytest.mark.parametrize("fb", [None, {}], ids=["baseline", "fsa"])
@pytest.mark.parametrize("beta,gamma", [(1.0, 3.0), (0.5, 1.0), (1.5, 6.0)])
def test_proxy_beta_gamma(golden_model, ref_inputs, beta, gamma, fb):
    for name in ("golden", "nonsquare", "batch2"):
        _compare(golden_model, ref_inputs[name], "proxyclip", fb, dict(proxy_beta=beta, proxy_gamma=gamma),
                 tag=f"proxy_b{beta}_g{gamma}")


# --- GCLIP switches ----------------------------------------------------------------------------

GCLIP_SWITCHES = {
    "both": dict(channel_suppression=True, attention_fusion=True),
    "suppression_only": dict(channel_suppression=True, attention_fusion=False),
    "fusion_only": dict(channel_suppression=False, attention_fusion=True),
    "neither": dict(channel_suppression=False, attention_fusion=False),
    "explicit_blocks": dict(suppression_blocks=(2, 3, 4), fusion_blocks=(1, 3)),
    "explicit_blocks_fusion_only": dict(channel_suppression=False, suppression_blocks=(1,), fusion_blocks=(1, 2)),
    "suppress_block1": dict(attention_fusion=False, suppression_blocks=(1,)),
    # fusion over n blocks generalises (sum_b Ā_b + own) / (n + 1) [our reading of §4]
    "fusion_one_block": dict(fusion_blocks=(1,)),
    "fusion_three_blocks": dict(fusion_blocks=(1, 2, 3)),
}


@pytest.mark.parametrize("fb", [None, {}, dict(ensemble=False)], ids=["baseline", "fsa", "fsa_no_ens"])
@pytest.mark.parametrize("switch", list(GCLIP_SWITCHES))
@pytest.mark.parametrize("inputs", ["golden", "nonsquare", "batch2"])
def test_gclip_switches(golden_model, ref_inputs, switch, fb, inputs):
    _compare(golden_model, ref_inputs[inputs], "gclip", fb, GCLIP_SWITCHES[switch], tag=f"gclip[{switch}]")


def test_gclip_switches_matter(golden_model, ref_inputs):
    """Each switch changes the reference output (so the comparisons above are not vacuous), and
    'neither' is exactly ClearCLIP."""
    inp = ref_inputs["golden"]
    outs = {k: run_ref(golden_model, inp, "gclip", None, method_options(**v)[1]) for k, v in GCLIP_SWITCHES.items()}
    clear = run_ref(golden_model, inp, "clearclip")
    assert max_abs(outs["neither"], clear) <= 1e-12
    for k in ("both", "suppression_only", "fusion_only"):
        assert max_abs(outs[k], clear) > 1e-4, k
    assert max_abs(outs["both"], outs["explicit_blocks"]) > 1e-4


def test_gclip_default_blocks_golden_model(golden_model, ref_inputs):
    """4-block model: defaults scaled from 12 are suppression (3, 4), fusion (2, 3)."""
    inp = ref_inputs["golden"]
    opt_default, _ = method_options()
    _, ref_explicit = method_options(suppression_blocks=(3, 4), fusion_blocks=(2, 3))
    got = run_fsa(fsa, golden_model, inp, "gclip", None, opt_default)
    d = record("gclip_defaults/depth4", max_abs(got, run_ref(golden_model, inp, "gclip", None, ref_explicit)))
    assert d <= TOL


@pytest.mark.parametrize("fb", [None, {}], ids=["baseline", "fsa"])
def test_gclip_default_blocks_depth12(deep_model, ref_inputs, fb):
    """12-block model: defaults are suppression 8..12, fusion (7, 8); also options=None."""
    inp = ref_inputs["nonsquare"]
    fb_fsa, fb_ref = feedback_cfg(**fb) if fb is not None else (None, None)
    _, ref_explicit = method_options(suppression_blocks=tuple(range(8, 13)), fusion_blocks=(7, 8))
    want = run_ref(deep_model, inp, "gclip", fb_ref, ref_explicit)
    snap = state_snapshot(deep_model)
    for opts in (None, method_options()[0]):
        got = run_fsa(fsa, deep_model, inp, "gclip", fb_fsa, opts)
        d = record("gclip_defaults/depth12", max_abs(got, want))
        assert d <= TOL
    assert_state_unchanged(deep_model, snap)
    wrong = run_ref(deep_model, inp, "gclip", fb_ref, method_options(suppression_blocks=(9, 10, 11, 12),
                                                                     fusion_blocks=(6, 7))[1])
    assert max_abs(wrong, want) > 1e-6  # the defaults are actually tested


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fb", [None, {}], ids=["baseline", "fsa"])
def test_deep_quickgelu_model(deep_model, ref_inputs, method, fb):
    """A second model: 12 blocks, 2 heads, QuickGELU."""
    _compare(deep_model, ref_inputs["batch2"], method, fb, tag="deep12")


# --- FSA off = baseline, all components off --------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_feedback_none_is_baseline_bit_for_bit(golden_model, ref_inputs, method):
    for name in ("golden", "nonsquare", "batch2"):
        inp = ref_inputs[name]
        proxy = inp.proxy if method == "proxyclip" else None
        with torch.no_grad():
            a = fsa.patch_logits(golden_model, inp.pixels, inp.text, method, feedback=None, proxy_features=proxy)
            b = fsa.patch_logits(golden_model, inp.pixels, inp.text, method, proxy_features=proxy)
            c = fsa.patch_logits(golden_model, inp.pixels, inp.text, method, feedback=None, proxy_features=proxy,
                                 options=fsa.MethodOptions())
        assert torch.equal(a, b) and torch.equal(a, c)
        # and it is the baseline of docs/method.md §2 (the reference), not some FSA variant
        assert max_abs(a, run_ref(golden_model, inp, method)) <= TOL


@pytest.mark.parametrize("method", METHODS)
def test_all_components_off_runs_and_is_not_baseline(golden_model, ref_inputs, method):
    inp = ref_inputs["golden"]
    got, want = _compare(golden_model, inp, method, FSA_CONFIGS["all_off"], tag="all_off_vs_ref")
    base = run_ref(golden_model, inp, method)
    assert max_abs(got, base) > 1e-4, "every component off is A_new alone, not the baseline"


@pytest.mark.parametrize("method", METHODS)
def test_p1_equals_pruning_off(golden_model, ref_inputs, method):
    """p = 1 (allowed by FeedbackConfig) keeps every entry, i.e. it is pruning off; float rounding
    of cumsum(w) must not prune the smallest entries."""
    for name in ("golden", "nonsquare", "batch2"):
        inp = ref_inputs[name]
        a = run_fsa(fsa, golden_model, inp, method, feedback_cfg(p=1.0)[0])
        b = run_fsa(fsa, golden_model, inp, method, feedback_cfg(pruning=False)[0])
        d = record(f"p1_vs_pruning_off/{method}", max_abs(a, b))
        assert d <= 1e-12, f"{name}: {d:.3e}"


def test_maskclip_ensemble_is_a_new(golden_model, ref_inputs):
    """MaskCLIP: A0 = I, so A_ens = A_new exactly; ensemble on/off agree."""
    inp = ref_inputs["nonsquare"]
    on = run_fsa(fsa, golden_model, inp, "maskclip", feedback_cfg()[0])
    off = run_fsa(fsa, golden_model, inp, "maskclip", feedback_cfg(ensemble=False)[0])
    assert max_abs(on, off) <= 1e-12


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fb", [None, {}], ids=["baseline", "fsa"])
def test_batch_equals_single_images(golden_model, ref_inputs, method, fb):
    """Each image of a batch is computed on its own (e.g. ProxyCLIP's mean(Ŝ) is per image)."""
    inp = ref_inputs["batch2"]
    fb_fsa = feedback_cfg(**fb)[0] if fb is not None else None
    with torch.no_grad():
        both = run_fsa(fsa, golden_model, inp, method, fb_fsa)
        for i in range(2):
            single = type(inp)(inp.name, inp.pixels[i:i + 1], inp.text, inp.proxy[i:i + 1])
            one = run_fsa(fsa, golden_model, single, method, fb_fsa)
            d = record(f"batch_vs_single/{method}", max_abs(both[i:i + 1], one))
            assert d <= 1e-10, f"image {i}: {d:.3e}"


def test_baseline_attention_helper_row_sums(golden_model, ref_inputs):
    """fsa.attention.baseline_attention against the reference's A0 on the
    last block's real q, k, v: rows sum to 1 (2 for SCLIP), CLS conventions, identity for MaskCLIP."""
    inp = ref_inputs["nonsquare"]
    opts = method_options()[0]
    for method in ("vanilla", "maskclip", "sclip", "clearclip", "naclip", "proxyclip"):
        _, det = run_ref(golden_model, inp, method, return_details=True)
        info = det[0]
        q, k, v = info["q"][None], info["k"][None], info["v"][None]  # (1, H, L, d)
        ba = baseline_attention(method, q, k, v, info["grid"],
                                proxy_features=inp.proxy if method == "proxyclip" else None, options=opts)
        assert ba.cls_token == info["has_cls"], method
        if method == "maskclip":
            assert ba.weights is None or max_abs(ba.weights[0, 0], torch.eye(q.shape[2], dtype=DT)) == 0
            continue
        w = ba.weights[0].to(DT)  # (H or 1, M, M)
        s = 2.0 if method == "sclip" else 1.0
        assert torch.allclose(w.sum(-1), torch.full_like(w.sum(-1), s), atol=1e-12), method
        for h, A in enumerate(info["A0"]):
            d = record(f"baseline_attention/{method}", max_abs(w[h if w.shape[0] > 1 else 0], A))
            assert d <= 1e-12, (method, h, d)
        d = record(f"baseline_attention_values/{method}", max_abs(ba.values[0], info["values"]))
        assert d <= 1e-12, method
