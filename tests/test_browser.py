"""The page in a real browser: Playwright (python) driving Debian's chromium against the app launched
in-process with the tiny model. Skipped where /usr/bin/chromium is missing, except under CI=true,
where that is a failure. Screenshots go to $FSA_SCREENSHOT_DIR (default: a pytest temp folder).
Never run `playwright install`: the system chromium is used."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from fsa.demo.handlers import DemoApp
from fsa.demo.page import build_demo

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("FSA_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = int(os.environ.get("FSA_BROWSER_TIMEOUT_MS", "90000"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable(reason: str):
    """Skip with the reason, but fail under CI=true: there the browser tests must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; browser tests may not be skipped under CI=true", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright python package is not installed (pip install -r requirements.txt)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def url():
    demo = build_demo(DemoApp(short_side=112))
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("FSA_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots in {folder}")
    return folder


@pytest.fixture
def page(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url, wait_until="load")
    page.locator("#run").wait_for()
    yield page
    page.close()


def _toast(page, text: str):
    toast = page.get_by_text(text).first
    toast.wait_for(state="visible")
    return toast


def _upload(page, path: Path) -> None:
    page.locator("#image-input input[type=file]").set_input_files(str(path))
    page.locator("#image-input img").first.wait_for(state="visible")


def _click_picture(page, selector: str, fx: float, fy: float) -> tuple[float, float]:
    """Click the point at fractions (fx, fy) of the picture an <img> shows (an img element may letterbox its
    picture: Gradio shows it with object-fit scale-down) → the page coordinates clicked."""
    img = page.locator(selector).first
    img.scroll_into_view_if_needed()
    x0, y0, w, h = page.evaluate(
        """(sel) => { const i = document.querySelector(sel), r = i.getBoundingClientRect();
        let s = Math.min(r.width / i.naturalWidth, r.height / i.naturalHeight);
        if (getComputedStyle(i).objectFit === 'scale-down') s = Math.min(1, s);
        const w = i.naturalWidth * s, h = i.naturalHeight * s;
        return [r.left + (r.width - w) / 2, r.top + (r.height - h) / 2, w, h]; }""", selector)
    x, y = x0 + fx * w, y0 + fy * h
    page.mouse.click(x, y)
    return x, y


def _img_src(page, elem_id: str) -> str:
    img = page.locator(f"#{elem_id} img").first
    img.wait_for(state="visible")
    return img.get_attribute("src") or ""


def test_segment_click_and_see_attention(page, shots):
    assert "random weights" in page.locator("#model-status").inner_text()
    _upload(page, REPO / "examples" / "coffee.jpg")
    page.locator("#classes textarea").fill("cup; mug, saucer, table, background")
    page.locator("#run").click()
    baseline_src = _img_src(page, "mask-baseline")
    fsa_src = _img_src(page, "mask-fsa")
    assert baseline_src and fsa_src  # (with random weights the two masks may well be equal)
    assert "patch grid" in page.locator("#run-info").inner_text()
    page.screenshot(path=str(shots / "1_masks.png"), full_page=True)

    _click_picture(page, "#mask-fsa img", 0.45, 0.3)
    original_src = _img_src(page, "attn-original")
    adapted_src = _img_src(page, "attn-adapted")
    assert original_src and adapted_src and original_src != adapted_src
    for elem_id in ("attn-new", "attn-similarity", "class-probs"):
        assert _img_src(page, elem_id)
    info = page.locator("#attn-info")
    assert "Query patch" in info.inner_text()
    first_info = info.inner_text()
    page.locator("#attn-original").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "2_attention.png"), full_page=True)

    # a click on the input image picks another patch from the same cached pass
    _click_picture(page, "#image-input img", 0.9, 0.9)
    page.wait_for_function(
        "([sel, old]) => document.querySelector(sel).innerText !== old", arg=["#attn-info", first_info])
    assert "Query patch" in info.inner_text() and info.inner_text() != first_info

    # the step-by-step view is drawn when its section opens (closed, clicks skip it) ...
    steps_text = page.locator("#steps-text")
    page.locator("#steps-section").get_by_text("Feedback step by step").first.click()
    page.wait_for_function("() => document.querySelector('#steps-text').innerText.includes('Pass 1 of 1')")
    assert page.locator("#steps-gallery img").count() >= 1
    first_steps = steps_text.inner_text()
    page.locator("#steps-gallery").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "3_steps.png"), full_page=True)
    # ... and redrawn on a click while it is open
    _click_picture(page, "#mask-fsa img", 0.65, 0.45)
    page.wait_for_function(
        "([sel, old]) => document.querySelector(sel).innerText !== old", arg=["#steps-text", first_steps])
    assert "Pass 1 of 1" in steps_text.inner_text()
    assert "Traceback" not in page.content()


