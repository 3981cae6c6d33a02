"""Helpers shared by the app's test modules: the Segment button and a click called in process (`run`,
`select`), a free port, an in-process server, bad uploads, a forward-pass spy."""
from __future__ import annotations

import io
import socket
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
from PIL import Image

from fsa.config import METHOD_DEFAULTS
from fsa.demo.guards import friendly_errors
from fsa.demo.handlers import DemoApp
from fsa.demo.limits import RuntimeLimits
from fsa.demo.page import build_demo
from fsa.demo.server import launch_options

REPO = Path(__file__).resolve().parents[1]
VOCAB = "cup; mug, table, background"


def run(app: "DemoApp", image, *beyond, vocabulary: str = VOCAB, method: str = "clearclip", fsa_on=True,
        isolation=True, pruning=True, ensemble=True, lam=3.0, p=0.45, short_side=64, crop=None, stride=None,
        logit_scale=None, bg_threshold=0.0, record=None):
    """The Segment button as the page calls it (through `friendly_errors`; progress=None: no Gradio request):
    the page's fields at their defaults for `method` unless given, `beyond` the beyond-the-paper fields
    (similarity, iterations, blocks). → the handler's outputs (baseline, FSA mask, summary, record, ...)."""
    d = METHOD_DEFAULTS[method]
    crop = d.crop if crop is None else crop
    stride = d.stride if stride is None else stride
    logit_scale = d.logit_scale if logit_scale is None else logit_scale
    return friendly_errors(app.run)(record, image, vocabulary, method, app.default_backbone, fsa_on, isolation,
                                    pruning, ensemble, lam, p, short_side, crop, stride, logit_scale, bg_threshold,
                                    *beyond, progress=None)


def select(x: float, y: float) -> gr.SelectData:
    """The event data of a click at pixel (x, y) of an image."""
    return gr.SelectData(None, {"index": [x, y], "value": None})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def launched_demo(short_side: int = 64, limits: "RuntimeLimits | None" = None):
    """(DemoApp, Blocks, url) of the demo launched in this process as `python app.py` launches it (limits
    from the environment unless given); closed on exit."""
    app = DemoApp(short_side=short_side, limits=limits)
    demo = build_demo(app)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                **launch_options(app.limits))
    try:
        yield app, demo, demo.local_url
    finally:
        demo.close()


@contextmanager
def launched_app(short_side: int = 64):
    """(DemoApp, url) of `launched_demo`."""
    with launched_demo(short_side) as (app, _, url):
        yield app, url


def write_bad_images(folder: Path) -> dict[str, Path]:
    """A good 96×64 photo and the uploads the load test found failing: a text file named .png, an
    empty file, a JPEG cut in half. → name ("photo", "text", "empty", "truncated") → path."""
    photo = Image.open(REPO / "examples" / "coffee.jpg").convert("RGB")
    paths = {"photo": folder / "coffee_small.png", "text": folder / "notes.png", "empty": folder / "empty.png",
             "truncated": folder / "cut.jpg"}
    photo.resize((96, 64)).save(paths["photo"])
    paths["text"].write_text("this is a text file renamed .png\n")
    paths["empty"].write_bytes(b"")
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    paths["truncated"].write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return paths


def count_compare_calls(app: "DemoApp", monkeypatch) -> list:
    """Record the vocabulary of every forward pass (Segmenter.compare) of the app's default segmenter, as
    text: the app hands it a parsed `fsa.Vocabulary`, written back here as "class; synonym, class"."""
    seg = app.segmenter()
    calls: list = []
    original = seg.compare

    def counting(*args, **kwargs):
        vocabulary = args[1]
        if not isinstance(vocabulary, str):
            vocabulary = ", ".join("; ".join(synonyms) for synonyms in vocabulary.classes)
        calls.append(vocabulary)
        return original(*args, **kwargs)

    monkeypatch.setattr(seg, "compare", counting)
    return calls
