"""`python -m fsa bench`: FSA's cost over each baseline, on the real ViT-B/16 architecture.

Random weights have the real cost (no download is needed). Times are medians of repeated runs
after a warm-up; peak memory is the CUDA allocator's peak on a GPU, and on the CPU the process's
peak resident set (VmHWM, reset before each measurement through /proc/self/clear_refs, with glibc
told to give large blocks back to the system so that freed memory shows).
"""
from __future__ import annotations

import argparse
import ctypes
import platform
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .config import FeedbackConfig
from .feedback import adapted_attention, ensemble_apply, output_similarity, prune_top_p
from .logits import compute_patch_logits


@dataclass
class Row:
    case: str
    baseline: str
    fsa: str
    ratio: str
    goal: str
    extra_mib: str
    note: str = ""


class PeakMemory:
    """Peak memory (MiB) above the level at entry, for one block of code."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib = float("nan")

    @staticmethod
    def _status(field: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as fh:
                match = re.search(rf"{field}:\s+(\d+) kB", fh.read())
        except OSError:
            return None
        return int(match.group(1)) if match else None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _release_freed_memory()
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # resets VmHWM to the current resident set
            except OSError:
                pass
            self._start = (self._status("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = self._status("VmHWM")
            peak = hwm * 1024 if hwm is not None else float("nan")
        self.peak_mib = (peak - self._start) / 2**20


def _release_freed_memory() -> None:
    """Make glibc return large freed blocks to the OS, so peak RSS tracks live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: large blocks are mmap'ed, unmapped on free
        libc.malloc_trim(0)
    except OSError:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_pair(base: Callable[[], object], fsa: Callable[[], object], device: torch.device,
              repeats: int) -> tuple[float, float]:
    """Median seconds of baseline and FSA, calls interleaved so that load on the machine hits both."""
    base(), fsa()
    _sync(device)
    tb, tf = [], []
    for _ in range(repeats):
        for fn, out in ((base, tb), (fsa, tf)):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - t0)
    return statistics.median(tb), statistics.median(tf)


def peak_of(fn: Callable[[], object], device: torch.device) -> float:
    with PeakMemory(device) as mem:
        fn()
    return mem.peak_mib


