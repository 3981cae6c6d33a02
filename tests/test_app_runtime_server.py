"""The app's runtime through a launched server and gradio_client (tiny model): clear decoding errors,
session state dropped on TTL and when the client leaves, the temp folder swept, abandoned jobs stopped,
and cached clicks answering while a forward pass holds the model."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from PIL import Image

from fsa.demo.guards import CANCELLED_MESSAGE
from fsa.demo.limits import RuntimeLimits
from fsa.demo.sessions import RunRecord
from _app_fixtures import launched_demo, write_bad_images

REPO = Path(__file__).resolve().parents[1]
VOCAB = "cup, table"


def launched(limits=None):
    """`launched_demo` with these limits (the defaults, whatever the environment says)."""
    return launched_demo(limits=limits or RuntimeLimits())


@pytest.fixture(scope="module")
def server():
    with launched() as launched_server:
        yield launched_server


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    paths = write_bad_images(folder)
    paths["other"] = folder / "cat_small.png"
    Image.open(REPO / "examples" / "chelsea_cat.jpg").convert("RGB").resize((64, 80)).save(paths["other"])
    return {k: str(v) for k, v in paths.items()}


def _session_records(demo, session_hash: str) -> list:
    """The RunRecords the server holds for one session."""
    session = demo.server_app.state_holder.session_data.get(session_hash)
    if session is None:
        return []
    return [v for v in session.state_data.values() if isinstance(v, RunRecord)]


def _wait_for(condition, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


# --------------------------------------------------------------------------- decoding errors
@pytest.mark.parametrize(
    "name, message",
    [
        ("text", r"cannot read notes.png as an image \(cannot identify image file 'notes.png'\); use a PNG, JPEG"),
        ("empty", r"empty.png is an empty file \(0 bytes\); upload an image file"),
        ("truncated", r"cannot read cut.jpg as an image \(image file is truncated"),
    ],
)
def test_bad_uploads_reach_the_client_as_our_message(server, files, name, message):
    client = Client(server[2], verbose=False)
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(files[name]), VOCAB, api_name="/segment")
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(files[name]), VOCAB, "clearclip", 5, 5, api_name="/attention")
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(files[name]), VOCAB, api_name="/compare_all")
    # the same client still works afterwards
    baseline, fsa_mask, _ = client.predict(handle_file(files["photo"]), VOCAB, api_name="/segment")
    assert Image.open(fsa_mask).size[0] == 96


# --------------------------------------------------------------------------- sessions
def test_session_state_is_dropped_after_its_ttl(files):
    with launched(RuntimeLimits(session_ttl=1.0)) as (app, demo, url):
        client = Client(url, verbose=False)  # stays connected (heartbeat) for the whole test
        client.predict(handle_file(files["photo"]), VOCAB, api_name="/segment")
        assert len(_session_records(demo, client.session_hash)) == 1
        # Gradio's state holder sweeps every second: gone within TTL + ~1 s
        assert _wait_for(lambda: not _session_records(demo, client.session_hash), timeout=10)
        # and the session goes on: /attention runs a new pass for it
        *_, text = client.predict(handle_file(files["photo"]), VOCAB, "clearclip", 5, 5, api_name="/attention")
        assert "Query patch" in text
        client.close()


def test_session_state_is_dropped_when_the_client_leaves(files, monkeypatch):
    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.2")  # how soon the server notices a closed page
    with launched(RuntimeLimits(session_ttl=3600.0)) as (app, demo, url):
        clients = [Client(url, verbose=False) for _ in range(3)]
        for client in clients:
            client.predict(handle_file(files["photo"]), VOCAB, api_name="/segment")
        for client in clients:
            assert len(_session_records(demo, client.session_hash)) == 1
        leaving, staying = clients[:2], clients[2]
        for client in leaving:
            client.close()  # ends its heartbeat, as closing the tab does
        # dropped now, not after Gradio's hour for closed sessions nor after the TTL
        assert _wait_for(lambda: not any(_session_records(demo, c.session_hash) for c in leaving), timeout=15)
        assert _wait_for(lambda: not any(c.session_hash in demo.server_app.state_holder.session_data
                                         for c in leaving), timeout=15)  # and Gradio's page config for it
        assert len(_session_records(demo, staying.session_hash)) == 1
        staying.close()


# --------------------------------------------------------------------------- temp folder
def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_the_temp_folder_is_swept(files, tmp_path, monkeypatch):
    root = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(root))
    with launched(RuntimeLimits(temp_ttl=1.0)) as (app, demo, url):  # swept every second
        kept = set(demo.keep_in_cache).union(*(getattr(b, "keep_in_cache", set()) for b in demo.blocks.values()))
        client = Client(url, verbose=False)
        for path in (files["photo"], files["other"]):
            client.predict(handle_file(path), VOCAB, api_name="/segment")
            client.predict(handle_file(path), VOCAB, "clearclip", 5, 5, api_name="/attention")
        made = [p for p in _temp_files(root) if str(p) not in kept]
        assert len(made) >= 6  # uploads, masks, maps
        # every request file is deleted within ttl + one sweep, and its folder after it
        assert _wait_for(lambda: not [p for p in _temp_files(root) if str(p) not in kept], timeout=10)
        assert _wait_for(lambda: not [d for d in root.iterdir() if d.is_dir() and not any(d.iterdir())],
                         timeout=10)
        # the examples' files are kept: a click on an example still fills the inputs
        for path in kept:
            assert Path(path).is_file(), f"example file {path} was swept"
        client.predict(handle_file(files["photo"]), VOCAB, api_name="/segment")  # still serving
        client.close()


# --------------------------------------------------------------------------- abandoned jobs, clicks under load
@pytest.fixture
def slow_pass(server, monkeypatch):
    """Replace the forward pass by one that reports progress until the job is stopped (or 60 s pass)."""
    app = server[0]
    segmenter = app.segmenter()
    state = {"started": threading.Event(), "stopped": threading.Event(), "outcome": None}

    def slow_compare(image, vocabulary, settings, progress=None):
        state["started"].set()
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                progress(0.5, "windows 1-4 of 8")  # the library's report between window batches
                time.sleep(0.05)
        except Exception as exc:
            state["outcome"] = exc
            state["stopped"].set()
            raise
        state["outcome"] = "ran to the end"
        state["stopped"].set()
        raise RuntimeError("the job was not stopped")

    monkeypatch.setattr(segmenter, "compare", slow_compare)
    return state


def _assert_model_free(server, files):
    """The stopped job gave its model slot back: the queue's "model" group and the app's own slots hold
    nothing, and a normal pass runs (the limits are hang guards: it takes about a second)."""
    app, demo, url = server
    group = demo._queue.event_queue_per_concurrency_id["model"]
    assert _wait_for(lambda: group.current_concurrency == 0, timeout=60), "the stopped job still holds the model"
    assert app._model_slots._value == app.limits.concurrency
    client = Client(url, verbose=False)
    client.submit(handle_file(files["photo"]), VOCAB, api_name="/segment").result(timeout=120)
    client.close()


def test_a_cancelled_job_stops_at_its_next_progress_report(server, files, slow_pass, monkeypatch):
    client = Client(server[2], verbose=False)
    job = client.submit(handle_file(files["photo"]), VOCAB, api_name="/segment")
    assert slow_pass["started"].wait(30)
    # gradio_client can only cancel once it knows the job's id (its /cancel call needs it): wait for that
    assert _wait_for(lambda: job.status().code in (Status.PROCESSING, Status.PROGRESS), timeout=30)
    job.cancel()
    assert slow_pass["stopped"].wait(30), "the cancelled job kept running"
    assert CANCELLED_MESSAGE in str(slow_pass["outcome"])
    client.close()
    monkeypatch.undo()
    _assert_model_free(server, files)


def test_a_job_whose_page_closed_stops_at_its_next_progress_report(server, files, slow_pass, monkeypatch):
    """The raw queue protocol: join, listen on the event stream, then drop the connection mid-job."""
    app, demo, url = server
    api = url.rstrip("/") + "/gradio_api"
    session = "closed-page-session"
    with open(files["photo"], "rb") as f:
        uploaded = httpx.post(f"{api}/upload", files=[("files", ("coffee_small.png", f))]).json()[0]
    fn_index = next(i for i, fn in demo.fns.items() if fn.api_name == "segment")
    image = {"path": uploaded, "orig_name": "coffee_small.png", "meta": {"_type": "gradio.FileData"}}
    # None: the session state; then the paper's beyond-the-paper switches (similarity, iterations, blocks)
    # raw HTTP: every input, the trailing proxy too (Gradio fills no default)
    data = [None, image, VOCAB, "clearclip", True, True, True, True, 3.0, 0.45, "kl", 1, "", "dino-b8"]
    joined = httpx.post(f"{api}/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                    "event_data": None, "trigger_id": None})
    assert joined.status_code == 200, joined.text
    with httpx.stream("GET", f"{api}/queue/data", params={"session_hash": session}, timeout=30) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:") and json.loads(line[5:]).get("msg") == "progress":
                break  # the pass is running: now the page goes away
    assert slow_pass["started"].is_set()
    assert slow_pass["stopped"].wait(30), "the job kept running after its page closed"
    assert CANCELLED_MESSAGE in str(slow_pass["outcome"])
    monkeypatch.undo()
    _assert_model_free(server, files)


def test_a_cached_click_answers_while_a_pass_holds_the_model(server, files, monkeypatch):
    app, demo, url = server
    clicker = Client(url, verbose=False)
    clicker.predict(handle_file(files["photo"]), VOCAB, api_name="/segment")  # the session's cached pass
    segmenter = app.segmenter()
    real = segmenter.compare
    entered, release, passes = threading.Event(), threading.Event(), []

    def blocked(*args, **kwargs):
        passes.append(args[1])
        entered.set()
        release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(segmenter, "compare", blocked)
    group = demo._queue.event_queue_per_concurrency_id["model"]
    busy = Client(url, verbose=False)
    try:
        job = busy.submit(handle_file(files["other"]), "cat, floor", api_name="/segment")
        assert entered.wait(30)
        # the model is held (FSA_CONCURRENCY=1) and another pass waits in its queue
        queued = Client(url, verbose=False).submit(handle_file(files["other"]), "cat, wall", api_name="/segment")
        assert _wait_for(lambda: len(group.queue) == 1, timeout=30), "the second pass did not queue behind the first"
        click = clicker.submit(handle_file(files["photo"]), VOCAB, "clearclip", 40, 30, api_name="/attention")
        *maps, chart, text = click.result(timeout=30)  # answered while both passes still wait
        assert (group.current_concurrency, len(group.queue), len(passes)) == (1, 1, 1), "a pass ran meanwhile"
        assert not job.done() and not queued.done()
        assert Image.open(maps[0]).size == (96, 64) and "Query patch" in text
    finally:
        release.set()
    job.result(timeout=60)
    queued.result(timeout=60)
    for client in (clicker, busy):
        client.close()
