"""The questions FSA leaves open, as FeedbackConfig switches: similarity, iterations, blocks.

Everything against the independent float64 reference (tests/reference.py, no `fsa` in its maths)
at 1e-10 (the similarity forms themselves at 1e-12):
- each similarity form (values in (0, 1], diagonal exactly 1, exact symmetry where it must hold),
  on synthetic Π and on the tiny model's Π (non-square grids), and end to end;
- the defaults (iterations=1, blocks=None or [L]) are today's outputs bit for bit, every method;
- iterations=2 and blocks that re-run earlier blocks (also GCLIP on a 12-block tower);
- the diagnostics show every pass and every adapted block, equal to the reference's matrices;
- configuration and method errors are ValueErrors naming the problem.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as R
from _fixtures_ref import _single_thread  # noqa: F401  (autouse fixture)
from _fixtures_ref import DT, deep_model, max_abs, record, ref_inputs  # noqa: F401  (fixtures)

import fsa
from fsa.config import FeedbackConfig, MethodOptions
from fsa.diagnostics import DiagnosticsStore
from fsa.feedback import js_divergence, output_similarity
from fsa.logits import compute_patch_logits
from fsa.sliding import Window
from fsa.vocabulary import parse_vocabulary

METHODS = fsa.METHODS
NOT_PROXY = tuple(m for m in METHODS if m != "proxyclip")
TOL = 1e-10


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------

def test_defaults_are_the_paper():
    cfg = FeedbackConfig()
    assert (cfg.similarity, cfg.iterations, cfg.blocks) == ("kl", 1, None)


@pytest.mark.parametrize("kw,match", [
    (dict(similarity="cosine"), "similarity must be one of kl, sym_kl, js"),
    (dict(iterations=0), "iterations must be an integer >= 1"),
    (dict(iterations=1.5), "iterations must be an integer >= 1"),
    (dict(iterations=True), "iterations must be an integer >= 1"),
    (dict(blocks=()), "blocks must be None"),
    (dict(blocks=(0, 12)), "blocks must be None"),
    (dict(blocks=(11, 11)), "blocks must be None"),
    (dict(blocks=("11",)), "blocks must be None"),
    (dict(blocks=(2.0,)), "blocks must be None"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        FeedbackConfig(**kw)


def test_config_blocks_normalised():
    cfg = FeedbackConfig(blocks=[12, np.int64(11)])
    assert cfg.blocks == (11, 12) and all(type(b) is int for b in cfg.blocks)
    assert FeedbackConfig(blocks=4).blocks == (4,)
    assert hash(cfg) == hash(FeedbackConfig(blocks=(11, 12)))  # still a usable cache key


def test_blocks_outside_the_tower_and_proxyclip(golden_model, ref_inputs):
    inp = ref_inputs["nonsquare"]
    with pytest.raises(ValueError, match=r"outside 1..4 for a 4-block"):
        compute_patch_logits(golden_model, inp.pixels, inp.text, "clearclip", feedback=FeedbackConfig(blocks=(3, 5)))
    with pytest.raises(ValueError, match="proxyclip.*only be the last block"):
        compute_patch_logits(golden_model, inp.pixels, inp.text, "proxyclip", feedback=FeedbackConfig(blocks=(3, 4)),
                             proxy_features=inp.proxy)
    # the last block alone is fine for proxyclip
    compute_patch_logits(golden_model, inp.pixels, inp.text, "proxyclip", feedback=FeedbackConfig(blocks=(4,)),
                         proxy_features=inp.proxy)


# ---------------------------------------------------------------------------------------------
# similarity forms vs direct float64 formulas
# ---------------------------------------------------------------------------------------------

def direct_similarity(pi: torch.Tensor, eps: float, kind: str) -> torch.Tensor:
    """(B, N, K) → (B, N, N) in float64: the reference's N x N x K formula per image."""
    return torch.stack([R.output_similarity_naive(p, eps, kind) for p in pi])


def _pi(B, N, K, scale, seed, zeros=False):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, K, generator=g, dtype=DT)
    logits = centers[torch.randint(0, 4, (B, N), generator=g)] + 0.3 * torch.randn(B, N, K, generator=g, dtype=DT)
    pi = torch.softmax(scale * logits, dim=-1)
    if zeros:
        pi[:, :3] = F.one_hot(torch.arange(3) % K, K).to(DT)
    return pi


