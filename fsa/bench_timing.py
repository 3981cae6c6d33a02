"""Measuring tools of the benchmarks (`fsa.bench`, `fsa.bench_feedback`): interleaved medians, peak memory,
the table's rows, and the published formulation of the feedback step as the reference row.

Peak memory is the CUDA allocator's peak on a GPU, and on the CPU the process's peak resident set
(VmHWM, reset before each measurement through /proc/self/clear_refs, with glibc told to give large
blocks back to the system so that freed memory shows).
"""
from __future__ import annotations

import ctypes
import platform
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import FeedbackConfig
from .feedback import adapted_attention
from .top_p import prune_top_p_sorted
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
            _reuse_freed_memory()
        self.peak_mib = (peak - self._start) / 2**20


def _reuse_freed_memory() -> None:
    """Back to an allocator that keeps freed blocks (up to 32 MiB) for reuse, as glibc's default settles on
    after the first large frees: timings must not pay a fresh mmap and its page faults for every temporary."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    except OSError:
        pass


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
    """The published formulation: N×N×K KL tensors, the sorted top-p and per-head N×N·N×N ensemble products."""
    g = torch.log(pi + cfg.eps)
    kl = (pi[:, :, None, :] * (g[:, :, None, :] - g[:, None, :, :])).sum(-1)
    sim = 1.0 / (1.0 + kl.clamp(min=0.0))
    keep = prune_top_p_sorted(sim, cfg.p) if cfg.pruning else None
    a_new = adapted_attention(sim, keep, cfg.lam)[:, None]
    a0_heads = a0.expand(-1, v.shape[1], -1, -1)
    a_ens = (a_new @ a0_heads + a0_heads @ a_new + a_new) / 3.0
    return a_ens @ v


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


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


def proxyclip_pair(model, device, dtype, *, k: int, crop: int, channels: int, grid: tuple[int, int],
                   seed: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """ProxyCLIP without and with FSA (paper settings) on one crop × crop window: seeded random pixels, K
    random L2-normalised text features and (1, channels, *grid) proxy features given. → (baseline, FSA) calls."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, 3, crop, crop, generator=g).to(device=device, dtype=dtype)
    text = torch.nn.functional.normalize(torch.randn(k, model.visual.output_dim, generator=g), dim=-1)
    text = text.to(device=device, dtype=dtype)
    proxy = torch.randn(1, channels, *grid, generator=g).to(device=device, dtype=dtype)
    cfg = FeedbackConfig()

    def baseline():
        return compute_patch_logits(model, pixels, text, "proxyclip", proxy_features=proxy)

    def with_fsa():
        return compute_patch_logits(model, pixels, text, "proxyclip", feedback=cfg, proxy_features=proxy)

    return baseline, with_fsa
