"""`python -m fsa bench` rows on the cost of FSA's feedback step and of compare-all.

- (f) the feedback step alone at ProxyCLIP's N = 1764, K = 171, today's exact step (the KL product as it
  was, `prune_top_p_sorted`, the ensemble on the proxy grid's values) → ours, and top-p alone;
- (g) a SAM-sized ProxyCLIP (proxy grid 64×64, N = 4096, K = 171, proxy features given);
- (h) the step's scaling over N ∈ {441, 1764, 4096} × K ∈ {21, 171, 847}: ours vs the published
  formulation (N×N×K KL tensors, per-head N×N·N×N products) where it fits;
- (e) compare-all of the seven baselines with FSA on a 640×480 image: one by one vs shared.
Every pair is timed interleaved in the same run (medians), so ratios hold on a loaded machine.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .bench_timing import Row, _fmt_s, _sync, naive_feedback_step, peak_of, proxyclip_pair, time_pair
from .config import METHODS, FeedbackConfig, SegmentSettings
from .feedback import UpsampledValues, adapt_values, adapted_attention, ensemble_apply, feedback_attention
from .logits import compute_patch_logits
from .top_p import prune_top_p, prune_top_p_sorted

#: The published formulation is run only where its N×N×K tensors fit in this much memory ...
NAIVE_MAX_BYTES = 8 << 30
#: ... and its per-head N×N·N×N ensemble products stay below this many FLOP.
NAIVE_MAX_FLOP = 4e11


def kl_today(pi: torch.Tensor, eps: float) -> torch.Tensor:
    """`fsa.feedback.kl_divergence` as it was before the subnormal guard (the reference row's KL)."""
    g = torch.log(pi + eps)
    h = (pi * g).sum(dim=-1, keepdim=True)
    kl = torch.baddbmm(h, pi, g.transpose(1, 2), beta=1.0, alpha=-1.0)
    kl.diagonal(dim1=-2, dim2=-1).zero_()
    return kl.clamp_(min=0.0)


def today_feedback_step(pi, a0, v, cfg: FeedbackConfig):
    """Today's exact step, kept as the reference: KL product, sorted top-p, ensemble on the fine values."""
    sim = kl_today(pi, cfg.eps).add_(1.0).reciprocal_()
    keep = prune_top_p_sorted(sim, cfg.p) if cfg.pruning else None
    return ensemble_apply(adapted_attention(sim, keep, cfg.lam), a0, v, cls_token=False)


def ours_feedback_step(pi, a0, v, up: Optional[UpsampledValues], cfg: FeedbackConfig):
    """The library's step: `feedback_attention`, then the ensemble on CLIP's grid where v is an upsampling."""
    return adapt_values(feedback_attention(pi, cfg), a0, v, cfg, cls_token=False, upsampled=up)


def step_inputs(n_side: int, k: int, device, *, coarse: int = 21, heads: int = 12, head_dim: int = 64, seed: int = 0,
                pi: Optional[torch.Tensor] = None):
    """Π (1, N, K) (softmax of 20·randn unless given), A₀ (1, 1, N, N), values (1, H, N, d) bilinearly upsampled
    from a coarse × coarse grid (ProxyCLIP's CLIP grid at a 336 crop) and their `UpsampledValues` (None when
    the grids are equal)."""
    g = torch.Generator().manual_seed(seed)
    n = n_side * n_side
    if pi is None:
        pi = torch.softmax(20 * torch.randn(1, n, k, generator=g), dim=-1)
    a0 = torch.softmax(torch.randn(1, 1, n, n, generator=g), dim=-1)
    vc = torch.randn(1, heads, coarse * coarse, head_dim, generator=g)
    grid = vc.reshape(heads, coarse, coarse, head_dim).permute(0, 3, 1, 2)
    v = F.interpolate(grid, size=(n_side, n_side), mode="bilinear", align_corners=False)
    v = v.permute(0, 2, 3, 1).reshape(1, heads, n, head_dim)
    up = None if coarse == n_side else UpsampledValues(vc.to(device), (coarse, coarse), (n_side, n_side))
    return pi.to(device), a0.to(device), v.to(device), up


def _step_row(case: str, pi, a0, v, up, cfg, device, repeats: int, note: str = "") -> Row:
    today = lambda: today_feedback_step(pi, a0, v, cfg)  # noqa: E731
    ours = lambda: ours_feedback_step(pi, a0, v, up, cfg)  # noqa: E731
    tt, to = time_pair(today, ours, device, repeats)
    mt, mo = peak_of(today, device), peak_of(ours, device)
    diff = (today() - ours()).abs().max().item()
    return Row(case, _fmt_s(tt), _fmt_s(to), f"{to / tt:.3f}", "≤ 0.50", f"{mt:.0f} → {mo:.0f}",
               f"{note}max |diff| {diff:.1e}".strip())


def _top_p_row(case: str, sim, p: float, device, repeats: int) -> Row:
    ref = lambda: prune_top_p_sorted(sim, p)  # noqa: E731
    ours = lambda: prune_top_p(sim, p)  # noqa: E731
    tr, to = time_pair(ref, ours, device, repeats)
    wrong = int((ref() != ours()).sum())
    return Row(case, _fmt_s(tr), _fmt_s(to), f"{to / tr:.3f}", "", "", f"{wrong} of {sim.numel()} entries differ")


def pipeline_pi(model, device, dtype, k: int = 171, proxy_grid: int = 42, crop: int = 336) -> torch.Tensor:
    """Π of the ProxyCLIP pass of row (b) (random weights, proxy features given): (1, N, K)."""
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(1, 3, crop, crop, generator=g).to(device=device, dtype=dtype)
    text = F.normalize(torch.randn(k, model.visual.output_dim, generator=g), dim=-1).to(device=device, dtype=dtype)
    proxy = torch.randn(1, 768, proxy_grid, proxy_grid, generator=g).to(device=device, dtype=dtype)
    out = compute_patch_logits(model, pixels, text, "proxyclip", feedback=FeedbackConfig(), proxy_features=proxy,
                               keep_details=True)
    return out.details.pi.float()


def bench_feedback_step(model, device, dtype, repeats: int, k: int = 171, side: int = 42) -> list[Row]:
    """(f) The step alone at N = side², K: today's exact step → ours, for the bench's synthetic Π (softmax of
    20·randn: near one-hot, with runs of equal similarities) and for Π from the ProxyCLIP pass; top-p alone."""
    from .feedback import output_similarity

    cfg = FeedbackConfig()
    n = side * side
    rows = []
    synthetic = step_inputs(side, k, device, seed=2)
    real_pi = pipeline_pi(model, device, dtype, k=k, proxy_grid=side)
    rows.append(_step_row(f"(f) feedback step alone, N={n}, K={k}, synthetic Π: today → ours", *synthetic, cfg,
                          device, repeats))
    pi, a0, v, up = step_inputs(side, k, device, seed=2, pi=real_pi)
    rows.append(_step_row("(f) same, Π of the ProxyCLIP pass: today → ours", pi, a0, v, up, cfg, device, repeats))
    for label, p in (("synthetic", synthetic[0]), ("ProxyCLIP pass", pi)):
        sim = output_similarity(p, cfg.eps)
        rows.append(_top_p_row(f"(f) top-p alone, N={n}, {label} Π: sorted → ours", sim, cfg.p, device, repeats))
    return rows


def bench_sam(model, device, dtype, repeats: int, k: int = 171, proxy_grid: int = 64, channels: int = 256,
              crop: int = 336) -> Row:
    """(g) ProxyCLIP with a SAM-sized proxy grid (64×64: N = 4096), proxy features given (random)."""
    base, fsa = proxyclip_pair(model, device, dtype, k=k, crop=crop, channels=channels,
                               grid=(proxy_grid, proxy_grid), seed=4)
    tb, tf = time_pair(base, fsa, device, repeats)
    extra = peak_of(fsa, device) - peak_of(base, device)
    n = proxy_grid * proxy_grid
    return Row(f"(g) ProxyCLIP, SAM-sized proxy grid {proxy_grid}×{proxy_grid} (N={n}), K={k}", _fmt_s(tb),
               _fmt_s(tf), f"{tf / tb:.3f}", "≤ 2.0, ≤ 512 MiB", f"{extra:.0f}",
               f"CLIP crop {crop}, {channels}-channel proxy features given")


def _time_once(fn: Callable[[], object], device) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def scaling_table(device, sides=(21, 42, 64), ks=(21, 171, 847), repeats: int = 3) -> str:
    """(h) The feedback step for N = side² × K: ours vs the published formulation, time and extra peak memory."""
    cfg = FeedbackConfig()
    lines = ["| N | K | ours | ours peak MiB | published | published peak MiB |", "|---|---|---|---|---|---|"]
    for side in sides:
        n = side * side
        for k in ks:
            pi, a0, v, up = step_inputs(side, k, device, seed=side + k)
            ours = lambda: ours_feedback_step(pi, a0, v, up, cfg)  # noqa: E731
            t_ours = statistics.median(_time_once(ours, device) for _ in range(repeats))
            m_ours = peak_of(ours, device)
            kl_bytes = 2 * n * n * k * pi.element_size()  # Π_i·(G_i − G_j) and its difference, N×N×K each
            flop = 2 * 2 * v.shape[1] * n ** 3  # A_new·A₀ and A₀·A_new per head
            if kl_bytes > NAIVE_MAX_BYTES:
                naive, m_naive = f"does not fit ({kl_bytes / 2**30:.0f} GiB of N×N×K tensors)", "-"
            elif flop > NAIVE_MAX_FLOP:
                naive, m_naive = f"not run ({flop / 1e12:.1f} TFLOP of per-head N×N·N×N products)", "-"
            else:
                run = lambda: naive_feedback_step(pi, a0, v, cfg)  # noqa: E731
                naive, m_naive = _fmt_s(_time_once(run, device)), f"{peak_of(run, device):.0f}"
            lines.append(f"| {n} | {k} | {_fmt_s(t_ours)} | {m_ours:.0f} | {naive} | {m_naive} |")
            del pi, a0, v, up
    return "\n".join(lines)


def compare_all_inputs(model, device, dtype, *, classes: int = 20, size=(480, 640), methods=METHODS,
                       tiny_proxy: bool = False):
    """A segmenter over `model` with a random DINO ViT-B/8 proxy (the tiny test proxy with tiny_proxy), a random
    image, the vocabulary, the settings."""
    from .evaluation.throughput import random_proxy
    from .proxies import load_proxy
    from .segmenter import Segmenter

    proxy = None
    if "proxyclip" in methods:
        proxy = load_proxy("tiny-test", device=device) if tiny_proxy else random_proxy(device, dtype)
    segmenter = Segmenter.from_model(model, name="random weights", device=device, proxy="dino-b8", proxy_model=proxy)
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    vocab = ", ".join(f"class {i}" for i in range(classes))
    settings = [SegmentSettings(method=m, keep_diagnostics=False) for m in methods]
    return segmenter, image, vocab, settings


def same_masks(alone, outcomes) -> bool:
    """Each method's masks and confidences from compare-all equal those of the method run alone."""
    for pair, outcome in zip(alone, outcomes):
        got = outcome.result
        for a, b in ((pair.baseline, got.baseline), (pair.fsa, got.fsa)):
            if not (np.array_equal(a.labels, b.labels) and np.array_equal(a.confidence, b.confidence)):
                return False
    return True


def bench_compare_all(model, device, dtype, repeats: int, *, classes: int = 20, size=(480, 640),
                      methods=METHODS, tiny_proxy: bool = False) -> Row:
    """(e) Every method with FSA on one image: `Segmenter.compare` per method vs `Segmenter.compare_methods`."""
    segmenter, image, vocab, settings = compare_all_inputs(model, device, dtype, classes=classes, size=size,
                                                           methods=methods, tiny_proxy=tiny_proxy)
    results = {}
    one_by_one = lambda: results.__setitem__("alone", [segmenter.compare(image, vocab, s) for s in settings])  # noqa
    shared = lambda: results.__setitem__("shared", segmenter.compare_methods(image, vocab, settings))  # noqa
    ta, ts = time_pair(one_by_one, shared, device, repeats)
    same = same_masks(results["alone"], results["shared"])
    label = "7 baselines" if len(methods) == len(METHODS) else f"{len(methods)} baselines (no ProxyCLIP)"
    note = "masks equal" if same else "MASKS DIFFER"
    if "proxyclip" in methods:
        note += "; ProxyCLIP's proxy forward cannot be shared" + ("" if tiny_proxy else " (DINO ViT-B/8)")
    return Row(f"(e) compare-all, {label} + FSA, {size[1]}×{size[0]}, {classes} classes: one by one → shared",
               _fmt_s(ta), _fmt_s(ts), f"{ts / ta:.3f}", "≤ 0.50", "", note)


def feedback_rows(model, device, dtype, repeats: int, *, quick: bool = False) -> list[Row]:
    """Rows (f) and (g); tiny sizes with quick."""
    if quick:
        return bench_feedback_step(model, device, dtype, 1, k=5, side=18) + [
            bench_sam(model, device, dtype, 1, k=5, proxy_grid=12, channels=16, crop=64)]
    return bench_feedback_step(model, device, dtype, repeats) + [bench_sam(model, device, dtype, repeats)]


def compare_rows(model, device, dtype, repeats: int, *, quick: bool = False) -> list[Row]:
    """Rows (e): all seven baselines, and the six without ProxyCLIP's proxy model."""
    if quick:
        return [bench_compare_all(model, device, dtype, 1, classes=4, size=(60, 80), tiny_proxy=True)]
    six = tuple(m for m in METHODS if m != "proxyclip")
    return [bench_compare_all(model, device, dtype, repeats),
            bench_compare_all(model, device, dtype, repeats, methods=six)]