def _sized_page(browser, url, width, height):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url, wait_until="load")
    page.locator("#run").wait_for()
    return page


def _in_view(page, selector: str) -> dict:
    """The element's bounding box, asserted to lie within the viewport."""
    locator = page.locator(selector).first
    locator.wait_for(state="visible")
    box = locator.bounding_box()
    vp = page.viewport_size
    assert box is not None, selector
    assert box["y"] >= -1 and box["x"] >= -1, (selector, box)
    assert box["y"] + box["height"] <= vp["height"] + 1 and box["x"] + box["width"] <= vp["width"] + 1, \
        (selector, box, vp)
    return box


def _settled(page, selector: str) -> None:
    """Wait until the scroll that brings `selector` into view (after a short delay) is done."""
    page.wait_for_function(
        "(sel) => { const r = document.querySelector(sel).getBoundingClientRect();"
        " return r.top >= 0 && r.bottom <= window.innerHeight; }", arg=selector)
    page.wait_for_timeout(300)


@pytest.mark.parametrize("size", [(1280, 800), (390, 844)], ids=["desktop", "phone"])
def test_results_and_attention_come_into_view(browser, url, shots, size):
    """On arrival the image, vocabulary and Segment (desktop); after an example and Segment both masks;
    after a click its maps with the point marked on the image and both masks; then the keyboard patch
    choice; a refused run keeps the masks and says why in the summary."""
    name = f"{size[0]}x{size[1]}"
    page = _sized_page(browser, url, *size)
    try:
        if size[0] >= 1000:
            for selector in ("#image-input", "#classes", "#run"):
                _in_view(page, selector)
        assert "names" in page.locator("#class-budget").inner_text()
        page.screenshot(path=str(shots / f"{name}_0_arrival.png"))
        page.locator("#examples").get_by_text("cat; kitten").first.click()  # chelsea_cat.jpg, MaskCLIP
        page.wait_for_function("() => document.querySelector('#classes textarea').value.includes('kitten')")
        page.wait_for_function("() => document.querySelector('#class-budget').innerText.includes('for this image')")
        page.locator("#run").click()
        page.locator("#mask-fsa img").first.wait_for(state="visible")
        page.wait_for_function("() => document.querySelector('#run-info').innerText.includes('patch grid')")
        _settled(page, "#mask-row")
        _in_view(page, "#mask-baseline img")
        _in_view(page, "#mask-fsa img")
        frame = page.locator("#mask-fsa button:has(img)").first
        assert "inspect its patch" in (frame.get_attribute("aria-label") or "")  # a named button
        alt = page.locator("#mask-fsa img").first.get_attribute("alt") or ""
        assert "MaskCLIP" in alt and "largest classes" in alt
        assert page.locator("#legend-fsa li").count() == 3  # cat, floor, background (synonyms merged)
        page.screenshot(path=str(shots / f"{name}_1_masks.png"))

        click_x, click_y = _click_picture(page, "#mask-baseline img", 0.4, 0.3)
        clicked_scroll = page.evaluate("window.scrollY")
        page.wait_for_function("() => document.querySelector('#attn-info').innerText.includes('Query patch')")
        _settled(page, "#attn-info")
        _in_view(page, "#attn-original img")
        assert page.locator(".fsa-marker").count() == 3  # on the image and on both masks
        for elem_id in ("image-input", "mask-baseline", "mask-fsa"):
            marker = page.locator(f"#{elem_id} .fsa-marker").first.bounding_box()
            picture = page.locator(f"#{elem_id} img").first.bounding_box()
            cx, cy = marker["x"] + marker["width"] / 2, marker["y"] + marker["height"] / 2
            assert picture["x"] <= cx <= picture["x"] + picture["width"], elem_id
            assert picture["y"] <= cy <= picture["y"] + picture["height"], elem_id
        page.screenshot(path=str(shots / f"{name}_2_attention.png"))
        # on the mask clicked, the marker sits where the click was (the page has scrolled since: shift by it)
        marker = page.locator("#mask-baseline .fsa-marker").first.bounding_box()
        click_y += clicked_scroll - page.evaluate("window.scrollY")
        assert abs(marker["x"] + marker["width"] / 2 - click_x) < 3
        assert abs(marker["y"] + marker["height"] / 2 - click_y) < 3
        page.screenshot(path=str(shots / f"{name}_2_attention.png"))
        row = page.locator("#patch-row input").first.input_value()
        assert row and int(row) >= 1

        # keyboard: type a row and a column, Enter shows that patch
        first = page.locator("#attn-info").inner_text()
        page.locator("#patch-row input").first.fill("1")
        page.locator("#patch-col input").first.fill("1")
        page.locator("#patch-col input").first.press("Enter")
        page.wait_for_function("(old) => document.querySelector('#attn-info').innerText !== old", arg=first)
        assert "row 1, column 1 of the image" in page.locator("#attn-info").inner_text()
        # ... and the arrow keys on a focused mask move it
        page.locator("#mask-fsa button:has(img)").first.focus()
        page.keyboard.press("ArrowRight")
        page.wait_for_function("() => document.querySelector('#attn-info').innerText.includes('row 1, column 2 of')")
        page.keyboard.press("ArrowDown")
        page.wait_for_function("() => document.querySelector('#attn-info').innerText.includes('row 2, column 2 of')")

        # a refused run: said in the summary, the masks stay (no Error badge) and stay clickable
        src = page.locator("#mask-fsa img").first.get_attribute("src")
        page.locator("#classes textarea").fill(", ".join(f"name {i}" for i in range(200)))
        page.locator("#run").click()
        page.wait_for_function("() => document.querySelector('#run-info').innerText.includes('at most')")
        _settled(page, "#mask-row")
        _in_view(page, "#mask-fsa img")
        _in_view(page, "#run-info")  # the reason, where the masks are
        assert page.locator("#mask-fsa img").first.get_attribute("src") == src
        assert "last run that worked" in page.locator("#run-info").inner_text()
        assert page.locator("#mask-row").get_by_text("Error", exact=True).count() == 0
        page.screenshot(path=str(shots / f"{name}_3_refused.png"))
        before = page.locator("#attn-info").inner_text()
        _click_picture(page, "#mask-baseline img", 0.6, 0.4)
        page.wait_for_function("(old) => document.querySelector('#attn-info').innerText !== old", arg=before)
        assert "Traceback" not in page.content()
    finally:
        page.close()


