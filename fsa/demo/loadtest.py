"""Load test of the demo app: ``python -m fsa loadtest`` (also ``python -m fsa.demo.loadtest``).

Starts the app (``python -m fsa.demo``, as ``python app.py`` starts it) on a loopback port with its own
temp folder, drives it with ``gradio_client`` (bounded request loops only) and prints what a public Space must survive:

- peaks: the server's extra memory for one huge upload (10000×10000 JPEG and PNG), many classes, a
  compare-all, and that requests over the budgets are refused with a message instead;
- clicks: the latency of cached ``/attention`` clicks while many sessions segment at once;
- soak: a mix of ``/segment``, ``/attention`` and ``/compare_all``: RSS and the temp folder over time;
- sessions: many sessions that segment once and leave: RSS until their state is gone.

Run it by hand (minutes, not a test). Memory figures are the server's RSS sampled every 20 ms;
timings depend on the machine and on what else runs there.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .assets import EXAMPLES_DIR, REPO_ROOT

PHASES = ("peaks", "clicks", "soak", "sessions")
MB = 2**20


@dataclass
class Row:
    """One line of the report."""

    phase: str
    requests: int = 0
    rss_before: float = 0.0  #: MB
    rss_after: float = 0.0
    peak_extra: float = 0.0
    temp_mb: float = 0.0
    note: str = ""


@dataclass
class Server:
    """The app (`python -m fsa.demo`) in a subprocess, and its RSS sampled in a thread."""

    process: subprocess.Popen
    url: str
    temp_dir: Path
    log_path: Path
    samples: list = field(default_factory=list)  #: (monotonic time, RSS bytes)
    _stop: threading.Event = field(default_factory=threading.Event)

    def rss(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def start_sampling(self, every: float = 0.02) -> None:
        def loop() -> None:
            while not self._stop.is_set() and self.process.poll() is None:
                self.samples.append((time.monotonic(), self.rss()))
                time.sleep(every)

        threading.Thread(target=loop, name="rss-sampler", daemon=True).start()

    def peak_since(self, start: float) -> int:
        return max((rss for t, rss in self.samples if t >= start), default=self.rss())

    def temp_bytes(self) -> tuple[int, int]:
        """(bytes of files, number of files and folders) under the server's temp folder."""
        size = count = 0
        for path in self.temp_dir.rglob("*"):
            count += 1
            if path.is_file():
                size += path.stat().st_size
        return size, count

    def stop(self) -> None:
        self._stop.set()
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path, args: argparse.Namespace) -> Server:
    port = _free_port()
    # The folder that holds this `fsa` package first on the server's path, so that it runs this very code;
    # OMP_WAIT_POLICY as app.py sets it (it must be in the environment before torch loads OpenMP).
    root = str(REPO_ROOT)
    python_path = os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), PYTHONPATH=python_path,
               FSA_MODEL=args.model, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               GRADIO_TEMP_DIR=str(work / "gradio"), GRADIO_ANALYTICS_ENABLED="False",
               FSA_SESSION_TTL=str(args.session_ttl), FSA_TEMP_TTL=str(args.temp_ttl))
    if args.checkpoint:
        env["FSA_CHECKPOINT"] = args.checkpoint
    log_path = work / "server.log"
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "fsa.demo"], cwd=root, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}; see {log_path}")
        try:
            urllib.request.urlopen(url + "config", timeout=5).read()
            break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        raise TimeoutError(f"the app did not answer on {url} within 300 s; see {log_path}")
    server = Server(process, url, work / "gradio", log_path)
    server.start_sampling()
    return server