def random_clip(arch: str, device: torch.device, dtype: torch.dtype):
    """An open_clip model of the real architecture with seeded random weights."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def naive_feedback_step(pi, a0, v, cfg: FeedbackConfig):
    """The published formulation: N×N×K KL tensors and per-head N×N·N×N ensemble products."""
    g = torch.log(pi + cfg.eps)
    kl = (pi[:, :, None, :] * (g[:, :, None, :] - g[:, None, :, :])).sum(-1)
    sim = 1.0 / (1.0 + kl.clamp(min=0.0))
    keep = prune_top_p(sim, cfg.p) if cfg.pruning else None
    a_new = adapted_attention(sim, keep, cfg.lam)[:, None]
    a0_heads = a0.expand(-1, v.shape[1], -1, -1)
    a_ens = (a_new @ a0_heads + a0_heads @ a_new + a_new) / 3.0
    return a_ens @ v


def efficient_feedback_step(pi, a0, v, cfg: FeedbackConfig):
    sim = output_similarity(pi, cfg.eps)
    keep = prune_top_p(sim, cfg.p) if cfg.pruning else None
    a_new = adapted_attention(sim, keep, cfg.lam)
    return ensemble_apply(a_new, a0, v, cls_token=False)


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


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
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(1, 3, crop, crop, generator=g).to(device=device, dtype=dtype)
    text = F.normalize(torch.randn(k, model.visual.output_dim, generator=g), dim=-1).to(device=device, dtype=dtype)
    proxy = torch.randn(1, 768, proxy_grid, proxy_grid, generator=g).to(device=device, dtype=dtype)
    cfg = FeedbackConfig()
    base = lambda: compute_patch_logits(model, pixels, text, "proxyclip", proxy_features=proxy)  # noqa: E731
    fsa = lambda: compute_patch_logits(model, pixels, text, "proxyclip", feedback=cfg, proxy_features=proxy)  # noqa
    tb, tf = time_pair(base, fsa, device, repeats)
    extra = peak_of(fsa, device) - peak_of(base, device)
    n = proxy_grid * proxy_grid
    rows = [Row(f"(b) ProxyCLIP, proxy grid {proxy_grid}×{proxy_grid} (N={n}), K={k}", _fmt_s(tb), _fmt_s(tf),
                f"{tf / tb:.3f}", "≤ 1.25, ≤ 256 MiB", f"{extra:.0f}", "CLIP + attention, proxy features given")]
    if proxy_model:
        t_proxy = _proxy_forward_time(device, dtype, crop, repeats=1)
        rows.append(Row("(b) same, with the DINO ViT-B/8 forward", _fmt_s(tb + t_proxy), _fmt_s(tf + t_proxy),
                        f"{(tf + t_proxy) / (tb + t_proxy):.3f}", "≤ 1.25", f"{extra:.0f}",
                        f"proxy forward {_fmt_s(t_proxy)} (random weights)"))

    # The feedback step alone, efficient vs naive, from the same Π, A₀ and values.
    heads, d = model.visual.transformer.resblocks[-1].attn.num_heads, model.visual.transformer.width
    pi = torch.softmax(20 * torch.randn(1, n, k, generator=g), dim=-1).to(device)
    a0 = torch.softmax(torch.randn(1, 1, n, n, generator=g), dim=-1).to(device)
    v = torch.randn(1, heads, n, d // heads, generator=g).to(device)
    eff = lambda: efficient_feedback_step(pi, a0, v, cfg)  # noqa: E731
    nai = lambda: naive_feedback_step(pi, a0, v, cfg)  # noqa: E731
    te, tn = time_call(eff, device, repeats), time_call(nai, device, 1)
    me, mn = peak_of(eff, device), peak_of(nai, device)
    diff = (eff() - nai()).abs().max().item()
    rows.append(Row(f"(b) feedback step alone, N={n}, K={k}: naive → ours", _fmt_s(tn), _fmt_s(te),
                    f"{te / tn:.3f}", "", f"{mn:.0f} → {me:.0f}", f"max |diff| {diff:.1e}"))
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
    g = torch.Generator().manual_seed(5)
    pixels = torch.randn(1, 3, crop, crop, generator=g).to(device=device, dtype=dtype)
    text = F.normalize(torch.randn(k, model.visual.output_dim, generator=g), dim=-1).to(device=device, dtype=dtype)
    cfg = FeedbackConfig()
    for name in names:
        spec = proxy_spec(name)
        gh, gw = spec.grid(crop, crop, crop)
        proxy = torch.randn(1, spec.channels, gh, gw, generator=g).to(device=device, dtype=dtype)
        base = lambda proxy=proxy: compute_patch_logits(model, pixels, text, "proxyclip", proxy_features=proxy)  # noqa
        fsa = lambda proxy=proxy: compute_patch_logits(model, pixels, text, "proxyclip", feedback=cfg,  # noqa: E731
                                                       proxy_features=proxy)
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


def format_table(rows: list[Row]) -> str:
    head = Row("case", "baseline", "FSA", "FSA/base", "goal", "extra peak MiB", "note")
    cols = list(zip(*[(r.case, r.baseline, r.fsa, r.ratio, r.goal, r.extra_mib, r.note) for r in [head, *rows]]))
    widths = [max(len(c) for c in col) for col in cols]
    lines = []
    for i, r in enumerate([head, *rows]):
        cells = (r.case, r.baseline, r.fsa, r.ratio, r.goal, r.extra_mib, r.note)
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"device: {name}; torch {torch.__version__}"


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
    if args.quick:
        from .backbones import tiny_test_clip

        model = tiny_test_clip().to(device=device, dtype=dtype).eval().requires_grad_(False)
        rows = [bench_clearclip(model, device, dtype, 1, k=4, size=64)]
        rows += bench_proxyclip(model, device, dtype, 1, k=5, proxy_grid=6, crop=64, proxy_model=False)
        rows += bench_proxy_families(model, device, dtype, 1, k=5, crop=64, names=("tiny-test-mae", "tiny-test-sam"),
                                     proxy_model=False)
        rows.append(bench_second_point(model, device, dtype, size=64))
        rows += bench_switches(model, device, dtype, 1, k=4, size=64, proxy_k=5, proxy_grid=6, crop=64)
    else:
        model = random_clip(args.arch, device, dtype)
        rows = [bench_clearclip(model, device, dtype, args.repeats)]
        rows += bench_proxyclip(model, device, dtype, args.repeats, proxy_model=not args.no_proxy_model)
        rows += bench_proxy_families(model, device, dtype, args.repeats, proxy_model=not args.no_proxy_model)
        rows.append(bench_second_point(model, device, dtype))
        rows += bench_switches(model, device, dtype, args.repeats)
    print(f"FSA benchmark, {args.arch if not args.quick else 'tiny-test'} with random weights; {machine_line(device)}")
    print(format_table(rows))
    return 0


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
