"""Offline behaviour: no cached weights + no hub -> WeightsUnavailableError within seconds, never a hang."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import RemoteEntryNotFoundError

from fsa import backbones
from fsa.backbones import WeightsUnavailableError, fetch_hub_file, load_clip
from fsa.proxies import load_proxy

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = """
import json, time
from fsa.backbones import load_clip
from fsa.proxies import load_proxy
out = {}
for label, fn, name in (("clip", load_clip, "ViT-B-16"), ("proxy", load_proxy, "dino-b8")):
    t = time.perf_counter()
    try:
        fn(name)
        out[label] = {"error": None}
    except Exception as exc:
        out[label] = {"error": type(exc).__name__, "message": str(exc)}
    out[label]["seconds"] = time.perf_counter() - t
print(json.dumps(out))
"""


def closed_port_endpoint() -> str:
    """http://127.0.0.1:PORT with nothing listening on PORT (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def unreachable_hub_env(tmp_path, **extra) -> dict[str, str]:
    """The environment of a user without the hub, wherever the suite runs: empty HF cache, HF_HUB_OFFLINE
    unset, the hub endpoint (HF_ENDPOINT) a closed local port, no proxy in the way."""
    unset = ("HF_HUB_OFFLINE", "FSA_MODEL", "FSA_CHECKPOINT", "HF_HUB_CACHE", "HF_HUB_ENABLE_HF_TRANSFER")
    env = {k: v for k, v in os.environ.items() if k not in unset and not k.lower().endswith("_proxy")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=closed_port_endpoint(), PYTHONPATH=str(REPO), **extra)
    return env


def test_real_environment_fails_fast_with_the_fixes(tmp_path):
    """As a user meets it: empty HF cache, HF_HUB_OFFLINE unset, the hub unreachable (a closed port)."""
    env = unreachable_hub_env(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    clip, proxy = out["clip"], out["proxy"]
    assert clip["error"] == proxy["error"] == "WeightsUnavailableError"
    assert clip["seconds"] < 10 and proxy["seconds"] < 10, out  # naive hf_hub_download: ~25 s per file
    for text in ("timm/vit_base_patch16_clip_224.openai", "hf download", "HF_HOME", "--checkpoint",
                 "FSA_CHECKPOINT", "FSA_MODEL=tiny-test", "unreachable", str(tmp_path / "hf")):
        assert text in clip["message"], text
    for text in ("timm/vit_base_patch8_224.dino", "hf download", "FSA_MODEL=tiny-test", "FSA_PROXY_CHECKPOINT"):
        assert text in proxy["message"], text


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    """In-process: an empty hub cache, offline mode off (huggingface_hub reads env at import) and the hub
    endpoint a closed local port, so that no test here reaches a real hub."""
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "ENDPOINT", closed_port_endpoint())
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("FSA_CHECKPOINT", raising=False)
    return tmp_path / "hub"


def test_silent_endpoint_is_bounded_by_the_probe_timeout(empty_cache, monkeypatch):
    """A hub that accepts connections but never answers must not hang us."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # never accept(): the kernel completes handshakes, nobody answers
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(backbones, "HUB_PROBE_TIMEOUT_S", 0.5)
    try:
        start = time.perf_counter()
        with pytest.raises(WeightsUnavailableError, match=r"is unreachable \((no answer within 0.5 s|timed out)\)"):
            load_clip("ViT-B-16", device="cpu")
        assert time.perf_counter() - start < 3.0
    finally:
        server.close()


def test_offline_mode_fails_immediately(empty_cache, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE"):
        load_proxy("dinov2-b14-reg", device="cpu")
    with pytest.raises(WeightsUnavailableError, match="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        load_clip("ViT-H-14", device="cpu")
    assert time.perf_counter() - start < 1.0


def _put_in_cache(cache: Path, repo_id: str, filename: str) -> Path:
    """The layout huggingface_hub writes: refs/main -> snapshots/<commit>/<file>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    path = repo / "snapshots" / ("0" * 40) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return path


def test_cached_file_is_used_without_network(empty_cache, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    bin_path = _put_in_cache(empty_cache, "org/model", "weights.bin")
    got = fetch_hub_file("org/model", ("weights.safetensors", "weights.bin"), what="test", alternatives="")
    assert Path(got) == bin_path
    safe_path = _put_in_cache(empty_cache, "org/model", "weights.safetensors")
    got = fetch_hub_file("org/model", ("weights.safetensors", "weights.bin"), what="test", alternatives="")
    assert Path(got) == safe_path, "the preferred (first) format wins"


def test_cached_but_unusable_weights_are_reported(empty_cache):
    _put_in_cache(empty_cache, "timm/vit_base_patch16_clip_224.openai", "open_clip_model.safetensors")
    with pytest.raises(WeightsUnavailableError, match="could not load .*open_clip_model.safetensors as ViT-B-16"):
        load_clip("ViT-B-16", device="cpu")


def test_download_falls_back_to_the_second_format(empty_cache, monkeypatch, tmp_path):
    """Reachable hub (probe stubbed): missing first file -> second; other errors -> WeightsUnavailableError."""
    monkeypatch.setattr(backbones, "_hub_unreachable", lambda timeout=None: None)
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append(filename)
        if filename == "a.safetensors":
            raise RemoteEntryNotFoundError(
                "404", response=httpx2.Response(404, request=httpx2.Request("HEAD", "https://hub/a")))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    messages = []
    got = fetch_hub_file("org/m", ("a.safetensors", "a.bin"), what="test", alternatives="",
                         progress=lambda f, m: messages.append(m))
    assert got == str(tmp_path / "a.bin") and asked == ["a.safetensors", "a.bin"]
    assert messages == ["Downloading test weights from org/m"]

    def broken_download(repo_id, filename, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", broken_download)
    with pytest.raises(WeightsUnavailableError, match="downloading test weights .* failed .*disk full"):
        fetch_hub_file("org/m", ("a.safetensors",), what="test", alternatives="")