def test_compare_all_opens_in_view_with_a_compact_grid(browser, url, shots):
    page = _sized_page(browser, url, 1280, 800)
    try:
        assert not page.locator("#compare-grid").is_visible()  # closed until used
        page.locator("#image-input input[type=file]").set_input_files(str(REPO / "examples" / "coffee.jpg"))
        page.locator("#classes textarea").fill("cup, table, background")
        page.locator("#compare-all").click()
        _settled(page, "#compare-section")
        page.wait_for_function("() => document.querySelector('#compare-info').innerText.includes('baselines on')")
        _settled(page, "#compare-section")
        box = _in_view(page, "#compare-grid img")
        assert box["width"] > 2 * box["height"]  # baselines as columns, two rows
        assert "λ = " in page.locator("#compare-info").inner_text()
        page.screenshot(path=str(shots / "1280x800_4_compare.png"))
    finally:
        page.close()


def test_errors_are_messages_not_tracebacks(page, shots, tmp_path):
    # an unreadable upload is said when it is uploaded, under the vocabulary
    bad = tmp_path / "notes.png"
    bad.write_text("a text file named .png\n")
    page.locator("#image-input input[type=file]").set_input_files(str(bad))
    page.wait_for_function("() => document.querySelector('#class-budget').innerText.includes('cannot be used')")
    assert "/tmp" not in page.locator("#class-budget").inner_text()  # no server path
    page.locator("#image-input button[aria-label='Remove Image']").first.click()
    page.locator("#classes textarea").fill("cat")
    page.locator("#run").click()
    _toast(page, "Upload an image first")
    _upload(page, REPO / "examples" / "chelsea_cat.jpg")
    _click_picture(page, "#image-input img", 0.5, 0.5)
    _toast(page, "Run a segmentation first")
    # said where the user looks, too (the toast may come first)
    page.wait_for_function("() => document.querySelector('#attn-info').innerText.includes('Segment')")
    assert page.get_by_text("Error", exact=True).count() == 0  # no bare Error badge on the panels
    page.screenshot(path=str(shots / "3_errors.png"), full_page=True)
    assert "Traceback" not in page.content()