def _check_similarity(S, want, kind, tol):
    assert S.shape == want.shape and S.dtype == want.dtype
    d = max_abs(S, want)
    assert d <= tol, (kind, d)
    assert torch.isfinite(S).all() and (S > 0).all() and (S <= 1).all()
    assert torch.equal(torch.diagonal(S, dim1=-2, dim2=-1), torch.ones(S.shape[:2], dtype=S.dtype))
    if kind == "kl":
        assert max_abs(S, S.transpose(1, 2)) > 1e-3, "the paper's Ŝ is not symmetric"
    else:
        assert torch.equal(S, S.transpose(1, 2)), f"{kind} must be exactly symmetric"
    return d


@pytest.mark.parametrize("kind", ["kl", "sym_kl", "js"])
@pytest.mark.parametrize("B,N,K,scale,zeros", [(1, 49, 7, 10.0, False), (2, 40, 5, 20.0, True),
                                                (1, 30, 150, 3.0, False), (2, 12, 3, 35.0, True)])
@pytest.mark.parametrize("eps", [1e-10, 1e-6])
def test_similarity_vs_direct_formula(kind, B, N, K, scale, zeros, eps):
    pi = _pi(B, N, K, scale, seed=N + K, zeros=zeros)
    S = output_similarity(pi, eps, kind)
    d = record(f"switches/similarity/{kind}/N{N}K{K}", _check_similarity(S, direct_similarity(pi, eps, kind), kind,
                                                                         1e-12))
    assert d <= 1e-12


def test_similarity_epsilon_bounds():
    """One-hot rows of different classes: KL = log(1 + ε) − log ε (ε bounds it); JS ≈ log 2."""
    pi = F.one_hot(torch.tensor([[0, 1]]), 3).to(DT)
    eps = 1e-10
    kl = math.log(1 + eps) - math.log(eps)
    assert abs(float(output_similarity(pi, eps, "kl")[0, 0, 1]) - 1 / (1 + kl)) < 1e-12
    assert abs(float(output_similarity(pi, eps, "sym_kl")[0, 0, 1]) - 1 / (1 + kl)) < 1e-12
    js = math.log(1 + eps) - math.log(0.5 + eps)  # ½·1·log((1+ε)/(½+ε)) twice
    assert abs(float(output_similarity(pi, eps, "js")[0, 0, 1]) - 1 / (1 + js)) < 1e-12


def test_js_is_the_same_for_every_chunk_size():
    pi = _pi(2, 33, 11, 8.0, seed=4, zeros=True)
    want = js_divergence(pi, 1e-10, chunk_elements=10**9)  # all classes at once
    for chunk in (1, 2 * 33 * 33, 5 * 2 * 33 * 33):  # one class, one class, five classes at a time
        got = js_divergence(pi, 1e-10, chunk_elements=chunk)
        assert max_abs(got, want) <= 1e-14
        assert torch.equal(got, got.transpose(1, 2))
    assert (want >= 0).all() and float(want.max()) <= math.log(2) + 1e-9


@pytest.mark.parametrize("kind", ["sym_kl", "js"])
def test_similarity_float32_close(kind):
    pi = _pi(1, 49, 7, 20.0, seed=7)
    S = output_similarity(pi.float(), 1e-10, kind)
    assert S.dtype == torch.float32 and torch.equal(S, S.transpose(1, 2))
    assert max_abs(S, direct_similarity(pi, 1e-10, kind)) <= 1e-4


@pytest.mark.parametrize("kind", ["kl", "sym_kl", "js"])
@pytest.mark.parametrize("method", ["clearclip", "proxyclip"])
def test_similarity_on_the_tiny_models_pi(golden_model, ref_inputs, kind, method):
    """Π of the tiny model on non-square grids (5 x 8 CLIP, 6 x 10 proxy): Ŝ vs the direct formula."""
    inp = ref_inputs["nonsquare"]
    out = compute_patch_logits(golden_model, inp.pixels, inp.text, method, feedback=FeedbackConfig(similarity=kind),
                               proxy_features=inp.proxy, keep_details=True)
    pi = out.details.pi
    assert pi.shape == (1, 60 if method == "proxyclip" else 40, 5)
    _check_similarity(output_similarity(pi, 1e-10, kind), direct_similarity(pi, 1e-10, kind), kind, 1e-12)


