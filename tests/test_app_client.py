"""The named API endpoints through gradio_client, against the app launched in-process (tiny model),
and `python app.py` started offline without weights (it must start and say what is missing)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from _app_fixtures import count_compare_calls, free_port, launched_app
from fsa.config import METHODS

REPO = Path(__file__).resolve().parents[1]
W, H = 96, 64


@pytest.fixture(scope="module")
def server():
    """(DemoApp, url) of one app launched in this process for the whole module."""
    with launched_app() as launched:
        yield launched


@pytest.fixture(scope="module")
def client(server):
    return Client(server[1], verbose=False)


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "coffee_small.png"
    Image.open(REPO / "examples" / "coffee.jpg").convert("RGB").resize((W, H)).save(path)
    return str(path)


@pytest.fixture
def compare_calls(server, monkeypatch):
    return count_compare_calls(server[0], monkeypatch)


def test_api_lists_the_named_endpoints_only(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/segment", "/attention", "/compare_all", "/score"} == names


def test_segment_returns_both_masks(client, photo_path):
    baseline, fsa_mask, summary = client.predict(
        handle_file(photo_path), "cup; mug, table, background", "clearclip", True, True, True, True, 3.0, 0.45,
        api_name="/segment")
    for path in (baseline, fsa_mask):
        mask = np.asarray(Image.open(path))
        assert mask.shape[1] == W and mask.shape[0] > H  # the picture plus its legend
    assert "ClearCLIP + FSA" in summary and "patch grid" in summary


def test_segment_with_keywords_and_fsa_off(client, photo_path):
    baseline, fsa_mask, summary = client.predict(image=handle_file(photo_path), vocabulary="cup, table",
                                                 method="maskclip", fsa_on=False, api_name="/segment")
    assert Image.open(baseline).size[0] == W and fsa_mask is None and "FSA off" in summary


def test_segment_uploaded_16bit_png(client, tmp_path):
    ramp = (np.linspace(0, 65535, W, dtype=np.float64)[None, :] * np.ones((H, 1))).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I;16")
    baseline, fsa_mask, _ = client.predict(handle_file(str(path)), "sky, ground", api_name="/segment")
    assert Image.open(fsa_mask).size[0] == W


def test_attention_maps(client, photo_path):
    *maps, chart, text = client.predict(handle_file(photo_path), "cup, table", "sclip", 48, 20, "head 2",
                                              api_name="/attention")
    assert len(maps) == 4
    for path in maps:
        assert Image.open(path).size == (W, H)
    assert Image.open(chart).size[0] >= 400
    assert "Query patch" in text and "head 2 of" in text


def test_attention_reuses_the_sessions_segment_pass(server, photo_path, compare_calls):
    client = Client(server[1], verbose=False)  # a fresh session
    client.predict(handle_file(photo_path), "cup, saucer", "naclip", api_name="/segment")
    client.predict(handle_file(photo_path), "cup, saucer", "naclip", 10, 10, api_name="/attention")
    client.predict(handle_file(photo_path), "cup, saucer", "naclip", 80, 60, api_name="/attention")
    assert len(compare_calls) == 1


def test_errors_reach_the_client_as_messages(client, photo_path):
    with pytest.raises(AppError, match="at least one class name"):
        client.predict(handle_file(photo_path), "", api_name="/segment")
    with pytest.raises(AppError, match="listed twice"):
        client.predict(handle_file(photo_path), "cup, cup", api_name="/segment")
    with pytest.raises(AppError, match="Upload an image"):
        client.predict(None, "cup", api_name="/segment")


#: /segment's similarity, iterations, blocks at the paper's values and ProxyCLIP's default proxy: a raw positional
#: call sends every input (Gradio's HTTP API fills no default; gradio_client does)
PAPER_SWITCHES = ["kl", 1, "", "dino-b8"]


def _raw_call(url: str, api: str, data: list) -> tuple[str, object]:
    """POST ``data`` to the HTTP API as JSON, NaN allowed (as `requests` or a load tester sends it; gradio_client
    refuses to encode NaN), and return (event, payload) of the answer: ("complete", outputs) or ("error", {...})."""
    import httpx

    base = url.rstrip("/") + "/gradio_api"
    body = json.dumps({"data": data})  # allow_nan: NaN goes out as the bare literal NaN
    event_id = httpx.post(f"{base}/call/{api}", content=body, headers={"content-type": "application/json"},
                          timeout=30).json()["event_id"]
    text = httpx.get(f"{base}/call/{api}/{event_id}", timeout=120).text
    events = [block.splitlines() for block in text.strip().split("\n\n")]
    event, data_line = events[-1][0], events[-1][1]
    return event.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))


@pytest.fixture(scope="module")
def uploaded_photo(server, photo_path):
    import httpx

    with open(photo_path, "rb") as f:
        path = httpx.post(server[1].rstrip("/") + "/gradio_api/upload", files={"files": f}, timeout=30).json()[0]
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def test_nan_lambda_sent_as_json_is_a_specific_error_not_a_mask(server, uploaded_photo, compare_calls, capfd):
    nan = float("nan")
    event, payload = _raw_call(server[1], "segment", [uploaded_photo, "cup, table", "clearclip", True, True, True,
                                                      True, nan, 0.45, *PAPER_SWITCHES])
    assert event == "error", payload
    assert payload["error"] == "λ (scaling of the similarity) must be a finite number in [0, 10], got nan"
    assert payload["title"] == "Check the inputs"
    for p in (nan, float("inf")):  # the top-p too
        event, payload = _raw_call(server[1], "segment", [uploaded_photo, "cup", "clearclip", True, True, True, True,
                                                          3.0, p, *PAPER_SWITCHES])
        assert event == "error" and "p (top-p kept by pruning) must be a finite number in [0.05, 1]" in payload["error"]
    assert compare_calls == []
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("short_side", [float("nan"), float("inf"), 5])
def test_bad_short_side_in_compare_all_is_a_specific_error(server, uploaded_photo, short_side, compare_calls):
    event, payload = _raw_call(server[1], "compare_all", [uploaded_photo, "cup, table", None, True, True, True, True,
                                                          3.0, 0.45, short_side, 0.0, "dino-b8"])
    assert event == "error" and payload["error"] is not None, payload
    assert payload["error"].startswith("Short side (pixels) must be a finite number in [16, 2048], got ")
    assert compare_calls == []


def test_user_errors_reach_gradio_client_with_our_message_and_log_one_line(client, photo_path, capfd, caplog):
    caplog.set_level("INFO", logger="fsa.app")
    with pytest.raises(AppError, match=r"^λ \(scaling of the similarity\) must be a finite number in \[0, 10\], "
                                       r"got 1e\+06$"):
        client.predict(handle_file(photo_path), "cup", "clearclip", True, True, True, True, 1e6, 0.45,
                       api_name="/segment")
    with pytest.raises(AppError, match=re.escape("class 2 (after 'cup') of the vocabulary is '\\u200b', which has "
                                                 "no visible character (U+200B ZERO WIDTH SPACE)")):
        client.predict(handle_file(photo_path), "cup, \u200b", api_name="/segment")
    assert "Traceback" not in capfd.readouterr().err  # Gradio prints none for our errors
    lines = [r.getMessage() for r in caplog.records if r.name == "fsa.app"]
    assert len(lines) == 2 and all(r.exc_info is None for r in caplog.records if r.name == "fsa.app"), lines
    assert lines[0].startswith("input: λ") and lines[1].startswith("api_segment: Check the inputs: class 2")


def test_compare_all(client, photo_path):
    grid, text = client.predict(handle_file(photo_path), "cup, table", api_name="/compare_all")
    assert Image.open(grid).size[0] == len(METHODS) * 256 + (len(METHODS) + 1) * 4 and "baselines" in text


def test_score_against_a_reference_mask(server, client, photo_path, tmp_path):
    from fsa.config import default_lambda
    from fsa.scoring import score_against

    vocabulary = "cup; mug, table, background"
    ref = np.zeros((H, W), np.uint8)
    ref[:, W // 2:] = 2
    ref[H // 3: H // 2] = 1
    ref[:5] = 255
    path = tmp_path / "reference.png"
    Image.fromarray(ref).save(path)
    table, maps = client.predict(handle_file(photo_path), vocabulary, "naclip", handle_file(str(path)),
                                 api_name="/score")
    # the same pass through the library: the table's mIoU is the library's
    app = server[0]
    settings = app.settings("naclip", True, True, True, True, default_lambda(app.default_backbone), 0.45)
    out = app.segmenter().compare(Image.open(photo_path), vocabulary, settings)
    expected = score_against(out.baseline, out.fsa, ref.astype(np.int64))
    row = next(r for r in table.splitlines() if r.startswith("| **mIoU** |"))
    assert [float(v) for v in row.split("|")[2:4]] == [round(expected.baseline.miou, 2), round(expected.fsa.miou, 2)]
    assert Image.open(maps).size[0] == 2 * W + 6
    with pytest.raises(AppError, match="is 48×32 pixels but the segmented image is 96×64"):
        Image.fromarray(ref[::2, ::2]).save(tmp_path / "half.png")
        client.predict(handle_file(photo_path), vocabulary, "naclip", handle_file(str(tmp_path / "half.png")),
                       api_name="/score")


# --------------------------------------------------------------------------- python app.py offline
def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def test_python_app_py_starts_offline_and_says_what_is_missing(tmp_path):
    """ViT-B/16 by default, no cached weights, HF_HUB_OFFLINE=1: the page must still come up."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("FSA_MODEL", "GRADIO_SERVER_PORT", "FSA_CHECKPOINT")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
               PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", GRADIO_ANALYTICS_ENABLED="False")
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        config = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                config = _get_json(url + "/config")
                break
            except OSError:
                time.sleep(0.5)
        assert config is not None, f"app.py did not serve on PORT={port}: {(tmp_path / 'app.log').read_text()[-2000:]}"
        status = next(c["props"]["value"] for c in config["components"] if c["props"].get("elem_id") == "model-status")
        assert "ViT-B-16" in status and "not available" in status
        assert "HF_HUB_OFFLINE" in status and "hf download" in status  # what is missing and how to provide it
        backbone = next(c["props"]["value"] for c in config["components"] if c["props"].get("elem_id") == "backbone")
        assert backbone == "ViT-B-16"
        # a segmentation request answers with the same explanation, from the offline branch (no hub probe, no
        # download to wait for; 120 s is a hang guard: it answers in about a second, see `python -m fsa bench
        # --startup` for the library's offline failures)
        client = Client(url, verbose=False)
        job = client.submit(handle_file(str(REPO / "examples" / "coffee.jpg")), "cup", api_name="/segment")
        with pytest.raises(AppError, match="weights unavailable: .*ViT-B-16.* HF_HUB_OFFLINE is set"):
            job.result(timeout=120)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_segment_beyond_the_paper(client, photo_path):
    """/segment's optional similarity, iterations, blocks (issue 8): paper defaults, non-paper runs labelled."""
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/segment"]
    params = {p["parameter_name"]: p for p in info["parameters"]}
    names = [p["parameter_name"] for p in info["parameters"]]
    assert names[-4:-1] == ["similarity", "iterations", "blocks"]
    assert [params[n]["parameter_default"] for n in names[-4:-1]] == ["kl", 1, ""]
    baseline, fsa_mask, summary = client.predict(handle_file(photo_path), "cup; mug, table, background", "clearclip",
                                                 similarity="js", iterations=2, api_name="/segment")
    for path in (baseline, fsa_mask):
        assert Image.open(path).size[0] == W
    assert "beyond the paper: similarity js, 2 iterations" in summary
    *_, summary = client.predict(handle_file(photo_path), "cup, table", "clearclip", api_name="/segment")
    assert "beyond the paper" not in summary
    with pytest.raises(AppError, match="blocks: 'x' is not a block number"):
        client.predict(handle_file(photo_path), "cup, table", "clearclip", blocks="x", api_name="/segment")
    with pytest.raises(AppError, match=r"'cosine'.*not in the list of choices: \['kl', 'sym_kl', 'js'\]"):
        client.predict(handle_file(photo_path), "cup, table", "clearclip", similarity="cosine", api_name="/segment")


