"""`python -m fsa bench`: FSA's cost over each baseline, on the real ViT-B/16 architecture.

Random weights have the real cost (no download is needed). Times are medians of repeated runs
after a warm-up; peak memory is the CUDA allocator's peak on a GPU, and on the CPU the process's
peak resident set (VmHWM, reset before each measurement through /proc/self/clear_refs, with glibc
told to give large blocks back to the system so that freed memory shows).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .config import FeedbackConfig
from .logits import compute_patch_logits
from .bench_timing import (
    Row,
    time_call,
    time_pair,
    peak_of,
    random_clip,
    _fmt_s,
    format_table,
    machine_line,
    proxyclip_pair,
)


def bench_clearclip(model, device, dtype, repeats: int, k: int = 20, size: int = 448) -> Row:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(1, 3, size, size, generator=g).to(device=device, dtype=dtype)
    text = F.normalize(torch.randn(k, model.visual.output_dim, generator=g), dim=-1).to(device=device, dtype=dtype)
    cfg = FeedbackConfig()
    base = lambda: compute_patch_logits(model, pixels, text, "clearclip")  # noqa: E731
    fsa = lambda: compute_patch_logits(model, pixels, text, "clearclip", feedback=cfg)  # noqa: E731
    tb, tf = time_pair(base, fsa, device, repeats)
    extra = peak_of(fsa, device) - peak_of(base, device)
    return Row(f"(a) ClearCLIP {size}×{size}, K={k}", _fmt_s(tb), _fmt_s(tf), f"{tf / tb:.3f}", "≤ 1.10",
               f"{extra:.0f}")


def bench_proxyclip(model, device, dtype, repeats: int, k: int = 171, proxy_grid: int = 42, crop: int = 336,
                    proxy_model: bool = True) -> list[Row]:
    base, fsa = proxyclip_pair(model, device, dtype, k=k, crop=crop, channels=768, grid=(proxy_grid, proxy_grid),
                               seed=2)
    tb, tf = time_pair(base, fsa, device, repeats)
    extra = peak_of(fsa, device) - peak_of(base, device)
    n = proxy_grid * proxy_grid
    rows = [Row(f"(b) ProxyCLIP, proxy grid {proxy_grid}×{proxy_grid} (N={n}), K={k}", _fmt_s(tb), _fmt_s(tf),
                f"{tf / tb:.3f}", "≤ 1.20, ≤ 256 MiB", f"{extra:.0f}", "CLIP + attention, proxy features given")]
    if proxy_model:
        t_proxy = _proxy_forward_time(device, dtype, crop, repeats=1)
        rows.append(Row("(b) same, with the DINO ViT-B/8 forward", _fmt_s(tb + t_proxy), _fmt_s(tf + t_proxy),
                        f"{(tf + t_proxy) / (tb + t_proxy):.3f}", "≤ 1.20", f"{extra:.0f}",
                        f"proxy forward {_fmt_s(t_proxy)} (random weights)"))

    return rows


def proxy_forward_seconds(name: str, device, dtype, crop: int = 336, repeats: int = 1) -> float:
    """Median seconds of one proxy forward of a crop × crop window (the published input chain, MAE at
    slide_crop = crop) with seeded random weights of the real architecture (a stand-in's for tiny-test-*)."""
    from .proxies import ProxyModel, proxy_spec
    from .proxy_models import build_proxy_model

    spec = proxy_spec(name)
    model = build_proxy_model(spec.family, stand_in=spec.is_test_model)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    proxy = ProxyModel(spec.name, model, device=device, is_test_model=True)
    size = -(-crop // 56) * 56  # the window as ProxyCLIP pads it (multiples of 56)
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(4)).to(device=device, dtype=dtype)
    return time_call(lambda: proxy.features_from_clip_pixels(pixels, crop=crop), device, repeats)


def bench_proxy_families(model, device, dtype, repeats: int, k: int = 171, crop: int = 336,
                         names=("mae-b16", "sam-b16"), proxy_model: bool = True) -> list[Row]:
    """(b) ProxyCLIP with the MAE and SAM proxies, proxy features given: each one's grid and width for a
    crop × crop window (MAE (crop/16)², SAM always 64×64, N = 4096); with `proxy_model`, the note
    adds the proxy's own forward per window (random weights)."""
    from .proxies import proxy_spec

    rows = []
    for i, name in enumerate(names):
        spec = proxy_spec(name)
        gh, gw = spec.grid(crop, crop, crop)
        base, fsa = proxyclip_pair(model, device, dtype, k=k, crop=crop, channels=spec.channels, grid=(gh, gw),
                                   seed=5 + i)
        note = "proxy features given"
        if proxy_model:
            note += f"; {spec.label} forward {_fmt_s(proxy_forward_seconds(name, device, dtype, crop))} per window"
        rows.append(_pair_row(f"(b) ProxyCLIP, {spec.label} proxy {gh}×{gw} (N={gh * gw}), K={k}", base, fsa,
                              device, repeats, note))
    return rows


def bench_proxy_forwards(device, dtype, repeats: int, crop: int = 336, names=None) -> str:
    """Table: seconds of each proxy's forward per crop × crop window (padded to 56 as ProxyCLIP does;
    MAE at slide_crop = crop), real architectures with random weights."""
    from .config import PROXIES
    from .proxies import proxy_spec

    size = -(-crop // 56) * 56
    cells = [("proxy", "window", "proxy input", "grid (N)", "seconds per window")]
    for name in names or PROXIES:
        spec = proxy_spec(name)
        gh, gw = spec.grid(size, size, crop)
        side = spec.input_side(size, size, crop) or size
        seconds = proxy_forward_seconds(name, device, dtype, crop, repeats)
        cells.append((f"{spec.label} ({spec.name})", f"{size}×{size}", f"{side}×{side}", f"{gh}×{gw} ({gh * gw})",
                      _fmt_s(seconds)))
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _pair_row(case: str, base: Callable[[], object], fsa: Callable[[], object], device, repeats: int,
              note: str = "") -> Row:
    tb, tf = time_pair(base, fsa, device, repeats)
    extra = peak_of(fsa, device) - peak_of(base, device)
    return Row(case, _fmt_s(tb), _fmt_s(tf), f"{tf / tb:.3f}", "", f"{extra:.0f}", note)


def bench_switches(model, device, dtype, repeats: int, k: int = 20, size: int = 448, proxy_k: int = 171,
                   proxy_grid: int = 42, crop: int = 336) -> list[Row]:
    """(d) FeedbackConfig's switches beyond the paper, each against the same baseline.

    ClearCLIP size×size with K classes: iterations=2, sym_kl, js, feedback into the last two
    blocks; and js on ProxyCLIP's large proxy grid, where its loop over the classes costs most.
    """
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(1, 3, size, size, generator=g).to(device=device, dtype=dtype)
    text = F.normalize(torch.randn(k, model.visual.output_dim, generator=g), dim=-1).to(device=device, dtype=dtype)
    depth = len(model.visual.transformer.resblocks)
    n = (size // int(model.visual.conv1.kernel_size[0])) ** 2
    base = lambda: compute_patch_logits(model, pixels, text, "clearclip")  # noqa: E731
    rows = []
    for label, cfg, note in [
        ("iterations=2", FeedbackConfig(iterations=2), "one more last block + feedback step"),
        ("similarity=sym_kl", FeedbackConfig(similarity="sym_kl"), ""),
        ("similarity=js", FeedbackConfig(similarity="js"), "loop over class chunks, N×N each"),
        (f"blocks=({depth - 1}, {depth})", FeedbackConfig(blocks=(depth - 1, depth)), "re-runs the last two blocks"),
    ]:
        fsa = lambda cfg=cfg: compute_patch_logits(model, pixels, text, "clearclip", feedback=cfg)  # noqa: E731
        rows.append(_pair_row(f"(d) ClearCLIP {size}×{size} (N={n}), K={k}, FSA {label}", base, fsa, device,
                              repeats, note))
    pixels = torch.randn(1, 3, crop, crop, generator=g).to(device=device, dtype=dtype)
    text = F.normalize(torch.randn(proxy_k, model.visual.output_dim, generator=g), dim=-1).to(device=device,
                                                                                             dtype=dtype)
    proxy = torch.randn(1, 768, proxy_grid, proxy_grid, generator=g).to(device=device, dtype=dtype)
    cfg = FeedbackConfig(similarity="js")
    base = lambda: compute_patch_logits(model, pixels, text, "proxyclip", proxy_features=proxy)  # noqa: E731
    fsa = lambda: compute_patch_logits(model, pixels, text, "proxyclip", feedback=cfg, proxy_features=proxy)  # noqa
    rows.append(_pair_row(f"(d) ProxyCLIP N={proxy_grid * proxy_grid}, K={proxy_k}, FSA similarity=js", base, fsa,
                          device, repeats, "proxy features given"))
    return rows


def _proxy_forward_time(device, dtype, crop: int, repeats: int) -> float:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch8_224", pretrained=False, dynamic_img_size=True)
    vit = vit.to(device=device, dtype=dtype).eval().requires_grad_(False)
    x = torch.randn(1, 3, crop, crop).to(device=device, dtype=dtype)
    with torch.no_grad():
        return time_call(lambda: vit.forward_features(x), device, repeats)


def bench_second_point(model, device, dtype, size: int = 448) -> Row:
    """(c) A segmentation, then two clicks in the same image: time to the second click's maps."""
    import numpy as np

    from .config import SegmentSettings
    from .segmenter import Segmenter

    segmenter = Segmenter.from_model(model, name="ViT-B-16 (random weights)", device=device)
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    vocab = ", ".join(f"class {i}" for i in range(20))
    result = segmenter.segment(image, vocab, SegmentSettings(method="clearclip"))
    t0 = time.perf_counter()
    result.explain(0.2 * size, 0.3 * size)
    first = time.perf_counter() - t0
    seconds = []
    for fx, fy in [(0.7, 0.4), (0.1, 0.9), (0.5, 0.5)]:
        x, y = fx * size, fy * size
        t0 = time.perf_counter()
        result.explain(x, y)
        seconds.append(time.perf_counter() - t0)
    second = statistics.median(seconds)
    return Row(f"(c) second point, ClearCLIP {size}×{size}", f"first {_fmt_s(first)}", _fmt_s(second), "",
               "≤ 150 ms", "", "no network rerun")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsa bench", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-16-quickgelu", help="open_clip architecture (random weights)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test of the table")
    parser.add_argument("--no-proxy-model", action="store_true", help="skip the proxy models' forward timings")
    parser.add_argument("--proxy-forward", action="store_true",
                        help="instead: seconds per 336×336 window of each proxy's forward (DINO, DINOv2, MAE, SAM)")
    parser.add_argument("--eval", nargs="?", const="proxyclip", default=None, metavar="METHOD",
                        help="instead: images/s of the evaluation protocol per benchmark with METHOD + FSA "
                             "(default proxyclip) and each benchmark's projected full time")
    parser.add_argument("--benchmarks", default=None, help="with --eval: comma-separated benchmarks (default all 8)")
    parser.add_argument("--startup", action="store_true",
                        help="instead: how fast the command line and the weight loaders fail offline (fsa.bench_startup)")
    parser.add_argument("--sections", default="all",
                        help="comma-separated: base (rows a-d), feedback (f, g: the feedback step, a SAM-sized "
                             "proxy), compare (e: compare-all), scaling (h: the step over N × K); default all")
    args = parser.parse_args(argv)
    if args.startup:
        from .bench_startup import main as startup_main

        return startup_main(args.repeats, machine_line(torch.device("cpu")))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.eval is not None:
        return _eval_throughput(args, device, dtype)
    if args.proxy_forward:
        from .config import TINY_PROXIES

        names = tuple(TINY_PROXIES.values()) if args.quick else None
        table = bench_proxy_forwards(device, dtype, args.repeats, crop=64 if args.quick else 336, names=names)
        print(f"Proxy forwards, {'stand-ins' if args.quick else 'ViT-B'} with random weights; {machine_line(device)}")
        print(table)
        return 0
    sections = {"base", "feedback", "compare", "scaling"} if args.sections == "all" else set(args.sections.split(","))
    if args.quick:
        from .backbones import tiny_test_clip

        model = tiny_test_clip().to(device=device, dtype=dtype).eval().requires_grad_(False)
    else:
        model = random_clip(args.arch, device, dtype)
    rows = []
    if "base" in sections and args.quick:
        rows = [bench_clearclip(model, device, dtype, 1, k=4, size=64)]
        rows += bench_proxyclip(model, device, dtype, 1, k=5, proxy_grid=6, crop=64, proxy_model=False)
        rows += bench_proxy_families(model, device, dtype, 1, k=5, crop=64, names=("tiny-test-mae", "tiny-test-sam"),
                                     proxy_model=False)
        rows.append(bench_second_point(model, device, dtype, size=64))
        rows += bench_switches(model, device, dtype, 1, k=4, size=64, proxy_k=5, proxy_grid=6, crop=64)
    elif "base" in sections:
        rows = [bench_clearclip(model, device, dtype, args.repeats)]
        rows += bench_proxyclip(model, device, dtype, args.repeats, proxy_model=not args.no_proxy_model)
        rows += bench_proxy_families(model, device, dtype, args.repeats, proxy_model=not args.no_proxy_model)
        rows.append(bench_second_point(model, device, dtype))
        rows += bench_switches(model, device, dtype, args.repeats)
    rows += _feedback_sections(model, device, dtype, args, sections)
    print(f"FSA benchmark, {args.arch if not args.quick else 'tiny-test'} with random weights; {machine_line(device)}")
    print(format_table(rows))
    if "scaling" in sections:
        from .bench_feedback import scaling_table

        print("\n(h) the feedback step alone (ours vs the published formulation), time and extra peak memory:")
        print(scaling_table(device, sides=(6, 12), ks=(3, 9), repeats=1) if args.quick else scaling_table(device))
    return 0


def _feedback_sections(model, device, dtype, args, sections: set) -> list[Row]:
    """Rows (e), (f), (g) of fsa.bench_feedback: the feedback step's cost and compare-all."""
    from .bench_feedback import compare_rows, feedback_rows

    rows = []
    if "feedback" in sections:
        rows += feedback_rows(model, device, dtype, args.repeats, quick=args.quick)
    if "compare" in sections:
        rows += compare_rows(model, device, dtype, min(args.repeats, 3), quick=args.quick)
    return rows


def _eval_throughput(args, device: torch.device, dtype: torch.dtype) -> int:
    from .config import check_method
    from .evaluation.presets import BENCHMARK_ORDER
    from .evaluation.throughput import format_rows, measure, random_proxy
    from .segmenter import Segmenter

    method = check_method(args.eval)
    benchmarks = BENCHMARK_ORDER if not args.benchmarks else tuple(b.strip() for b in args.benchmarks.split(","))
    if args.quick:
        from .backbones import tiny_test_clip
        from .proxies import load_proxy

        model = tiny_test_clip().to(device=device, dtype=dtype).eval().requires_grad_(False)
        proxy = load_proxy("tiny-test", device=device) if method == "proxyclip" else None
        scale, arch = 0.15, "tiny-test"
    else:
        model = random_clip(args.arch, device, dtype)
        proxy = random_proxy(device, dtype) if method == "proxyclip" else None
        scale, arch = 1.0, args.arch
    clip = Segmenter.from_model(model, name=arch).load()
    rows = measure(clip, method, benchmarks, repeats=max(1, min(args.repeats, 3)), proxy=proxy, size_scale=scale)
    print(f"Evaluation throughput, {arch} with random weights (published presets, one image per size); "
          f"{machine_line(device)}")
    print(format_rows(rows, method))
    return 0
