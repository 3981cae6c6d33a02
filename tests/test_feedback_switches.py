"""The questions FSA leaves open, as FeedbackConfig switches: similarity, iterations, blocks.

- each similarity form vs a direct float64 N x N x K formula written here (values in (0, 1],
  diagonal exactly 1, exact symmetry where it must hold), on synthetic Π and on the tiny model's Π
  (non-square grids);
- the defaults (iterations=1, blocks=None or [L]) are today's outputs bit for bit, every method;
- iterations=2 equals two explicit applications of fsa.feedback's pure functions;
- blocks that re-run earlier blocks equal an explicit re-run written here with fsa.vision pieces
  (hand-written blocks, explicit per-head A_ens matrices, an explicit uniform attention for U);
- the diagnostics show every pass and every adapted block, equal to the explicit matrices;
- configuration and method errors are ValueErrors naming the problem.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _fixtures_ref import _single_thread  # noqa: F401  (autouse fixture)
from _fixtures_ref import DT, deep_model, max_abs, record, ref_inputs  # noqa: F401  (fixtures)

import fsa
from fsa.attention import attention_weights, baseline_attention
from fsa.config import FeedbackConfig, MethodOptions
from fsa.diagnostics import DiagnosticsStore
from fsa.feedback import (adapted_attention, class_distribution, ensemble_apply, js_divergence, output_similarity,
                          prune_top_p)
from fsa.logits import compute_patch_logits, suppressed_c_proj
from fsa.sliding import Window
from fsa.vision import (block_qkv, embed_tokens, finish_last_block, merge_heads, project_tokens, run_blocks,
                        softmax_attention)
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

def direct_divergence(pi: torch.Tensor, eps: float, kind: str) -> torch.Tensor:
    """(B, N, K) → (B, N, N) in float64 with N x N x K tensors, straight from the definitions."""
    pi = pi.to(DT)
    log = torch.log(pi + eps)
    pi_i, pi_j = pi[:, :, None, :], pi[:, None, :, :]
    kl = (pi_i * (log[:, :, None, :] - log[:, None, :, :])).sum(-1)  # KL(Π_i ‖ Π_j)
    if kind == "kl":
        return kl
    if kind == "sym_kl":  # each KL clamped ≥ 0 as the paper's (a rounding-level difference)
        kl = kl.clamp(min=0.0)
        return 0.5 * (kl + kl.transpose(1, 2))
    m = 0.5 * (pi_i + pi_j)
    log_m = torch.log(m + eps)
    return 0.5 * (pi_i * (log[:, :, None, :] - log_m)).sum(-1) + 0.5 * (pi_j * (log[:, None, :, :] - log_m)).sum(-1)


def direct_similarity(pi, eps, kind):
    return 1.0 / (1.0 + direct_divergence(pi, eps, kind).clamp(min=0.0))


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


@pytest.mark.parametrize("kind", ["sym_kl", "js"])
@pytest.mark.parametrize("method", METHODS)
def test_similarity_end_to_end(golden_model, ref_inputs, kind, method):
    """compute_patch_logits with a similarity form = the explicit pipeline with the direct formula."""
    inp = ref_inputs["nonsquare"]
    cfg = FeedbackConfig(similarity=kind)
    got = compute_patch_logits(golden_model, inp.pixels, inp.text, method, feedback=cfg,
                               proxy_features=inp.proxy).fsa
    want = explicit_fsa(golden_model, inp, method, cfg, similarity=lambda pi: direct_similarity(pi, cfg.eps, kind))
    d = record(f"switches/end_to_end/{kind}/{method}", max_abs(got, want))
    assert d <= TOL, d
    paper = compute_patch_logits(golden_model, inp.pixels, inp.text, method, feedback=FeedbackConfig(),
                                 proxy_features=inp.proxy).fsa
    assert max_abs(got, paper) > 1e-6, "the similarity switch changes the output"


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
# iterations: two explicit applications of the pure functions
# ---------------------------------------------------------------------------------------------

def _gclip_plan(model, method, options):
    """1-based blocks whose c_proj is suppressed (not the last) and whose maps are fused."""
    depth = len(model.visual.transformer.resblocks)
    if method != "gclip":
        return set(), []
    g = options.gclip
    sup = {b for b in g.resolved_suppression_blocks(depth) if b < depth} if g.channel_suppression else set()
    fus = list(g.resolved_fusion_blocks(depth)) if g.attention_fusion else []
    return sup, fus


@pytest.mark.parametrize("isolation", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_two_iterations_equal_two_explicit_applications(golden_model, ref_inputs, method, isolation):
    inp = ref_inputs["batch2"]
    cfg = FeedbackConfig(isolation=isolation, iterations=2)
    visual = golden_model.visual
    blocks = list(visual.transformer.resblocks)
    options = MethodOptions()
    residual, ffn = fsa.METHOD_DEFAULTS[method].residual, fsa.METHOD_DEFAULTS[method].ffn
    proxy = inp.proxy if method == "proxyclip" else None
    with torch.no_grad():
        x, grid = embed_tokens(visual, inp.pixels)
        sup, fus = _gclip_plan(golden_model, method, options)
        overrides = {b - 1: {"mlp.c_proj.weight": suppressed_c_proj(blocks[b - 1].mlp.c_proj.weight)} for b in sup}
        x, maps = run_blocks(blocks[:-1], x, weight_overrides=overrides, capture=[b - 1 for b in fus])
        q, k, v = block_qkv(blocks[-1], x)
        base = baseline_attention(method, q, k, v, grid, proxy_features=proxy,
                                  fused_maps=[maps[b - 1] for b in fus], options=options)

        def cosines(tokens, cls):
            f = project_tokens(visual, tokens)
            return (f[:, 1:] if cls else f) @ inp.text.T

        def last_block(values):
            return cosines(finish_last_block(blocks[-1], x, values, residual=residual, ffn=ffn), base.cls_token)

        z = last_block(base.apply(base.values))
        u = None
        if isolation:  # uniform attention, as an explicit 1/M matrix
            m = base.values.shape[2]
            u = last_block(torch.full((1, 1, m, m), 1.0 / m, dtype=DT) @ base.values)
        outputs = []
        for _ in range(2):
            pi = class_distribution(z, u, cfg)
            sim = output_similarity(pi, cfg.eps)
            a_new = adapted_attention(sim, prune_top_p(sim, cfg.p), cfg.lam)
            z = last_block(ensemble_apply(a_new, base.weights, base.values, cls_token=base.cls_token))
            outputs.append(z.transpose(1, 2).reshape(z.shape[0], z.shape[2], *base.grid))
        got = compute_patch_logits(golden_model, inp.pixels, inp.text, method, feedback=cfg, proxy_features=proxy)
        once = compute_patch_logits(golden_model, inp.pixels, inp.text, method,
                                    feedback=FeedbackConfig(isolation=isolation), proxy_features=proxy)
    assert max_abs(once.fsa, outputs[0]) <= 1e-12
    d = record(f"switches/iterations2/{method}", max_abs(got.fsa, outputs[1]))
    assert d <= 1e-12, d
    assert max_abs(got.fsa, once.fsa) > 1e-6, "the second pass changes the output"


# ---------------------------------------------------------------------------------------------
# blocks: an explicit re-run with fsa.vision pieces
# ---------------------------------------------------------------------------------------------

def _manual_block(block, x, attn, c_proj_weight=None):
    """A residual block with attention matrices attn (B, H, L, L), written out: x + out_proj(A v),
    then + c_proj(act(c_fc(ln_2(·))))."""
    _, _, v = block_qkv(block, x)
    out = x + block.ls_1(block.attn.out_proj(merge_heads(attn @ v)))
    h = F.linear(block.ln_2(out), block.mlp.c_fc.weight, block.mlp.c_fc.bias)
    h = F.linear(block.mlp.gelu(h), block.mlp.c_proj.weight if c_proj_weight is None else c_proj_weight,
                 block.mlp.c_proj.bias)
    return out + block.ls_2(h)


def _ensemble_matrices(a_new, a0, heads, cls_token, ensemble):
    """Explicit (B, H, M, M) A_ens = (E A₀ + A₀ E + E)/3 with E = diag(1, A_new) (CLS) or A_new."""
    b, n, _ = a_new.shape
    e = torch.zeros(b, n + 1, n + 1, dtype=DT) if cls_token else a_new.clone()
    if cls_token:
        e[:, 0, 0] = 1.0
        e[:, 1:, 1:] = a_new
    e = e[:, None].expand(-1, heads, -1, -1)
    if not ensemble:
        return e
    a0 = torch.eye(e.shape[-1], dtype=DT).expand_as(e) if a0 is None else a0.expand_as(e)
    return (e @ a0 + a0 @ e + e) / 3.0


def explicit_fsa(model, inp, method, cfg, options=None, similarity=None, record_passes=None):
    """FSA per method.md §3 and the blocks/iterations rules of fsa.logits, written out here.

    Blocks run by hand (`_manual_block`), A_ens as explicit per-head matrices, U from an explicit
    uniform matrix, Π = softmax(20 Z − 35 U). Returns (B, K, h, w); `record_passes` (a list)
    receives per pass {"pi", "a_new", "blocks": {b: (A₀, A_ens)}}.
    """
    options = options or MethodOptions()
    visual = model.visual
    blocks = list(visual.transformer.resblocks)
    depth = len(blocks)
    adapted = cfg.blocks or (depth,)
    residual, ffn = fsa.METHOD_DEFAULTS[method].residual, fsa.METHOD_DEFAULTS[method].ffn
    proxy = inp.proxy if method == "proxyclip" else None
    sup, fus = _gclip_plan(model, method, options)
    c_proj = {b: suppressed_c_proj(blocks[b - 1].mlp.c_proj.weight) for b in sup}
    sim_of = similarity or (lambda pi: output_similarity(pi, cfg.eps, cfg.similarity))

    with torch.no_grad():
        x0, grid = embed_tokens(visual, inp.pixels)
        entering = [x0]  # tokens entering block b (1-based) at index b - 1
        maps = {}
        for b in range(1, depth):
            x = entering[-1]
            q, k, _ = block_qkv(blocks[b - 1], x)
            a = softmax_attention(q, k)
            if b in fus:
                maps[b] = a.mean(dim=1)
            entering.append(_manual_block(blocks[b - 1], x, a, c_proj.get(b)))

        def last_block(x, maps, adapt=None):
            """(cosines (B, N, K), A₀, A_ens or None, cls) of the last block on tokens x."""
            last = blocks[-1]
            q, k, v = block_qkv(last, x)
            a0 = attention_weights(method, q, k, grid, proxy_features=proxy, fused_maps=[maps[b] for b in fus],
                                   options=options)
            base = baseline_attention(method, q, k, v, grid, proxy_features=proxy,
                                      fused_maps=[maps[b] for b in fus], options=options)
            heads = v.shape[1]
            a = a0 if adapt is None else _ensemble_matrices(adapt, a0, heads, base.cls_token, cfg.ensemble)
            values = base.values if a is None else (a @ base.values if a.shape[1] == heads
                                                     else a.expand(-1, heads, -1, -1) @ base.values)
            out = finish_last_block(last, x, values, residual=residual, ffn=ffn)
            f = project_tokens(visual, out)
            return (f[:, 1:] if base.cls_token else f) @ inp.text.T, a0, a, base

        z, _, _, base = last_block(entering[-1], maps)
        u = None
        if cfg.isolation:
            m = base.values.shape[2]
            uniform = torch.full((1, 1, m, m), 1.0 / m, dtype=DT) @ base.values
            out = finish_last_block(blocks[-1], entering[-1], uniform, residual=residual, ffn=ffn)
            f = project_tokens(visual, out)
            u = (f[:, 1:] if base.cls_token else f) @ inp.text.T
        for _ in range(cfg.iterations):
            logits = cfg.feedback_scale * z - (cfg.isolation_scale * u if u is not None else 0.0)
            pi = torch.softmax(logits, dim=-1)
            sim = sim_of(pi)
            keep = prune_top_p(sim, cfg.p) if cfg.pruning else None
            a_new = adapted_attention(sim, keep, cfg.lam)
            passed = {"pi": pi, "a_new": a_new, "blocks": {}}
            first = adapted[0]
            x = entering[first - 1] if first < depth else entering[-1]
            pass_maps = {b: m for b, m in maps.items() if b < first}
            for b in range(first, depth):
                q, k, _ = block_qkv(blocks[b - 1], x)
                a0 = softmax_attention(q, k)
                if b in fus:
                    pass_maps[b] = a0.mean(dim=1)
                a = a0
                if b in adapted:
                    a = _ensemble_matrices(a_new, a0, a0.shape[1], True, cfg.ensemble)
                    passed["blocks"][b] = (a0, a)
                x = _manual_block(blocks[b - 1], x, a, c_proj.get(b))
            z, a0, a, _ = last_block(x, pass_maps if first < depth else maps, a_new if depth in adapted else None)
            if depth in adapted:
                passed["blocks"][depth] = (a0, a)
            if record_passes is not None:
                record_passes.append(passed)
        gh, gw = base.grid
        return z.transpose(1, 2).reshape(z.shape[0], z.shape[2], gh, gw)


@pytest.mark.parametrize("method", NOT_PROXY)
@pytest.mark.parametrize("blocks,iterations", [((3, 4), 1), ((2, 4), 1), ((3,), 1), ((1, 2, 3, 4), 1), ((3, 4), 2)])
def test_blocks_equal_an_explicit_rerun(golden_model, ref_inputs, method, blocks, iterations):
    inp = ref_inputs["nonsquare"]
    cfg = FeedbackConfig(blocks=blocks, iterations=iterations)
    got = compute_patch_logits(golden_model, inp.pixels, inp.text, method, feedback=cfg)
    want = explicit_fsa(golden_model, inp, method, cfg)
    d = record(f"switches/blocks{blocks}x{iterations}/{method}", max_abs(got.fsa, want))
    assert d <= TOL, d
    assert torch.equal(got.baseline, compute_patch_logits(golden_model, inp.pixels, inp.text, method).baseline)
    paper = compute_patch_logits(golden_model, inp.pixels, inp.text, method, feedback=FeedbackConfig(
        iterations=iterations)).fsa
    assert max_abs(got.fsa, paper) > 1e-6, "feeding back into earlier blocks changes the output"


@pytest.mark.parametrize("kw", [dict(ensemble=False), dict(similarity="js", isolation=False), dict(pruning=False)])
@pytest.mark.parametrize("method", ["vanilla", "maskclip", "gclip"])
def test_blocks_with_other_switches(golden_model, ref_inputs, method, kw):
    inp = ref_inputs["batch2"]
    cfg = FeedbackConfig(blocks=(3, 4), **kw)
    got = compute_patch_logits(golden_model, inp.pixels, inp.text, method, feedback=cfg).fsa
    assert max_abs(got, explicit_fsa(golden_model, inp, method, cfg)) <= TOL


def test_the_explicit_pipeline_is_the_paper(golden_model, ref_inputs):
    """Sanity of the test's own pipeline: with the paper's settings it is compute_patch_logits."""
    inp = ref_inputs["batch2"]
    for method in METHODS:
        got = compute_patch_logits(golden_model, inp.pixels, inp.text, method, feedback=FeedbackConfig(),
                                   proxy_features=inp.proxy).fsa
        assert max_abs(got, explicit_fsa(golden_model, inp, method, FeedbackConfig())) <= TOL, method


@pytest.mark.parametrize("blocks", [(11, 12), (8, 12), (7, 10)])
def test_gclip_rerun_on_a_deep_model(deep_model, ref_inputs, blocks):
    """12 blocks: suppression 8..12 and fusion 7, 8 on the re-run; (8, 12) adapts a fused block,
    (7, 10) re-runs both fused blocks and leaves the last block to the baseline's variant."""
    inp = ref_inputs["batch2"]
    cfg = FeedbackConfig(blocks=blocks)
    got = compute_patch_logits(deep_model, inp.pixels, inp.text, "gclip", feedback=cfg).fsa
    d = record(f"switches/deep_gclip/{blocks}", max_abs(got, explicit_fsa(deep_model, inp, "gclip", cfg)))
    assert d <= TOL, d


