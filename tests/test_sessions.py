"""Two sessions at once get their own results: two gradio_client clients (two session hashes) with
different images and vocabularies, submitted together and interleaved, against one launched app."""
from __future__ import annotations

import collections
import dataclasses
import functools
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image

from fsa.diagnostics import DiagnosticsStore, PatchExplanation
from fsa.demo.sessions import MaskView, RunRecord
from fsa.inference import Decision, WindowCosines
from fsa.logits import FeedbackDetails, PatchLogits
from fsa.segmenter import ComparisonResult, SegmentationResult
from _app_fixtures import count_compare_calls, launched_app

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server():
    with launched_app() as launched:
        yield launched


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sessions")
    a, b = folder / "a_coffee.png", folder / "b_cat.png"
    Image.open(REPO / "examples" / "coffee.jpg").convert("RGB").resize((96, 64)).save(a)
    Image.open(REPO / "examples" / "chelsea_cat.jpg").convert("RGB").resize((64, 80)).save(b)
    return {"A": (str(a), "cup, table", (96, 64)), "B": (str(b), "cat; kitten, floor, wall", (64, 80))}


def _window_width(text: str) -> int:
    return int(re.search(r"window x (\d+)–(\d+)", text).group(2))


def _best_class(text: str) -> str:
    return re.search(r"most likely class under Π: \*\*(.+?)\*\*", text).group(1)


def test_two_sessions_interleaved_get_their_own_results(server, images, monkeypatch):
    app, url = server
    calls = count_compare_calls(app, monkeypatch)
    clients = {name: Client(url, verbose=False) for name in images}

    # both sessions segment at the same time
    jobs = {name: clients[name].submit(handle_file(path), vocab, "clearclip", api_name="/segment")
            for name, (path, vocab, _) in images.items()}
    for name, job in jobs.items():
        baseline, fsa_mask, summary = job.result(timeout=120)
        width, height = images[name][2]
        assert Image.open(baseline).size[0] == width and Image.open(fsa_mask).size[0] == width
        assert np.asarray(Image.open(fsa_mask)).shape[0] > height
    assert sorted(calls) == sorted(v for _, v, _ in images.values())

    # then they query patches, interleaved and concurrently: each answer comes from its own pass
    order = ["A", "B", "A", "B"]
    jobs = [(name, clients[name].submit(handle_file(images[name][0]), images[name][1], "clearclip", 5 + i, 5,
                                        api_name="/attention")) for i, name in enumerate(order)]
    for name, job in jobs:
        *maps, chart, text = job.result(timeout=120)
        width, height = images[name][2]
        assert Image.open(maps[0]).size == (width, height), f"session {name} got another session's maps"
        assert _window_width(text) == width
        vocab_names = [c.split(";")[0].strip() for c in images[name][1].split(",")]
        assert _best_class(text) in vocab_names, f"session {name}: Π over another vocabulary"
    assert len(calls) == 2, "a session's /attention should reuse its own /segment pass, not rerun or cross over"


#: What a session's pass is made of: none may stay reachable from the shared DemoApp.
SESSION_TYPES = (RunRecord, MaskView, SegmentationResult, ComparisonResult, DiagnosticsStore, PatchExplanation,
                 FeedbackDetails, PatchLogits, WindowCosines, Decision, Image.Image)


def _cell(cell):
    try:
        return cell.cell_contents
    except ValueError:  # a closure variable not bound yet
        return None


def _session_data(root, max_depth: int = 12) -> list[str]:
    """Paths from `root` to session data: an object of SESSION_TYPES, a numpy array, or a tensor of 2 or more
    dimensions outside a model (the text cache's vectors, one per class name, are 1-D). Walks dicts (keys
    and values), lists, tuples, sets, dataclasses and other objects (__dict__ and __slots__), closures and
    bound methods, each object once, down to `max_depth`; not into modules, classes or models' weights."""
    found, seen = [], set()

    def walk(obj, path: str, depth: int) -> None:
        if id(obj) in seen or depth > max_depth or obj is None or isinstance(obj, (str, bytes, int, float, type,
                                                                                   types.ModuleType)):
            return
        seen.add(id(obj))
        if isinstance(obj, SESSION_TYPES) or isinstance(obj, np.ndarray) or (
                isinstance(obj, torch.Tensor) and obj.ndim >= 2):
            found.append(f"{path}: {type(obj).__name__}")
            return
        if isinstance(obj, torch.nn.Module):
            return
        children: list = []
        if isinstance(obj, dict):
            children = [(f"{path} key {k!r}", k) for k in obj] + [(f"{path}[{k!r}]", v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
        elif isinstance(obj, types.MethodType):
            children = [(f"{path}.__self__", obj.__self__), (f"{path}.__func__", obj.__func__)]
        elif isinstance(obj, types.FunctionType):
            children = [(f"{path} closure", _cell(c)) for c in obj.__closure__ or ()]
            children.append((f"{path}.__defaults__", obj.__defaults__))
        elif isinstance(obj, functools.partial):
            children = [(f"{path}.func", obj.func), (f"{path}.args", obj.args), (f"{path}.keywords", obj.keywords)]
        if dataclasses.is_dataclass(obj):
            children += [(f"{path}.{f.name}", getattr(obj, f.name, None)) for f in dataclasses.fields(obj)]
        children += [(f"{path}.{k}", v) for k, v in getattr(obj, "__dict__", {}).items()]
        children += [(f"{path}.{name}", getattr(obj, name)) for cls in type(obj).__mro__
                     for name in getattr(cls, "__slots__", ()) if isinstance(name, str) and hasattr(obj, name)]
        for child_path, child in children:
            walk(child, child_path, depth + 1)

    walk(root, "app", 0)
    return found


def test_the_app_object_keeps_no_per_user_results(server, images):
    """Per-user passes live in gr.State; the shared DemoApp holds caches only (models, text vectors)."""
    app, url = server
    Client(url, verbose=False).predict(handle_file(images["A"][0]), images["A"][1], api_name="/segment")
    assert _session_data(app) == []
    # the walk finds what it looks for wherever it is kept
    kept = {"last": [types.SimpleNamespace(maps=(np.zeros((2, 2)), torch.zeros(3)), text=torch.zeros(1, 3))]}
    assert _session_data(kept) == ["app['last'][0].maps[0]: ndarray", "app['last'][0].text: Tensor"]