def make_images(folder: Path, big_side: int) -> dict[str, Path]:
    """Photo-like test images (the examples, upscaled), and the over-budget ones."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # this process writes the huge files on purpose
    photo = Image.open(EXAMPLES_DIR / "coffee.jpg").convert("RGB")
    cat = Image.open(EXAMPLES_DIR / "chelsea_cat.jpg").convert("RGB")
    paths = {"small": folder / "small_640x480.jpg", "medium": folder / "cat_2000x1500.jpg",
             "large": folder / "coffee_2000x1500.png", "big_jpeg": folder / f"big_{big_side}.jpg",
             "big_png": folder / f"big_{big_side}.png", "over": folder / "over_budget.png"}
    photo.resize((640, 480), Image.Resampling.BICUBIC).save(paths["small"], quality=90)
    cat.resize((2000, 1500), Image.Resampling.BICUBIC).save(paths["medium"], quality=90)
    photo.resize((2000, 1500), Image.Resampling.BICUBIC).save(paths["large"])
    big = photo.resize((big_side, big_side), Image.Resampling.BILINEAR)
    big.save(paths["big_jpeg"], quality=90)
    big.save(paths["big_png"], compress_level=1)
    del big
    Image.new("RGB", (12000, 11000), (90, 120, 150)).save(paths["over"])  # 132 MP > FSA_MAX_PIXELS
    return paths


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _vocabulary(n: int) -> str:
    return ", ".join(f"object number {i}" for i in range(n))


class LoadTest:
    def __init__(self, server: Server, images: dict[str, Path], args: argparse.Namespace):
        from gradio_client import Client, handle_file

        self.server, self.images, self.args = server, images, args
        self.Client, self.handle_file = Client, handle_file
        self.rows: list[Row] = []
        self.warm_rss = server.rss()

    def client(self):
        return self.Client(self.server.url, verbose=False)

    def segment(self, client, image: str, vocabulary: str = "cup, table, background"):
        return client.predict(self.handle_file(str(self.images[image])), vocabulary, api_name="/segment")

    def attention(self, client, image: str, x: float, y: float, vocabulary: str = "cup, table, background"):
        return client.predict(self.handle_file(str(self.images[image])), vocabulary, "clearclip", x, y,
                              api_name="/attention")

    def compare(self, client, image: str, vocabulary: str = "cup, table, background"):
        return client.predict(self.handle_file(str(self.images[image])), vocabulary, api_name="/compare_all")

    def _row(self, phase: str, requests: int, before: int, start: float, note: str = "") -> Row:
        temp, _ = self.server.temp_bytes()
        row = Row(phase, requests, before / MB, self.server.rss() / MB, (self.server.peak_since(start) - before) / MB,
                  temp / MB, note)
        self.rows.append(row)
        print(f"  {phase}: peak +{row.peak_extra:.0f} MB, RSS {row.rss_after:.0f} MB {note}", flush=True)
        return row

    # -- phases -------------------------------------------------------------------------------
    def warm_up(self) -> None:
        client = self.client()
        start, before = time.monotonic(), self.server.rss()
        for image in ("small", "medium", "large"):
            self.segment(client, image)
            self.attention(client, image, 100, 100)
        self.compare(client, "small")
        client.close()
        time.sleep(2)
        self.warm_rss = self.server.rss()
        self._row("warm-up", 7, before, start)

    def peaks(self) -> None:
        from gradio_client.exceptions import AppError

        client = self.client()
        cases: list[tuple[str, Callable[[], object], bool]] = [
            (f"{self.args.big}² JPEG /segment", lambda: self.segment(client, "big_jpeg"), True),
            (f"{self.args.big}² PNG /segment", lambda: self.segment(client, "big_png"), True),
            (f"{self.args.classes} classes 2000×1500 /segment",
             lambda: self.segment(client, "medium", _vocabulary(self.args.classes)), True),
            ("20 classes 2000×1500 /compare_all", lambda: self.compare(client, "medium", _vocabulary(20)), True),
            (f"{self.args.classes + 50} classes /segment (over budget)",
             lambda: self.segment(client, "small", _vocabulary(self.args.classes + 50)), False),
            ("12000×11000 PNG (over budget)", lambda: self.segment(client, "over"), False),
        ]
        for name, call, should_work in cases:
            time.sleep(1.0)
            start, before = time.monotonic(), self.server.rss()
            try:
                call()
                note = "answered" if should_work else "ANSWERED (expected a refusal)"
            except AppError as exc:
                text = " ".join(str(exc).split())
                note = ("refused: " if not should_work else "FAILED: ") + text[:110]
            self._row(name, 1, before, start, note)
        client.close()

    def clicks(self) -> None:
        clicker = self.client()
        self.segment(clicker, "small")  # the clicker's cached pass
        rng = random.Random(1)
        idle = []
        for _ in range(10):  # the same clicks with nothing else running, for comparison
            t0 = time.monotonic()
            self.attention(clicker, "small", rng.uniform(0, 639), rng.uniform(0, 479))
            idle.append(time.monotonic() - t0)
        workers = [self.client() for _ in range(self.args.clients)]
        stop = threading.Event()
        latencies: list[float] = []
        segment_times: list[float] = []
        start, before = time.monotonic(), self.server.rss()

        def work(client) -> None:
            for i in range(self.args.rounds):
                t0 = time.monotonic()
                self.segment(client, ("medium", "large")[i % 2])
                segment_times.append(time.monotonic() - t0)

        def click() -> None:
            rng = random.Random(0)
            while not stop.is_set():
                t0 = time.monotonic()
                self.attention(clicker, "small", rng.uniform(0, 639), rng.uniform(0, 479))
                latencies.append(time.monotonic() - t0)
                time.sleep(0.1)

        clicking = threading.Thread(target=click, daemon=True)
        clicking.start()
        with ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(work, workers))
        stop.set()
        clicking.join(timeout=60)
        for client in workers + [clicker]:
            client.close()
        note = (f"click p50 {percentile(latencies, 50) * 1000:.0f} ms, p95 {percentile(latencies, 95) * 1000:.0f} ms "
                f"({len(latencies)} clicks; idle p50 {percentile(idle, 50) * 1000:.0f} ms); /segment p50 "
                f"{percentile(segment_times, 50):.1f} s under {self.args.clients} sessions")
        self._row(f"{self.args.clients} sessions segmenting + clicks", len(segment_times) + len(latencies), before,
                  start, note)

    def soak(self) -> None:
        total, threads = self.args.soak, 4
        counter = iter(range(total))
        lock = threading.Lock()
        trace: list[tuple[int, int, int]] = []  # (requests done, RSS, temp bytes)
        done = [0]
        start, before = time.monotonic(), self.server.rss()

        def run(seed: int) -> None:
            rng = random.Random(seed)
            client = self.client()
            segmented: Optional[str] = None
            while True:
                with lock:
                    if next(counter, None) is None:
                        break
                kind = rng.random()
                image = rng.choice(("small", "medium", "large"))
                if kind < 0.5 or segmented is None:
                    self.segment(client, image)
                    segmented = image
                elif kind < 0.85:
                    self.attention(client, segmented, rng.uniform(0, 600), rng.uniform(0, 450))
                else:
                    self.compare(client, image)
                with lock:
                    done[0] += 1
                    if done[0] % 25 == 0:
                        trace.append((done[0], self.server.rss(), self.server.temp_bytes()[0]))
            client.close()

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, range(threads)))
        after_warm = [rss for n, rss, _ in trace if n >= total // 3]
        note = (f"RSS after 1/3: {min(after_warm, default=0) / MB:.0f}-{max(after_warm, default=0) / MB:.0f} MB; "
                f"temp max {max((t for *_, t in trace), default=0) / MB:.1f} MB")
        self._row(f"soak ({threads} clients)", done[0], before, start, note)
        print("    requests  RSS MB  temp MB", flush=True)
        for n, rss, temp in trace:
            print(f"    {n:8d}  {rss / MB:6.0f}  {temp / MB:7.1f}", flush=True)

    def sessions(self) -> None:
        n = self.args.sessions
        start, before = time.monotonic(), self.server.rss()

        def one(i: int) -> None:
            client = self.client()
            self.segment(client, ("small", "medium", "large")[i % 3])
            client.close()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(n)))
        right_after = self.server.rss()
        wait = self.args.session_ttl + 60
        print(f"  {n} sessions done, RSS {right_after / MB:.0f} MB; waiting {wait:.0f} s (TTL + 60 s)", flush=True)
        time.sleep(wait)
        note = (f"RSS right after {right_after / MB:.0f} MB; after TTL+60 s {self.server.rss() / MB:.0f} MB "
                f"(warm {self.warm_rss / MB:.0f} MB: {(self.server.rss() - self.warm_rss) / MB:+.0f} MB)")
        self._row(f"{n} sessions segment once and leave", n, before, start, note)


def print_table(rows: list[Row], server: Server, started: float) -> None:
    size, count = server.temp_bytes()
    print()
    print(f"{'phase':44s} {'reqs':>5s} {'RSS before':>11s} {'RSS after':>10s} {'peak extra':>11s} {'temp':>8s}  notes")
    for r in rows:
        print(f"{r.phase:44s} {r.requests:5d} {r.rss_before:9.0f}MB {r.rss_after:8.0f}MB {r.peak_extra:+9.0f}MB "
              f"{r.temp_mb:6.1f}MB  {r.note}")
    print(f"temp folder at the end: {size / MB:.1f} MB in {count} files and folders; "
          f"wall {time.monotonic() - started:.0f} s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fsa loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-test", help="FSA_MODEL of the server (default tiny-test)")
    p.add_argument("--checkpoint", default=None, help="FSA_CHECKPOINT of the server (local weights)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--big", type=int, default=10000, help="side of the huge square upload (default 10000)")
    p.add_argument("--classes", type=int, default=150, help="classes of the many-classes request (default 150)")
    p.add_argument("--clients", type=int, default=16, help="sessions segmenting at once in 'clicks' (default 16)")
    p.add_argument("--rounds", type=int, default=2, help="/segment calls of each of those sessions (default 2)")
    p.add_argument("--soak", type=int, default=300, help="requests of the soak (default 300)")
    p.add_argument("--sessions", type=int, default=100, help="sessions that segment once and leave (default 100)")
    p.add_argument("--session-ttl", type=float, default=60.0, help="FSA_SESSION_TTL of the server (default 60)")
    p.add_argument("--temp-ttl", type=float, default=120.0, help="FSA_TEMP_TTL of the server (default 120)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (images, server log)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m fsa loadtest``; returns the exit code."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        print(f"fsa loadtest: error: unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}",
              file=sys.stderr)
        return 2
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="fsa-loadtest-"))
    server = None
    try:
        print(f"work folder {work}; writing test images ...", flush=True)
        images = make_images(work, args.big)
        server = start_server(work, args)
        print(f"server {server.url} (pid {server.process.pid}), RSS {server.rss() / MB:.0f} MB", flush=True)
        test = LoadTest(server, images, args)
        test.warm_up()
        for phase in phases:
            print(f"{phase} ...", flush=True)
            getattr(test, phase)()
        print_table(test.rows, server, started)
        return 0
    except KeyboardInterrupt:
        print("fsa loadtest: interrupted", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
