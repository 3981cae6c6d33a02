"""Two sessions at once get their own results: two gradio_client clients (two session hashes) with
different images and vocabularies, submitted together and interleaved, against one launched app."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from fsa.demo.sessions import RunRecord
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


def test_the_app_object_keeps_no_per_user_results(server, images):
    """Per-user passes live in gr.State; the shared DemoApp holds caches only."""
    app, url = server
    Client(url, verbose=False).predict(handle_file(images["A"][0]), images["A"][1], api_name="/segment")
    for value in vars(app).values():
        assert not isinstance(value, RunRecord)
        assert type(value).__name__ not in ("SegmentationResult", "ComparisonResult")
