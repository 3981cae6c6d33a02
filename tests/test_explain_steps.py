"""The step-by-step fields of the patch explanation (issue 8): Z_i, U_i, Π_i per query and per class,
Ŝ[i], the kept set, A_new[i], A_ens[i] of every pass, against formulas written out here on the
golden tiny CLIP (float64):

- Z = 20 · cos, cos of an independent run (the baseline's for pass 1, a run with t−1 passes for t);
- U = 35 · cos under an explicit uniform attention matrix (1/M everywhere) in the last block;
- Π = softmax(Z − U) (softmax(Z) with isolation off), the class's value the max over its synonyms;
- Ŝ_ij = 1/(1 + KL(Π_i‖Π_j)) with ε = 1e-10, top-p kept set, A_new = softmax(Ŝ·exp(λŜ)) over it;
- A_ens[i] = ((E A₀)[i] + (A₀ E)[i] + E[i]) / 3 with E = diag(1, A_new), explicit matrices.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from _fixtures_ref import _single_thread  # noqa: F401  (autouse fixture)
from _fixtures_ref import DT, ref_inputs  # noqa: F401  (fixtures)

import fsa
from fsa.attention import attention_weights, baseline_attention
from fsa.config import FeedbackConfig
from fsa.diagnostics import DiagnosticsStore
from fsa.logits import compute_patch_logits
from fsa.sliding import Window
from fsa.vision import block_qkv, embed_tokens, finish_last_block, project_tokens, run_blocks
from fsa.vocabulary import parse_vocabulary

#: 7 queries (the golden text), 3 classes with synonyms: class 0 = q0|q1, class 1 = q2|q3|q4, class 2 = q5|q6
VOCAB = "q0; q1, q2; q3; q4, q5; q6"
EPS = 1e-10
#: the maps on the grid are stored in float32 (Z, U, Π per query in float64)
F32 = 1e-6


def _flat(grid_cos: torch.Tensor) -> np.ndarray:
    """(B, K, h, w) → (B, N, K) float64."""
    b, k = grid_cos.shape[:2]
    return grid_cos.reshape(b, k, -1).transpose(1, 2).to(DT).numpy()


def _uniform_cosines(model, inp, method) -> np.ndarray:
    """(B, N, K) cosines of the last block run with the explicit uniform matrix 1/M (M tokens attended)."""
    visual = model.visual
    blocks = list(visual.transformer.resblocks)
    rule = fsa.METHOD_DEFAULTS[method]
    proxy = inp.proxy if method == "proxyclip" else None
    with torch.no_grad():
        x, grid = embed_tokens(visual, inp.pixels)
        x, _ = run_blocks(blocks[:-1], x)
        q, k, v = block_qkv(blocks[-1], x)
        base = baseline_attention(method, q, k, v, grid, proxy_features=proxy)
        m = base.values.shape[2]
        uniform = torch.full((1, 1, m, m), 1.0 / m, dtype=DT) @ base.values
        out = finish_last_block(blocks[-1], x, uniform, residual=rule.residual, ffn=rule.ffn)
        f = project_tokens(visual, out)
        f = f[:, 1:] if base.cls_token else f
        return (f @ inp.text.T).numpy()


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _kl_row(pi: np.ndarray, i: int) -> np.ndarray:
    """KL(Π_i‖Π_j) for every j, with ε inside the logarithms only (the published convention)."""
    return np.maximum((pi[i] * (np.log(pi[i] + EPS) - np.log(pi + EPS))).sum(axis=-1), 0.0)


def _kept_row(sim_row: np.ndarray, p: float) -> np.ndarray:
    order = np.argsort(-sim_row, kind="stable")
    w = _softmax(sim_row[order])
    keep_sorted = np.cumsum(w) <= p
    keep_sorted[0] = True
    kept = np.zeros_like(keep_sorted)
    kept[order] = keep_sorted
    return kept


def _store(out, inp, index: int = 1) -> DiagnosticsStore:
    height, width = inp.pixels.shape[-2:]
    return DiagnosticsStore([Window(0, 0, height, width)], [out.details.select(index)], (1.0, 1.0),
                            parse_vocabulary(VOCAB))


def _explain(store: DiagnosticsStore, row: int, col: int):
    gh, gw = store.details[0].grid
    win = store.windows[0]
    return store.explain((col + 0.5) * win.width / gw, (row + 0.5) * win.height / gh)


CASES = [
    ("clearclip", FeedbackConfig()),  # no residual: U is one row for every patch
    ("vanilla", FeedbackConfig(iterations=2)),  # residual: each patch has its own U
    ("naclip", FeedbackConfig(iterations=3, blocks=(3, 4))),
    ("maskclip", FeedbackConfig(isolation=False, iterations=2)),
    ("proxyclip", FeedbackConfig(iterations=2)),  # Z, U, Π on the proxy grid
    ("sclip", FeedbackConfig(similarity="js", pruning=False)),
]


@pytest.mark.parametrize("method,cfg", CASES)
def test_step_fields_follow_the_formulas(golden_model, ref_inputs, method, cfg):
    inp = ref_inputs["batch2"]
    proxy = inp.proxy if method == "proxyclip" else None
    run = lambda feedback, keep=False: compute_patch_logits(  # noqa: E731
        golden_model, inp.pixels, inp.text, method, feedback=feedback, proxy_features=proxy, keep_details=keep)
    out = run(cfg, keep=True)
    # Z of pass t: 20 · the cosines of an independent run with t − 1 passes (the baseline for t = 1)
    z_cos = [_flat(run(None).baseline)] + [_flat(run(replace(cfg, iterations=t)).fsa)
                                           for t in range(1, cfg.iterations)]
    u_cos = _uniform_cosines(golden_model, inp, method) if cfg.isolation else None
    vocab = parse_vocabulary(VOCAB)
    to_class = np.array(vocab.query_to_class)
    store = _store(out, inp)
    gh, gw = store.details[0].grid
    n = gh * gw
    # only grid-level data are stored: (1, N, K) cosines per pass, U one row per patch or one for all
    for step in store.details[0].steps:
        assert step.z_cos.shape == (1, n, 7)
    if cfg.isolation:
        rows = n if fsa.METHOD_DEFAULTS[method].residual else 1
        assert store.details[0].u_cos.shape == (1, rows, 7)
    else:
        assert store.details[0].u_cos is None
    for row, col in [(0, 0), (gh - 1, gw // 2), (gh // 2, gw - 1)]:
        ex = _explain(store, row, col)
        p = row * gw + col
        assert ex.query_names == list(vocab.queries) and ex.feedback == cfg
        assert ex.query_classes == [0, 0, 1, 1, 1, 2, 2]
        assert len(ex.iterations) == cfg.iterations
        for t, it in enumerate(ex.iterations):
            z = 20.0 * z_cos[t][1]  # (N, K): every patch, for Ŝ's other side
            np.testing.assert_allclose(it.feedback_logits, z[p], rtol=0, atol=1e-11)
            if cfg.isolation:
                u = 35.0 * np.broadcast_to(u_cos[1], z.shape)
                np.testing.assert_allclose(it.isolation_logits, u[p], rtol=0, atol=1e-11)
                pi = _softmax(z - u)
            else:
                assert it.isolation_logits is None
                pi = _softmax(z)
            np.testing.assert_allclose(it.query_probs, pi[p], rtol=0, atol=1e-12)
            # ... and Π from the explanation's own Z and U: the chart's numbers add up
            own = it.feedback_logits - (it.isolation_logits if cfg.isolation else 0.0)
            np.testing.assert_allclose(it.query_probs, _softmax(own), rtol=0, atol=1e-12)
            by_class = [pi[p][to_class == c].max() for c in range(len(vocab.classes))]
            np.testing.assert_allclose(it.class_probs, by_class, rtol=1e-6, atol=1e-7)  # stored in float32
            if cfg.similarity == "kl":
                sim = 1.0 / (1.0 + _kl_row(pi, p))
            else:  # js: ½KL(Π_i‖M) + ½KL(Π_j‖M), M = ½(Π_i + Π_j)
                mix = 0.5 * (pi[p] + pi)
                js = 0.5 * (pi[p] * np.log(pi[p] + EPS)).sum() + 0.5 * (pi * np.log(pi + EPS)).sum(-1) \
                    - (mix * np.log(mix + EPS)).sum(-1)
                sim = 1.0 / (1.0 + np.maximum(js, 0.0))
            sim[p] = 1.0
            np.testing.assert_allclose(it.similarity.ravel(), sim, rtol=0, atol=F32)
            kept = _kept_row(sim, cfg.p) if cfg.pruning else np.ones(n, bool)
            np.testing.assert_array_equal(it.kept.ravel(), kept)
            logits = np.where(kept, sim * np.exp(cfg.lam * sim), -np.inf)
            np.testing.assert_allclose(it.attn_new.ravel(), _softmax(logits), rtol=0, atol=F32)
            assert it.attn_ensemble is it.blocks[-1].attn_ensemble
            assert it.blocks[-1].block == (cfg.blocks or (4,))[-1]


def test_ensemble_row_from_explicit_matrices(golden_model, ref_inputs):
    """A_ens[i] (per head and the head mean) of the paper's setting from explicit (H, L, L) matrices."""
    inp = ref_inputs["nonsquare"]
    cfg = FeedbackConfig()
    out = compute_patch_logits(golden_model, inp.pixels, inp.text, "clearclip", feedback=cfg, keep_details=True)
    details = out.details
    height, width = inp.pixels.shape[-2:]
    vocab = parse_vocabulary("a, b, c, d, e")
    store = DiagnosticsStore([Window(0, 0, height, width)], [details.select(0)], (1.0, 1.0), vocab)
    gh, gw = details.grid
    n = gh * gw
    a0 = attention_weights("clearclip", details.q, details.k, details.clip_grid)[0].numpy()  # (H, L, L)
    heads = a0.shape[0]
    z = 20.0 * _flat(out.baseline)[0]
    pi = _softmax(z - 35.0 * _uniform_cosines(golden_model, inp, "clearclip")[0])
    a_new = np.zeros((n, n))
    for i in range(n):
        sim = 1.0 / (1.0 + _kl_row(pi, i))
        sim[i] = 1.0
        a_new[i] = _softmax(np.where(_kept_row(sim, cfg.p), sim * np.exp(cfg.lam * sim), -np.inf))
    e = np.zeros((n + 1, n + 1))
    e[0, 0] = 1.0
    e[1:, 1:] = a_new
    ens = (e @ a0 + a0 @ e + e) / 3.0  # (H, L, L)
    for row, col in [(0, 0), (gh - 1, gw - 1), (2, 3)]:
        ex = _explain(store, row, col)
        t = row * gw + col + 1
        want = ens[:, t, 1:].reshape(heads, gh, gw)
        np.testing.assert_allclose(ex.iterations[0].attn_ensemble, want, rtol=0, atol=F32)
        np.testing.assert_allclose(ex.head_view(ex.iterations[0].attn_ensemble), want.mean(0), rtol=0, atol=F32)
        np.testing.assert_allclose(ex.iterations[0].attn_new, a_new[t - 1].reshape(gh, gw), rtol=0, atol=F32)