def test_gclip_rerun_keeps_its_suppression_and_fusion(golden_model, ref_inputs):
    """Non-vacuity: dropping suppression or fusion on the re-run would change the output."""
    from fsa.config import GClipConfig

    inp = ref_inputs["nonsquare"]
    cfg = FeedbackConfig(blocks=(2, 4))
    full = compute_patch_logits(golden_model, inp.pixels, inp.text, "gclip", feedback=cfg).fsa
    for g in (GClipConfig(channel_suppression=False), GClipConfig(attention_fusion=False)):
        other = compute_patch_logits(golden_model, inp.pixels, inp.text, "gclip", feedback=cfg,
                                     options=MethodOptions(gclip=g)).fsa
        assert max_abs(full, other) > 1e-6
        assert max_abs(other, explicit_fsa(golden_model, inp, "gclip", cfg, MethodOptions(gclip=g))) <= TOL


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
    passes: list = []
    explicit_fsa(golden_model, inp, method, cfg, record_passes=passes)
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
    heads = details.q.shape[1]
    for row, col in [(0, 0), (gh - 1, gw // 2), (gh // 2, gw - 1)]:
        ex = store.explain((col + 0.5) * width / gw, (row + 0.5) * height / gh)
        assert ex.patch == (row, col)
        p = row * gw + col
        assert len(ex.iterations) == cfg.iterations
        for it, want in zip(ex.iterations, passes):
            assert np.allclose(it.class_probs, want["pi"][1, p].numpy(), atol=1e-12)
            assert np.allclose(it.attn_new, want["a_new"][1, p].reshape(gh, gw).numpy(), atol=1e-12)
            s = direct_similarity(want["pi"][1:2], cfg.eps, cfg.similarity)[0, p]
            assert np.allclose(it.similarity, s.reshape(gh, gw).numpy(), atol=1e-12)
            assert np.array_equal(it.kept, (want["a_new"][1, p] > 0).reshape(gh, gw).numpy()) or not cfg.pruning
            assert [b.block for b in it.blocks] == list(adapted)
            for b in it.blocks:
                a0, a_ens = want["blocks"][b.block]
                cls = b.block < depth or method != "proxyclip"
                t = p + 1 if cls else p
                a0 = torch.eye(a_ens.shape[-1], dtype=DT)[None, None] if a0 is None else a0
                a0_rows = a0[1].expand(heads, -1, -1)[:, t, -n:]
                assert np.allclose(b.attn_original, a0_rows.reshape(heads, gh, gw).numpy(), atol=1e-12)
                assert np.allclose(b.attn_ensemble, a_ens[1, :, t, -n:].reshape(heads, gh, gw).numpy(), atol=1e-12)
        last = ex.iterations[-1]
        assert np.array_equal(ex.attn_new, last.attn_new) and np.array_equal(ex.similarity, last.similarity)
        assert np.array_equal(ex.kept, last.kept) and np.array_equal(ex.class_probs, last.class_probs)
        assert np.array_equal(ex.attn_ensemble, last.blocks[-1].attn_ensemble)
        # attn_original keeps its meaning: the baseline's last-block A₀
        base_a0 = attention_weights(method, details.q, details.k, details.clip_grid,
                                    proxy_features=details.proxy_features, fused_maps=details.fused_maps)
        if base_a0 is not None:
            t = p + 1 if details.cls_token else p
            want_rows = base_a0[0].expand(heads, -1, -1)[:, t, -n:].reshape(heads, gh, gw)
            assert np.allclose(ex.attn_original, want_rows.numpy(), atol=1e-12)


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


@pytest.mark.parametrize("method", ["clearclip", "vanilla", "gclip", "proxyclip"])
def test_switches_fp16_model_agrees_with_fp32(method):
    """The CUDA configuration (fp16 model, fp32 feedback maths) with every switch on, on the CPU."""
    from fsa.backbones import tiny_test_clip

    m32, m16 = tiny_test_clip().eval(), tiny_test_clip().half().eval()
    depth = len(m32.visual.transformer.resblocks)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 80, 112, generator=g)
    text = F.normalize(torch.randn(5, m32.visual.output_dim, generator=g), dim=-1)
    proxy = torch.randn(1, 16, 6, 9, generator=g)
    blocks = None if method == "proxyclip" else (depth - 1, depth)
    for kind in ("sym_kl", "js"):
        cfg = FeedbackConfig(similarity=kind, iterations=2, blocks=blocks)
        ref = fsa.patch_logits(m32, pixels, text, method, feedback=cfg, proxy_features=proxy)
        half = fsa.patch_logits(m16, pixels.half(), text.half(), method, feedback=cfg, proxy_features=proxy.half())
        assert half.dtype == torch.float32 and torch.isfinite(half).all()
        assert (half - ref).abs().max() < 2e-2