def reference_fsa(model, inp, method, cfg, options=None, details=False):
    """The reference's FSA output (B, K, h, w) for FeedbackConfig cfg (and MethodOptions `options`)."""
    ref_opts = None if options is None else R.RefOptions(
        naclip_sigma=options.naclip_sigma, proxy_beta=options.proxy_beta, proxy_gamma=options.proxy_gamma,
        channel_suppression=options.gclip.channel_suppression, attention_fusion=options.gclip.attention_fusion,
        suppression_blocks=options.gclip.suppression_blocks, fusion_blocks=options.gclip.fusion_blocks)
    return R.reference_patch_logits(model, inp.pixels, inp.text, method, feedback=cfg,
                                    proxy_features=inp.proxy if method == "proxyclip" else None, options=ref_opts,
                                    return_details=details)


def fsa_out(model, inp, method, cfg, options=None):
    return compute_patch_logits(model, inp.pixels, inp.text, method, feedback=cfg, options=options,
                                proxy_features=inp.proxy if method == "proxyclip" else None).fsa


@pytest.mark.parametrize("kind", ["sym_kl", "js"])
@pytest.mark.parametrize("method", METHODS)
def test_similarity_end_to_end(golden_model, ref_inputs, kind, method):
    inp = ref_inputs["nonsquare"]
    cfg = FeedbackConfig(similarity=kind)
    got = fsa_out(golden_model, inp, method, cfg)
    d = record(f"switches/end_to_end/{kind}/{method}", max_abs(got, reference_fsa(golden_model, inp, method, cfg)))
    assert d <= TOL, d
    assert max_abs(got, fsa_out(golden_model, inp, method, FeedbackConfig())) > 1e-6, \
        "the similarity switch changes the output"


# ---------------------------------------------------------------------------------------------
# defaults are today's outputs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_defaults_bit_for_bit(golden_model, ref_inputs, method):
    depth = len(golden_model.visual.transformer.resblocks)
    for name in ("golden", "nonsquare", "batch2"):
        inp = ref_inputs[name]
        run = lambda cfg: compute_patch_logits(golden_model, inp.pixels, inp.text, method, feedback=cfg,  # noqa
                                               proxy_features=inp.proxy, keep_details=True)
        ref = run(FeedbackConfig())
        for cfg in (FeedbackConfig(iterations=1), FeedbackConfig(blocks=(depth,)), FeedbackConfig(similarity="kl"),
                    FeedbackConfig(iterations=1, blocks=[depth], similarity="kl")):
            out = run(cfg)
            assert torch.equal(out.fsa, ref.fsa) and torch.equal(out.baseline, ref.baseline), (name, cfg)
            assert torch.equal(out.details.pi, ref.details.pi)
        assert len(ref.details.steps) == 1 and ref.details.steps[0].block_qk == {}
        assert ref.details.steps[0].pi is ref.details.pi


# ---------------------------------------------------------------------------------------------
# iterations and blocks vs the reference
# ---------------------------------------------------------------------------------------------

def test_the_references_switch_rules_are_consistent(golden_model, ref_inputs):
    """The reference's own rules: blocks=(L,) is the paper's single pass; pass 1 of two iterations is
    one iteration, and pass 2 adapts with another A_new."""
    inp = ref_inputs["nonsquare"]
    for method in ("clearclip", "gclip"):
        paper, det = reference_fsa(golden_model, inp, method, FeedbackConfig(), details=True)
        assert torch.equal(reference_fsa(golden_model, inp, method, FeedbackConfig(blocks=(4,))), paper)
        _, det2 = reference_fsa(golden_model, inp, method, FeedbackConfig(iterations=2), details=True)
        assert torch.equal(det2[0]["passes"][0]["A_new"], det[0]["A_new"])
        assert max_abs(det2[0]["passes"][1]["A_new"], det[0]["A_new"]) > 1e-6