def test_segment_takes_the_proxy_as_an_optional_last_input(client, photo_path):
    """/segment's trailing `proxy` (issue 14): DINO when left out (old callers), any of the four by name or
    position; the summary names the proxy (its tiny-test stand-in here) and its grid."""
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/segment"]
    last = info["parameters"][-1]
    assert last["parameter_name"] == "proxy" and last["parameter_default"] == "dino-b8"
    vocabulary = "cup; mug, table, background"
    *_, summary = client.predict(handle_file(photo_path), vocabulary, "proxyclip", api_name="/segment")
    assert "with random DINO stand-in proxy" in summary
    *_, summary = client.predict(handle_file(photo_path), vocabulary, "proxyclip", proxy="sam-b16",
                                 api_name="/segment")
    assert "with random SAM stand-in proxy" in summary and "**64×64** grid per window" in summary
    # positionally, after every other input
    *_, summary = client.predict(handle_file(photo_path), vocabulary, "proxyclip", True, True, True, True, 4.5, 0.45,
                                 "kl", 1, "", "mae-b16", api_name="/segment")
    assert "with random MAE stand-in proxy" in summary and "**21×21** grid per window" in summary
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict(handle_file(photo_path), vocabulary, "proxyclip", proxy="clip", api_name="/segment")
