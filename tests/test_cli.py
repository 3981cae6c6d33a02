"""python -m fsa: the segment command end to end (tiny-test) and its one-line failures."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsa import cli
from fsa.bench_startup import closed_port_endpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def image_path(tmp_path) -> Path:
    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(rgb).save(path)
    return path


def _shares(stdout: str) -> dict[str, float]:
    return {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^(\S.*?)\s+([\d.]+) %$", stdout, re.M)}


#: Hang guard of a `python -m fsa` subprocess: far above its normal 4-5 s on a loaded 2-core machine (the times
#: are measured by `python -m fsa bench --startup`, not asserted here).
HANG_GUARD_S = 300


def _run(args: list[str], env_update: dict[str, str], drop=()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=str(REPO), **env_update)
    return subprocess.run([sys.executable, "-m", "fsa", *args], env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)


def test_segment_subprocess_tiny_model(image_path, tmp_path):
    out = tmp_path / "mask.png"
    proc = _run(["segment", str(image_path), "--classes", "cat; kitten, sofa", "--short-side", "64",
                    "--out", str(out)], {"FSA_MODEL": "tiny-test"})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    mask = np.asarray(Image.open(out))
    assert mask.shape == (40, 56, 3) and mask.dtype == np.uint8
    assert len(np.unique(mask.reshape(-1, 3), axis=0)) <= 2, "at most one colour per class"
    shares = _shares(proc.stdout)
    assert set(shares) == {"cat", "sofa"} and sum(shares.values()) == pytest.approx(100.0, abs=0.2)
    assert "clearclip + FSA on tiny-test" in proc.stdout and "random weights" in proc.stdout
    assert re.search(r"timings: .*total [\d.]+ s", proc.stdout)


def test_segment_offline_fails_in_one_line_without_a_download(image_path, tmp_path):
    """Weights not cached and the hub unreachable (HF_ENDPOINT a closed local port, wherever the suite runs):
    one line naming the fixes, from the reachability probe, not from a download's retries."""
    proxies = tuple(k for k in os.environ if k.lower().endswith("_proxy"))
    proc = _run(["segment", str(image_path), "--classes", "cat", "--out", str(tmp_path / "m.png")],
                {"FSA_MODEL": "ViT-B-16", "HF_HOME": str(tmp_path / "empty-hf"), "HF_ENDPOINT": closed_port_endpoint()},
                drop=("HF_HUB_OFFLINE", "FSA_CHECKPOINT", "HF_HUB_CACHE", *proxies))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fsa: error: ViT-B-16 CLIP weights"), proc.stderr
    assert "is unreachable" in lines[0] and "downloading" not in lines[0]
    for fix in ("hf download timm/vit_base_patch16_clip_224.openai", "--checkpoint", "FSA_MODEL=tiny-test"):
        assert fix in lines[0]
    assert not (tmp_path / "m.png").exists()