def test_segmenter_explanation_carries_the_steps():
    """Through fsa.Segmenter (sliding windows, tiny-test model): the fields are there and consistent."""
    segmenter = fsa.Segmenter("tiny-test", device="cpu")
    image = np.random.default_rng(3).integers(0, 256, (70, 100, 3), dtype=np.uint8)
    cfg = FeedbackConfig(iterations=2, similarity="sym_kl")
    res = segmenter.segment(image, "cat; kitten, sofa, sky", fsa.SegmentSettings(
        method="clearclip", short_side=64, crop=48, stride=32, feedback=cfg))
    ex = res.explain(60, 30)
    assert ex.query_names == ["cat", "kitten", "sofa", "sky"] and ex.feedback == cfg
    for it in ex.iterations:
        assert it.feedback_logits.shape == it.isolation_logits.shape == it.query_probs.shape == (4,)
        np.testing.assert_allclose(it.query_probs, _softmax(it.feedback_logits - it.isolation_logits), atol=1e-6)
        np.testing.assert_allclose(it.class_probs, [it.query_probs[:2].max(), *it.query_probs[2:]], atol=1e-6)
    # pass 2 feeds back pass 1's output: its Z differs from the baseline's
    assert np.abs(ex.iterations[1].feedback_logits - ex.iterations[0].feedback_logits).max() > 1e-6
    np.testing.assert_array_equal(ex.iterations[0].isolation_logits, ex.iterations[1].isolation_logits)
