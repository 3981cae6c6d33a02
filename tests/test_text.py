"""fsa.text: 80-template text features and their cache, on the tiny random CLIP."""
from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

import fsa.text
from fsa.backbones import load_clip, tiny_test_clip
from fsa.text import TEMPLATES, TextFeatureCache, encode_prompts, prompts


@pytest.fixture(scope="module")
def clip():
    return load_clip("tiny-test", device="cpu")


@pytest.fixture
def counting(clip, monkeypatch):
    """Count the prompts that reach the text encoder."""
    seen: list[int] = []
    real = fsa.text.encode_prompts

    def encode_prompts(model, tokens):
        seen.append(tokens.shape[0])
        return real(model, tokens)

    monkeypatch.setattr(fsa.text, "encode_prompts", encode_prompts)
    return seen


def test_templates_are_openais_80():
    assert len(TEMPLATES) == 80 == len(set(TEMPLATES))
    assert TEMPLATES[0] == "a bad photo of a {}."
    assert prompts("red car") == [t("red car") for t in OPENAI_IMAGENET_TEMPLATES]


def _independent(clip, name: str) -> torch.Tensor:
    """docs/method.md §1 for one name, straight from open_clip's template lambdas."""
    with torch.no_grad():
        per_prompt = clip.model.encode_text(clip.tokenizer([t(name) for t in OPENAI_IMAGENET_TEMPLATES]))
    return F.normalize(F.normalize(per_prompt, dim=-1).mean(0), dim=-1)


def test_encode_matches_independent_computation(clip):
    names = ["cat", "sofa", "traffic light"]
    got = TextFeatureCache(names_per_batch=2).encode(clip, names)
    assert got.shape == (3, 32) and got.dtype == torch.float32 and got.device == clip.device
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    expected = torch.stack([_independent(clip, n) for n in names])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got[0] - got[1]).abs().max() > 1e-4, "different names must give different features"


def test_prompts_run_over_the_shortest_context_that_holds_them(clip):
    """The trimmed text tower equals open_clip's full 77-token one, and really runs fewer positions."""
    tokens = clip.tokenizer(prompts("cat") + prompts("a red double-decker bus on a rainy street"))
    longest = int(tokens.argmax(dim=-1).max()) + 1
    assert 10 < longest < 40
    lengths = []
    hook = clip.model.transformer.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            full = clip.model.encode_text(tokens)
            trimmed = encode_prompts(clip.model, tokens)
    finally:
        hook.remove()
    assert lengths == [77, longest]
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-5)
    assert (full[0] - full[-1]).abs().max() > 1e-3


def test_a_non_causal_text_tower_runs_in_full(clip):
    """Without a causal mask every position sees the padding: no trimming then."""
    model = tiny_test_clip(seed=3).eval()
    model.attn_mask = torch.zeros_like(model.attn_mask)
    tokens = clip.tokenizer(["a photo of a cat."])
    with torch.no_grad():
        torch.testing.assert_close(encode_prompts(model, tokens), model.encode_text(tokens), rtol=0, atol=0)


def test_only_missing_names_are_encoded(clip, counting):
    cache = TextFeatureCache(names_per_batch=8)
    first = cache.encode(clip, ["cat", "dog"])
    assert counting == [160]
    again = cache.encode(clip, ["dog", "bird", "cat", "dog"])
    assert counting == [160, 80], "only 'bird' is new"
    assert torch.equal(again[0], first[1]) and torch.equal(again[2], first[0]) and torch.equal(again[3], again[0])
    assert len(cache) == 3
    other = dataclasses.replace(clip, key=clip.key + "|other-weights")
    cache.encode(other, ["cat"])
    assert counting == [160, 80, 80], "features are cached per model key"


def test_batches_and_progress(clip, counting):
    messages = []
    TextFeatureCache(names_per_batch=2).encode(clip, ["a", "b", "c"], progress=lambda f, m: messages.append((f, m)))
    assert counting == [160, 80]
    assert messages[0] == (0.0, "Encoding 3 new class names (0 done)") and messages[1] == (2 / 3, "Encoding 3 new class names (2 done)")
    assert messages[-1][0] == 1.0


def test_on_encoded_runs_after_new_names_only(clip, counting):
    calls = []
    cache = TextFeatureCache(names_per_batch=1, on_encoded=lambda: calls.append(list(counting)))
    cache.encode(clip, ["cat", "dog"])
    assert calls == [[80, 80]], "once, after both batches"
    cache.encode(clip, ["dog", "cat"])
    assert len(calls) == 1, "nothing new: no call"
    cache.encode(clip, ["cat", "bird"])
    assert calls[-1] == [80, 80, 80] and len(calls) == 2


def test_empty_names(clip):
    out = TextFeatureCache().encode(clip, [])
    assert out.shape == (0, 32)


def test_threads_share_one_encoding(clip, counting, monkeypatch):
    """Four threads ask for the same names at once. The encoder waits until all four have entered `encode` and,
    for up to a second, for the others to reach the encoder too: without the cache's lock all four get there
    (four encodings, however the threads are scheduled); with it the others wait for the first's result."""
    cache = TextFeatureCache()
    n = 4
    state = threading.Condition()
    entered, encoding = [0], [0]
    counted = fsa.text.encode_prompts  # the `counting` fixture's wrapper

    def overlapping_encode(model, tokens):
        with state:
            encoding[0] += 1
            state.notify_all()
            state.wait_for(lambda: entered[0] == n, timeout=60)  # every thread is inside encode()
            state.wait_for(lambda: encoding[0] == n, timeout=1.0)  # and, without a lock, in the encoder
        return counted(model, tokens)

    monkeypatch.setattr(fsa.text, "encode_prompts", overlapping_encode)

    def ask(i):
        with state:
            entered[0] += 1
            state.notify_all()
        outs[i] = cache.encode(clip, ["cat", "dog"])

    outs = [None] * n
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert counting == [160]
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_bad_batch_size():
    with pytest.raises(ValueError):
        TextFeatureCache(names_per_batch=0)
