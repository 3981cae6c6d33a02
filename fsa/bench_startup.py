"""`python -m fsa bench --startup`: how fast the command line and the weight loaders give up.

The tests check *that* these paths fail with the right one-line message and never start a download
(with a hang guard far above the normal time); the times themselves are measured here, where a
loaded machine cannot turn them into a flaky test. Each case runs against a hub that cannot help:
an empty Hugging Face cache and the hub endpoint a closed local port (connection refused), a local
server that accepts connections but never answers, or HF_HUB_OFFLINE set.
"""
from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

#: The directory that holds the `fsa` package, for `python -m fsa` in a subprocess.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


@dataclass
class StartupRow:
    case: str
    median_s: float
    max_s: float
    runs: int
    outcome: str


def closed_port_endpoint() -> str:
    """http://127.0.0.1:PORT with nothing listening on PORT: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@contextlib.contextmanager
def silent_endpoint() -> Iterator[str]:
    """A local endpoint that completes TCP handshakes (backlog) but never answers a request."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # never accept()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


@contextlib.contextmanager
def empty_hub(endpoint: str, offline: bool = False) -> Iterator[None]:
    """In process: an empty HF cache, `endpoint` as the hub and HF_HUB_OFFLINE as given (restored after)."""
    from huggingface_hub import constants

    saved = {k: getattr(constants, k) for k in ("HF_HUB_CACHE", "ENDPOINT", "HF_HUB_OFFLINE")}
    saved_env = {k: os.environ.pop(k, None) for k in ("FSA_CHECKPOINT", "FSA_PROXY_CHECKPOINT")}
    with tempfile.TemporaryDirectory() as cache:
        constants.HF_HUB_CACHE, constants.ENDPOINT, constants.HF_HUB_OFFLINE = cache, endpoint, offline
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(constants, k, v)
            os.environ.update({k: v for k, v in saved_env.items() if v is not None})


def offline_env(hf_home: str, **extra: str) -> dict[str, str]:
    """A subprocess environment without the hub: empty HF_HOME, HF_ENDPOINT a closed port, no proxy."""
    drop = ("HF_HUB_OFFLINE", "FSA_CHECKPOINT", "FSA_PROXY_CHECKPOINT", "HF_HUB_CACHE", "FSA_MODEL")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.lower().endswith("_proxy")}
    path = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env.update(HF_HOME=hf_home, HF_ENDPOINT=closed_port_endpoint(), PYTHONPATH=path, **extra)
    return env


def _time(fn: Callable[[], str], repeats: int) -> tuple[list[float], str]:
    times, outcome = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        outcome = fn()
        times.append(time.perf_counter() - start)
    return times, outcome


def _row(case: str, fn: Callable[[], str], repeats: int) -> StartupRow:
    times, outcome = _time(fn, repeats)
    return StartupRow(case, statistics.median(times), max(times), len(times), outcome)


def _expect_error(load: Callable[[], object]) -> str:
    from .hub import WeightsUnavailableError

    try:
        load()
    except WeightsUnavailableError as exc:
        return "WeightsUnavailableError: " + ("unreachable" if "unreachable" in str(exc) else
                                              "HF_HUB_OFFLINE" if "HF_HUB_OFFLINE" in str(exc) else "other")
    return "loaded (unexpected)"


def startup_rows(repeats: int = 3) -> list[StartupRow]:
    """Times of the failure paths: whole `python -m fsa` processes and in-process weight loads."""
    import numpy as np
    from PIL import Image

    from . import hub
    from .backbones import load_clip
    from .proxies import load_proxy

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "photo.png"
        Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(image)

        def cli(*args: str, **env: str) -> Callable[[], str]:
            def run() -> str:
                proc = subprocess.run([sys.executable, "-m", "fsa", "segment", str(image), "--classes", "cat",
                                       "--out", str(Path(tmp) / "m.png"), *args],
                                      env=offline_env(str(Path(tmp) / "hf"), **env), capture_output=True, text=True,
                                      timeout=600)
                return f"exit {proc.returncode}: {proc.stderr.strip()[:40]}…"
            return run

        rows.append(_row("python -m fsa segment --lam nan (usage error; whole process)",
                         cli("--lam", "nan", FSA_MODEL="ViT-B-16"), repeats))
        rows.append(_row("python -m fsa segment, ViT-B-16 not cached, hub refuses (whole process)",
                         cli(FSA_MODEL="ViT-B-16"), repeats))
        with empty_hub(closed_port_endpoint()):
            rows.append(_row("load_clip ViT-B-16, not cached, hub refuses (in process)",
                             lambda: _expect_error(lambda: load_clip("ViT-B-16", device="cpu")), repeats))
            rows.append(_row("load_proxy dino-b8, not cached, hub refuses (in process)",
                             lambda: _expect_error(lambda: load_proxy("dino-b8", device="cpu")), repeats))
        with silent_endpoint() as endpoint, empty_hub(endpoint):
            rows.append(_row(f"load_clip ViT-B-16, hub never answers (probe {hub.HUB_PROBE_TIMEOUT_S:g} s)",
                             lambda: _expect_error(lambda: load_clip("ViT-B-16", device="cpu")), 1))
        with empty_hub(closed_port_endpoint(), offline=True):
            rows.append(_row("load_clip ViT-H-14 + load_proxy dinov2, HF_HUB_OFFLINE set (in process)",
                             lambda: _expect_error(lambda: load_proxy("dinov2-b14-reg", device="cpu")) + "; "
                             + _expect_error(lambda: load_clip("ViT-H-14", device="cpu")), repeats))
            rows.append(_row("load_proxy mae-b16 + sam-b16, HF_HUB_OFFLINE set (in process)",
                             lambda: _expect_error(lambda: load_proxy("mae-b16", device="cpu")) + "; "
                             + _expect_error(lambda: load_proxy("sam-b16", device="cpu")), repeats))
    return rows


def _fmt(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def format_startup(rows: list[StartupRow]) -> str:
    lines = ["| case | median | max | runs | outcome |", "|---|---|---|---|---|"]
    lines += [f"| {r.case} | {_fmt(r.median_s)} | {_fmt(r.max_s)} | {r.runs} | {r.outcome} |" for r in rows]
    return "\n".join(lines)


def main(repeats: int = 3, machine: str = "") -> int:
    """Print the start-up / offline-failure table (the `bench --startup` entry; `machine` describes the CPU)."""
    rows = startup_rows(max(1, repeats))
    print(f"Start-up and offline failures; {machine}")
    print(format_startup(rows))
    return 0