@pytest.mark.parametrize("isolation", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_two_iterations_equal_the_reference(golden_model, ref_inputs, method, isolation):
    inp = ref_inputs["batch2"]
    cfg = FeedbackConfig(isolation=isolation, iterations=2)
    got = fsa_out(golden_model, inp, method, cfg)
    d = record(f"switches/iterations2/{method}", max_abs(got, reference_fsa(golden_model, inp, method, cfg)))
    assert d <= TOL, d
    assert max_abs(got, fsa_out(golden_model, inp, method, FeedbackConfig(isolation=isolation))) > 1e-6, \
        "the second pass changes the output"


@pytest.mark.parametrize("method", NOT_PROXY)
@pytest.mark.parametrize("blocks,iterations", [((3, 4), 1), ((2, 4), 1), ((3,), 1), ((1, 2, 3, 4), 1), ((3, 4), 2)])
def test_blocks_equal_the_reference(golden_model, ref_inputs, method, blocks, iterations):
    inp = ref_inputs["nonsquare"]
    cfg = FeedbackConfig(blocks=blocks, iterations=iterations)
    got = compute_patch_logits(golden_model, inp.pixels, inp.text, method, feedback=cfg)
    d = record(f"switches/blocks{blocks}x{iterations}/{method}",
               max_abs(got.fsa, reference_fsa(golden_model, inp, method, cfg)))
    assert d <= TOL, d
    assert torch.equal(got.baseline, compute_patch_logits(golden_model, inp.pixels, inp.text, method).baseline)
    paper = fsa_out(golden_model, inp, method, FeedbackConfig(iterations=iterations))
    assert max_abs(got.fsa, paper) > 1e-6, "feeding back into earlier blocks changes the output"


@pytest.mark.parametrize("kw", [dict(ensemble=False), dict(similarity="js", isolation=False), dict(pruning=False),
                                dict(similarity="sym_kl", iterations=2)])
@pytest.mark.parametrize("method", ["vanilla", "maskclip", "gclip"])
def test_blocks_with_other_switches(golden_model, ref_inputs, method, kw):
    inp = ref_inputs["batch2"]
    cfg = FeedbackConfig(blocks=(3, 4), **kw)
    d = record(f"switches/blocks_with/{method}",
               max_abs(fsa_out(golden_model, inp, method, cfg), reference_fsa(golden_model, inp, method, cfg)))
    assert d <= TOL, d


@pytest.mark.parametrize("blocks", [(11, 12), (8, 12), (7, 10)])
def test_gclip_rerun_on_a_deep_model(deep_model, ref_inputs, blocks):
    """12 blocks: suppression 8..12 and fusion 7, 8 on the re-run; (8, 12) adapts a fused block,
    (7, 10) re-runs both fused blocks and leaves the last block to the baseline's variant."""
    inp = ref_inputs["batch2"]
    cfg = FeedbackConfig(blocks=blocks)
    d = record(f"switches/deep_gclip/{blocks}",
               max_abs(fsa_out(deep_model, inp, "gclip", cfg), reference_fsa(deep_model, inp, "gclip", cfg)))
    assert d <= TOL, d


def test_gclip_rerun_keeps_its_suppression_and_fusion(golden_model, ref_inputs):
    """Non-vacuity: dropping suppression or fusion on the re-run would change the output."""
    from fsa.config import GClipConfig

    inp = ref_inputs["nonsquare"]
    cfg = FeedbackConfig(blocks=(2, 4))
    full = fsa_out(golden_model, inp, "gclip", cfg)
    for g in (GClipConfig(channel_suppression=False), GClipConfig(attention_fusion=False)):
        options = MethodOptions(gclip=g)
        other = fsa_out(golden_model, inp, "gclip", cfg, options)
        assert max_abs(full, other) > 1e-6
        assert max_abs(other, reference_fsa(golden_model, inp, "gclip", cfg, options)) <= TOL


# ---------------------------------------------------------------------------------------------
# diagnostics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,cfg", [
    ("clearclip", FeedbackConfig(iterations=2, blocks=(3, 4), similarity="js")),
    ("gclip", FeedbackConfig(iterations=2, blocks=(2, 4))),
    ("maskclip", FeedbackConfig(blocks=(3,), similarity="sym_kl")),
    ("vanilla", FeedbackConfig(iterations=3, ensemble=False)),
    ("proxyclip", FeedbackConfig(iterations=2)),
    ("sclip", FeedbackConfig()),
])
def test_explanation_shows_every_pass_and_block(golden_model, ref_inputs, method, cfg):
    inp = ref_inputs["batch2"]  # two images: the store gets image 1 through select(1)
    out = compute_patch_logits(golden_model, inp.pixels, inp.text, method, feedback=cfg, proxy_features=inp.proxy,
                               keep_details=True)
    _, ref_details = reference_fsa(golden_model, inp, method, cfg, details=True)
    ref = ref_details[1]  # image 1, as the store's
    details = out.details.select(1)
    # stored data stay grid-level: nothing N x N per pass
    n = details.grid[0] * details.grid[1]
    for step in details.steps:
        assert step.pi.shape[1:] == (n, inp.text.shape[0])
        for q, k in step.block_qk.values():
            assert q.shape == k.shape and q.shape[2] == details.clip_grid[0] * details.clip_grid[1] + 1
    height, width = inp.pixels.shape[-2:]
    names = [f"class {i}" for i in range(inp.text.shape[0])]
    store = DiagnosticsStore([Window(0, 0, height, width)], [details], (1.0, 1.0), parse_vocabulary(", ".join(names)))
    gh, gw = details.grid
    depth = len(golden_model.visual.transformer.resblocks)
    adapted = cfg.blocks or (depth,)
    assert len(ref["A0"]) == details.q.shape[1]  # one A0 per head

    def close(got, want):  # rows of the reference, reshaped as the explanation's (stored in float32)
        want = torch.as_tensor(want).reshape(np.shape(got)).numpy()
        return np.allclose(got, want, rtol=1e-6, atol=1e-12)  # float32 rounding: relative 6e-8

    def rows(mats, t):  # per-head (M, M) matrices → (heads, N) rows t over the patch columns
        return torch.stack([m[t, -n:] for m in mats])

    assert len(ref["passes"]) == cfg.iterations
    for row, col in [(0, 0), (gh - 1, gw // 2), (gh // 2, gw - 1)]:
        ex = store.explain((col + 0.5) * width / gw, (row + 0.5) * height / gh)
        assert ex.patch == (row, col)
        p = row * gw + col
        assert len(ex.iterations) == cfg.iterations
        for it, want in zip(ex.iterations, ref["passes"]):
            assert close(it.class_probs, want["Pi"][p])
            assert close(it.attn_new, want["A_new"][p])
            assert close(it.similarity, want["S"][p])
            assert not cfg.pruning or np.array_equal(it.kept, want["keep"][p].reshape(gh, gw).numpy())
            assert [b.block for b in it.blocks] == list(adapted)
            for b in it.blocks:
                a0, a_ens = want["blocks"][b.block]
                t = p + 1 if (b.block < depth or ref["has_cls"]) else p
                assert close(b.attn_original, rows(a0, t)) and close(b.attn_ensemble, rows(a_ens, t))
        last = ex.iterations[-1]
        assert np.array_equal(ex.attn_new, last.attn_new) and np.array_equal(ex.similarity, last.similarity)
        assert np.array_equal(ex.kept, last.kept) and np.array_equal(ex.class_probs, last.class_probs)
        assert np.array_equal(ex.attn_ensemble, last.blocks[-1].attn_ensemble)
        # attn_original keeps its meaning: the baseline's last-block A₀
        assert close(ex.attn_original, rows(ref["A0"], p + 1 if ref["has_cls"] else p))


def test_segmenter_runs_the_switches():
    segmenter = fsa.Segmenter("tiny-test", device="cpu")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)
    cfg = FeedbackConfig(iterations=2, blocks=(3, 4), similarity="js")
    settings = fsa.SegmentSettings(method="naclip", short_side=64, crop=48, stride=32, feedback=cfg)
    res = segmenter.segment(image, "cat; kitten, sofa, sky", settings)
    ex = res.explain(60, 30)
    assert len(ex.iterations) == 2 and [b.block for b in ex.iterations[0].blocks] == [3, 4]
    assert np.allclose(ex.attn_new.sum(), 1.0, atol=1e-5)
    assert ex.class_probs.shape == (3,)
    with pytest.raises(ValueError, match="proxyclip"):
        segmenter.segment(image, "cat, sofa", fsa.SegmentSettings(method="proxyclip", short_side=64, feedback=cfg))
