"""Helpers shared by the app's test modules: a free port, an in-process server, a forward-pass spy."""
from __future__ import annotations

import socket
from contextlib import contextmanager

import app as demo_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def launched_app(short_side: int = 64):
    """(DemoApp, url) of the demo launched in this process; closed on exit."""
    app = demo_app.DemoApp(short_side=short_side)
    demo = demo_app.build_demo(app)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                **demo_app.launch_options(app.limits))
    try:
        yield app, demo.local_url
    finally:
        demo.close()


def count_compare_calls(app: "demo_app.DemoApp", monkeypatch) -> list:
    """Record the vocabulary of every forward pass (Segmenter.compare) of the app's default segmenter."""
    seg = app.segmenter()
    calls: list = []
    original = seg.compare

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(seg, "compare", counting)
    return calls
