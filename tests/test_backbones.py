"""fsa.backbones: names, the tiny test CLIP, local checkpoints; fsa.hub: devices; fsa.cache: the model cache."""
from __future__ import annotations

import dataclasses
import threading
import time

import open_clip
import pytest
import torch

from fsa import backbones, hub
from fsa.backbones import LoadedClip, clip_cache_key, load_clip, resolve_backbone_name, tiny_test_clip
from fsa.cache import ModelCache
from fsa.hub import WeightsUnavailableError


@pytest.mark.parametrize(
    "given, expected",
    [("ViT-B-16", "ViT-B-16"), ("vit-b/16", "ViT-B-16"), ("ViT_L_14", "ViT-L-14"), ("vit-h-14", "ViT-H-14"),
     ("TINY-TEST", "tiny-test"), ("tiny", "tiny-test")],
)
def test_resolve_backbone_aliases(given, expected):
    assert resolve_backbone_name(given) == expected


def test_resolve_backbone_default_follows_env(monkeypatch):
    monkeypatch.setenv("FSA_MODEL", "vit-l/14")
    assert resolve_backbone_name(None) == resolve_backbone_name("") == "ViT-L-14"
    monkeypatch.delenv("FSA_MODEL")
    assert resolve_backbone_name(None) == "ViT-B-16"


def test_resolve_backbone_unknown_lists_choices():
    with pytest.raises(ValueError, match="unknown backbone 'ViT-X-1'.*ViT-B-16, ViT-L-14, ViT-H-14, tiny-test"):
        resolve_backbone_name("ViT-X-1")


def test_tiny_clip_shapes_seed_and_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_test_clip()
    assert torch.equal(torch.rand(3), expected_next), "building the tiny model must not consume the global RNG"
    b, c = tiny_test_clip(0), tiny_test_clip(1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual.conv1.weight"], sc["visual.conv1.weight"])
    assert isinstance(a, open_clip.CLIP)
    assert a.visual.conv1.kernel_size == (16, 16) and a.visual.conv1.out_channels == 64
    assert len(a.visual.transformer.resblocks) == 4 and a.visual.transformer.resblocks[0].attn.num_heads == 4
    assert a.visual.proj.shape == (64, 32) and a.text_projection.shape == (64, 32)
    assert a.context_length == 77 and a.vocab_size == 49408 and len(a.transformer.resblocks) == 2


def test_load_tiny_clip_is_frozen_and_non_degenerate():
    clip = load_clip("tiny-test", device="cpu")
    assert isinstance(clip, LoadedClip) and clip.is_test_model and clip.name == "tiny-test"
    assert clip.device == torch.device("cpu") and clip.dtype == torch.float32 and clip.patch_size == 16
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert clip.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    assert not clip.model.training and not any(p.requires_grad for p in clip.model.parameters())
    assert clip.key == clip_cache_key("tiny-test", None, "cpu")
    tokens = clip.tokenizer(["a photo of a cat", "sky"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.int64
    with torch.no_grad():
        text = clip.model.encode_text(clip.tokenizer(["cat", "dog", "sky", "a red car"]), normalize=True)
        image = clip.model.encode_image(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)),
                                        normalize=True)
    cos = text @ text.T
    off_diagonal = cos[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.max() < 0.999 and off_diagonal.std() > 1e-3, "text features must differ"
    assert (image[0] - image[1]).norm() > 1e-3, "image features must depend on the image"


def test_tiny_clip_from_checkpoint(tmp_path, monkeypatch):
    model = tiny_test_clip(seed=5)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    loaded = load_clip("tiny-test", checkpoint=str(path))
    assert torch.equal(loaded.model.visual.conv1.weight, model.visual.conv1.weight)
    assert str(path) in loaded.key and loaded.key != clip_cache_key("tiny-test")
    monkeypatch.setenv("FSA_CHECKPOINT", str(path))  # the environment variable does the same
    assert torch.equal(load_clip("tiny-test").model.visual.conv1.weight, model.visual.conv1.weight)


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*missing.pt.*FSA_CHECKPOINT"):
        load_clip("tiny-test", checkpoint=str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="could not load .*garbage.bin as tiny-test weights"):
        load_clip("tiny-test", checkpoint=str(garbage))
    wrong = tmp_path / "wrong.pt"
    state = tiny_test_clip().state_dict()
    state["visual.conv1.weight"] = torch.zeros(64, 3, 8, 8)  # wrong patch size
    torch.save(state, wrong)
    with pytest.raises(WeightsUnavailableError, match="wrong.pt"):
        load_clip("tiny-test", checkpoint=str(wrong))


def test_device_resolution():
    assert hub.resolve_device("cpu") == torch.device("cpu")
    assert hub.model_dtype(torch.device("cpu")) == torch.float32
    assert hub.model_dtype(torch.device("cuda")) == torch.float16
    if not torch.cuda.is_available():
        assert hub.resolve_device(None) == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            hub.resolve_device("cuda")


def test_cache_keys_distinguish_models():
    keys = {clip_cache_key("tiny-test", None, "cpu"), clip_cache_key("ViT-B-16", None, "cpu"),
            clip_cache_key("ViT-L-14", None, "cpu"), clip_cache_key("ViT-H-14", None, "cpu")}
    assert len(keys) == 4


def test_model_cache_loads_once_across_threads(monkeypatch):
    calls = []
    real = backbones.load_clip

    def slow_load(name, **kwargs):
        calls.append(name)
        time.sleep(0.2)  # long enough for every thread to be waiting
        return real(name, **kwargs)

    monkeypatch.setattr(backbones, "load_clip", slow_load)
    cache = ModelCache()
    results = [None] * 6
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, cache.get_clip("tiny-test", device="cpu")))
               for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["tiny-test"]
    assert all(r is results[0] for r in results) and isinstance(results[0], LoadedClip)
    assert cache.keys() == ["clip|" + results[0].key]
    cache.clear()
    assert cache.keys() == []


def test_model_cache_does_not_cache_failures(monkeypatch):
    attempts = []
    real = backbones.load_clip

    def flaky(name, **kwargs):
        attempts.append(name)
        if len(attempts) == 1:
            raise WeightsUnavailableError("offline")
        return real(name, **kwargs)

    monkeypatch.setattr(backbones, "load_clip", flaky)
    cache = ModelCache()
    with pytest.raises(WeightsUnavailableError):
        cache.get_clip("tiny-test")
    assert cache.get_clip("tiny-test").is_test_model and len(attempts) == 2


def test_model_cache_proxy():
    cache = ModelCache()
    proxy = cache.get_proxy("tiny-test", device="cpu")
    assert proxy is cache.get_proxy("TINY-test", device="cpu")
    assert proxy.is_test_model and proxy.patch_size == 8
    clip = cache.get_clip("tiny-test", device="cpu")
    assert dataclasses.is_dataclass(clip) and len(cache.keys()) == 2
