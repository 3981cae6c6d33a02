"""Offline behaviour: no cached weights + no hub -> WeightsUnavailableError from the reachability probe, never
a download's retries or a hang (hang guards far above the normal time; the times themselves are measured by
`python -m fsa bench --startup`)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import RemoteEntryNotFoundError

from fsa import hub
from fsa.backbones import load_clip
from fsa.hub import WeightsUnavailableError, fetch_hub_file
from fsa.bench_startup import closed_port_endpoint, offline_env, silent_endpoint
from fsa.proxies import load_proxy

#: Hang guards: a subprocess that imports torch normally fails in 4-5 s here, an in-process load in < 3.5 s.
SUBPROCESS_GUARD_S = 300
IN_PROCESS_GUARD_S = 60

_SCRIPT = """
import json
import huggingface_hub
downloads = []
real = huggingface_hub.hf_hub_download
huggingface_hub.hf_hub_download = lambda *a, **k: downloads.append(a) or real(*a, **k)
from fsa.backbones import load_clip
from fsa.proxies import load_proxy
out = {}
for label, fn, name in (("clip", load_clip, "ViT-B-16"), ("proxy", load_proxy, "dino-b8")):
    try:
        fn(name)
        out[label] = {"error": None}
    except Exception as exc:
        out[label] = {"error": type(exc).__name__, "message": str(exc)}
out["downloads"] = len(downloads)
print(json.dumps(out))
"""


def test_real_environment_fails_fast_with_the_fixes(tmp_path):
    """As a user meets it, wherever the suite runs: empty HF cache, HF_HUB_OFFLINE unset, the hub unreachable
    (HF_ENDPOINT a closed local port). The probe answers: no download is attempted."""
    env = offline_env(str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    clip, proxy = out["clip"], out["proxy"]
    assert clip["error"] == proxy["error"] == "WeightsUnavailableError"
    assert out["downloads"] == 0, "a download (with its retries) was attempted"
    for text in ("timm/vit_base_patch16_clip_224.openai", "hf download", "HF_HOME", "--checkpoint",
                 "FSA_CHECKPOINT", "FSA_MODEL=tiny-test", "unreachable", str(tmp_path / "hf")):
        assert text in clip["message"], text
    for text in ("timm/vit_base_patch8_224.dino", "hf download", "FSA_MODEL=tiny-test", "FSA_PROXY_CHECKPOINT"):
        assert text in proxy["message"], text


def finishes_within(seconds: float, fn):
    """fn()'s result (or its exception), failing if it is still running after `seconds` (a hang)."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds} s: it hangs")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


def no_network(monkeypatch):
    """Make any download or reachability probe a test failure."""
    def refuse(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(hub, "_hub_unreachable", refuse)


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
    """A hub that accepts connections but never answers must not hang us: the probe gives up after its timeout
    (the message says so) and no download starts."""
    def no_download(*args, **kwargs):
        raise AssertionError("a download started after the probe")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(hub, "HUB_PROBE_TIMEOUT_S", 0.5)
    with silent_endpoint() as endpoint:
        monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
        with pytest.raises(WeightsUnavailableError, match=r"is unreachable \((no answer within 0.5 s|timed out)\)"):
            finishes_within(IN_PROCESS_GUARD_S, lambda: load_clip("ViT-B-16", device="cpu"))


def test_offline_mode_fails_without_touching_the_network(empty_cache, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    no_network(monkeypatch)
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE"):
        load_proxy("dinov2-b14-reg", device="cpu")
    with pytest.raises(WeightsUnavailableError, match="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        load_clip("ViT-H-14", device="cpu")


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
    no_network(monkeypatch)
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
    monkeypatch.setattr(hub, "_hub_unreachable", lambda timeout=None: None)
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