def test_segment_in_process_proxyclip_baseline(image_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FSA_MODEL", "tiny-test")
    out = tmp_path / "proxy.png"
    code = cli.main(["segment", str(image_path), "--classes", "sky\nroad, background", "--method", "ProxyCLIP",
                     "--no-fsa", "--short-side", "48", "--crop", "0", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith("proxyclip on tiny-test")
    assert set(_shares(captured.out)) == {"sky", "road", "background"}
    assert np.asarray(Image.open(out)).shape == (40, 56, 3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.png", "--classes", "cat"], "image file not found: missing.png (check the path)"),
        (["{img}", "--classes", "cat, Cat"], "class 'Cat' is listed twice"),
        (["{img}", "--classes", " , ;"], "the vocabulary is empty"),
        (["{img}", "--classes", "cat", "--method", "segformer"], "unknown method 'segformer'; choose one of"),
        (["{img}", "--classes", "cat", "--backbone", "ViT-Z"], "unknown backbone 'ViT-Z'"),
        (["{img}", "--classes", "cat", "--proxy", "mae-l16"], "unknown proxy model 'mae-l16'"),
        (["{img}", "--classes", "cat", "--device", "tpu9"], "invalid device 'tpu9'"),
        (["{img}", "--classes", "cat", "--out", "{tmp}/no/such/dir/m.png"], "output folder"),
        (["{img}", "--classes", "cat", "--p", "0"], "--p: FeedbackConfig.p must be a finite number in (0, 1], got 0"),
        (["{img}", "--classes", "cat", "--checkpoint", "{tmp}/none.pt"], "checkpoint file not found"),
        (["{tmp}/text.png", "--classes", "cat"], "cannot read"),
    ],
)
def test_failures_are_one_line(args, message, image_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FSA_MODEL", "tiny-test")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.png").write_text("not a png")
    argv = ["segment"] + [a.format(img=image_path, tmp=tmp_path) for a in args]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("fsa: error: ") and message in err, err
    assert not (tmp_path / "mask.png").exists()


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a Segmenter is made (a model would load); returns the list of attempts."""
    import fsa.segmenter

    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("a Segmenter was made: the check came after the model load")

    monkeypatch.setattr(fsa.segmenter, "Segmenter", refuse)
    return attempts


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lam", "nan"], "--lam: FeedbackConfig.lam must be a finite number in [0, 88], got nan"),
        (["--lam", "inf"], "--lam: FeedbackConfig.lam must be a finite number in [0, 88], got inf"),
        (["--lam", "1e6"], "--lam: FeedbackConfig.lam must be a finite number in [0, 88], got 1e+06"),
        (["--lam", "nan", "--no-fsa"], "--lam: FeedbackConfig.lam"),
        (["--p", "0"], "--p: FeedbackConfig.p must be a finite number in (0, 1], got 0"),
        (["--p", "2"], "--p: FeedbackConfig.p must be a finite number in (0, 1], got 2"),
        (["--p", "nan"], "--p: FeedbackConfig.p must be a finite number in (0, 1], got nan"),
        (["--short-side", "0"], "--short-side: SegmentSettings.short_side must be a whole number in [16, 2048], got 0"),
        (["--short-side", "100000"], "SegmentSettings.short_side must be a whole number in [16, 2048], got 100000"),
        (["--crop", "8"], "--crop: SegmentSettings.crop must be a whole number ≥ 16"),
        (["--stride", "0"], "--stride: SegmentSettings.stride must be a whole number ≥ 1, got 0"),
        (["--crop", "100"], "the window stride 224 (clearclip's default) is larger than the crop 100"),
        (["--threshold", "nan"], "--threshold: SegmentSettings.prob_threshold must be a finite number in [0, 1), "
                                 "got nan"),
        (["--out", "{tmp}"], "--out {tmp} is a folder; give a file name, e.g. --out {tmp}/mask.png"),
        (["--out", "mask"], "--out mask has no file extension, so the image format is unknown; end it with .png"),
        (["--out", "{tmp}/mask."], "has no file extension"),
        (["--out", "mask.txt"], "--out mask.txt: cannot write a colour mask as '.txt'; end the name with .png"),
        (["--out", "mask.xbm"], "cannot write a colour mask as '.xbm'"),  # Pillow knows XBM, but only 1-bit
        (["--classes", "cat, \u200b"], "class 2 (after 'cat') of the vocabulary is '\\u200b', which has no "
                                        "visible character (U+200B ZERO WIDTH SPACE)"),
    ],
)
def test_bad_values_fail_in_one_line_before_any_model_loads(args, message, image_path, tmp_path, capsys,
                                                            monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    args = [a.format(tmp=tmp_path) for a in args]
    argv = ["segment", str(image_path), "--classes", "cat", "--backbone", "tiny-test", *args]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 1 and no_model == []
    assert len(err.strip().splitlines()) == 1 and err.startswith("fsa: error: "), err
    assert message.format(tmp=tmp_path) in err, err
    assert not list(tmp_path.glob("mask*"))


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".PNG"])
def test_output_formats_that_are_suggested_are_writable(suffix, tmp_path):
    out = cli.check_output_path(str(tmp_path / f"m{suffix}"))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(out)
    assert Image.open(out).size == (4, 4)


def test_bad_value_subprocess_fails_in_one_line_before_any_model_loads(image_path, tmp_path):
    """The whole process, as a user runs it: the value is checked before any model is looked for."""
    proc = _run(["segment", str(image_path), "--classes", "cat", "--lam", "nan",
                 "--out", str(tmp_path / "m.png")], {"FSA_MODEL": "ViT-B-16"})
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("fsa: error: --lam: FeedbackConfig.lam") and proc.stderr.count("\n") == 1
    assert "weights" not in proc.stderr  # ViT-B-16 was never looked for (a model load offline would name them)


def test_offline_hint_does_not_suggest_what_is_already_set(image_path, tmp_path, capsys, monkeypatch):
    """FSA_MODEL=tiny-test with --backbone ViT-B-16: the way out is the tiny-test backbone, not the variable."""
    import huggingface_hub

    monkeypatch.setenv("FSA_MODEL", "tiny-test")
    monkeypatch.delenv("FSA_CHECKPOINT", raising=False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # nothing cached
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: True)
    code = cli.main(["segment", str(image_path), "--classes", "cat", "--backbone", "ViT-B-16",
                     "--out", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert code == 1 and "ViT-B-16 CLIP weights" in err
    assert "set FSA_MODEL=tiny-test" not in err
    assert "choose the tiny-test backbone (--backbone tiny-test" in err and "FSA_MODEL is already tiny-test" in err

    monkeypatch.setenv("FSA_MODEL", "ViT-B-16")
    assert cli.main(["segment", str(image_path), "--classes", "cat", "--out", str(tmp_path / "m.png")]) == 1
    assert "or set FSA_MODEL=tiny-test to try the app with random weights" in capsys.readouterr().err


@pytest.mark.parametrize("fsa_model, expected", [("tiny-test", "choose the tiny-test backbone"),
                                                  ("tiny", "choose the tiny-test backbone"),
                                                  ("ViT-B-16", "set FSA_MODEL=tiny-test"),
                                                  ("", "set FSA_MODEL=tiny-test")])
def test_proxy_offline_hint(fsa_model, expected, monkeypatch):
    import huggingface_hub

    import fsa
    from fsa.proxies import load_proxy

    monkeypatch.setenv("FSA_MODEL", fsa_model)
    monkeypatch.delenv("FSA_PROXY_CHECKPOINT", raising=False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: True)
    with pytest.raises(fsa.WeightsUnavailableError) as info:
        load_proxy("dino-b8", device="cpu")
    assert expected in str(info.value)
    assert ("set FSA_MODEL=tiny-test" in str(info.value)) == (expected == "set FSA_MODEL=tiny-test")


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "choose a command: segment, evaluate, prepare, bench or loadtest"),
        (["segment", "x.png"], "the following arguments are required: --classes"),
        (["segment", "x.png", "--classes", "cat", "--crop", "big"], "argument --crop: invalid int value: 'big'"),
    ],
)
def test_usage_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "--help" in err


def test_unexpected_errors_name_their_type(image_path, capsys, monkeypatch):
    import fsa.segmenter

    def boom(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    monkeypatch.setattr(fsa.segmenter.Segmenter, "segment", boom)
    assert cli.main(["segment", str(image_path), "--classes", "cat", "--backbone", "tiny-test"]) == 1
    err = capsys.readouterr().err
    assert err == ("fsa: error: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB "
                   "(set FSA_DEBUG=1 for the traceback)\n")
    monkeypatch.setenv("FSA_DEBUG", "1")
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        cli.main(["segment", str(image_path), "--classes", "cat", "--backbone", "tiny-test"])


def test_bench_is_dispatched(monkeypatch):
    import fsa.bench

    seen = []
    monkeypatch.setattr(fsa.bench, "main", lambda argv: seen.append(argv) or 7)
    assert cli.main(["bench", "--quick", "--repeats", "1"]) == 7
    assert seen == [["--quick", "--repeats", "1"]]


def test_bench_startup_is_dispatched(monkeypatch):
    import fsa.bench
    import fsa.bench_startup

    seen = []
    monkeypatch.setattr(fsa.bench_startup, "main", lambda repeats, machine: seen.append((repeats, machine)) or 0)
    assert fsa.bench.main(["--startup", "--repeats", "2"]) == 0
    assert [r for r, _ in seen] == [2] and "CPU" in seen[0][1]
