"""Gradio demo of FSA (Feedback Self-adaptive Attention, ICCV 2025): `python app.py`.

Thin by design: layout and callbacks only. The maths lives in `fsa` (`fsa.Segmenter`), the drawing
in `fsa.visualize`. Per-user data (what a click on the last forward pass needs) lives in a
per-session `gr.State`; the only shared object is a `DemoApp`, which holds the model caches.

Built to stay up as a public Space: uploads are decoded by `fsa.images.read_bounded` straight to the
working size (never Gradio's decoder, whose failures are opaque), every request is checked against a
memory budget before any model work, sessions drop their data when they end or after a TTL, clicks
never wait behind forward passes, a job whose client left stops at its next progress report, and
the temp folder is cleaned on a schedule.

Environment: FSA_MODEL (backbone, default ViT-B-16; `tiny-test` = random weights for tests),
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (or PORT), and the `RuntimeLimits` variables FSA_CONCURRENCY,
FSA_SESSION_TTL, FSA_MAX_PIXELS, FSA_MAX_CLASSES, FSA_TEMP_TTL (see the README's settings table).
"""
from __future__ import annotations

import os

# Before torch loads OpenMP: its worker threads would otherwise spin while they wait, taking the CPU from
# the threads that answer clicks and stream progress. Sleeping costs a forward pass about nothing
# (ViT-B/16 /segment on 2 cores: 1.51-1.56 s passive, 1.42-1.58 s spinning).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# ZeroGPU (Hugging Face Spaces) wants `spaces` imported before torch initialises CUDA; locally the
# package is optional and `_gpu` is a no-op.
try:
    import spaces  # type: ignore[import-not-found]
except ImportError:
    spaces = None

import asyncio
import base64
import binascii
import contextlib
import ctypes
import functools
import hashlib
import io
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import cv2
import gradio as gr
import numpy as np
from PIL import Image

import fsa
from fsa import visualize as viz
from fsa.checks import NumericalError, check_number
from fsa.config import BACKBONES, METHOD_DEFAULTS, METHOD_LABELS, METHODS, TINY_TEST, default_lambda
from fsa.scoring import read_reference_mask, score_against
from fsa.diagnostics import DiagnosticsStore
from fsa.images import DEFAULT_MAX_PIXELS, read_bounded, working_size
from fsa.text import TextFeatureCache
from fsa.vocabulary import parse_vocabulary

log = logging.getLogger("fsa.app")

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "examples"
#: (file, vocabulary, method) shown under the inputs; sources and licences in examples/SOURCES.md
EXAMPLES: list[tuple[str, str, str]] = [
    ("astronaut.jpg", "astronaut; person, american flag; flag, spacecraft model, background", "clearclip"),
    ("coffee.jpg", "coffee; espresso, cup; mug, saucer; plate, spoon, table; wood", "sclip"),
    ("chelsea_cat.jpg", "cat; kitten, floor; ground, background", "maskclip"),
    ("rocket.jpg", "rocket, smoke; exhaust plume, sky, launch tower, trees; forest", "naclip"),
    ("camera.png", "man; person, camera, tripod, grass; lawn, sky, building", "proxyclip"),
    ("hubble_deep_field.jpg", "galaxy, star, background", "clearclip"),
]
MEAN_HEADS = "mean over heads"
NO_RUN_MESSAGE = "Run a segmentation first (press “Segment”), then click a point on the image or on a mask."
NO_RUN_SCORE_MESSAGE = "Run a segmentation first (press “Segment”), then score it against a reference mask."
#: None: each method's published short side (fsa.METHOD_DEFAULTS: 336 for SCLIP, NACLIP, ProxyCLIP, else 448)
SHORT_SIDE_DEFAULT: Optional[int] = None
TITLE = "FSA: Feedback Self-adaptive Attention for CLIP segmentation"
INTRO = """\
Training-free open-vocabulary segmentation with CLIP. A baseline (MaskCLIP, SCLIP, ClearCLIP, NACLIP,
ProxyCLIP, GCLIP or vanilla CLIP) labels every patch; **FSA** (ICCV 2025) feeds those predictions back
into CLIP's last attention block: patches whose class distributions agree attend to each other, and the
baseline's own attention is blended in. Left: the baseline; right: baseline + FSA, from one forward pass.
**Click** a point on the image or a mask to see the attention of that patch before and after FSA.
Vocabulary: classes separated by commas, synonyms by `;`, optional `background`."""


def _gpu(duration: int) -> Callable[[Callable], Callable]:
    """`spaces.GPU(duration=...)` on Hugging Face ZeroGPU, the identity elsewhere."""
    if getattr(spaces, "GPU", None) is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


# --------------------------------------------------------------------------- runtime limits
def _env_number(environ: Mapping[str, str], name: str, default, kind: type):
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(float(raw)) if kind is int and float(raw).is_integer() else kind(raw)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise ValueError(f"{name}={raw!r} is not a positive {'whole ' if kind is int else ''}number; "
                         f"unset it for the default ({default})")
    return value


@dataclass(frozen=True)
class RuntimeLimits:
    """Bounds that keep a public deployment alive; `from_env` reads them from the environment.

    The defaults are sized for a free Hugging Face CPU Space (2 vCPU, 16 GB RAM) running ViT-B/16:
    one forward pass at a time, and no single request above ~1.5 GB of extra memory (measured with
    `python -m fsa loadtest`, see the README).
    """

    #: FSA_CONCURRENCY: forward passes at once (each up to ~0.6 GB above the server's level on ViT-B/16).
    concurrency: int = 1
    #: FSA_SESSION_TTL: seconds a session keeps its last pass after its last request; dropped at
    #: once when the page is closed.
    session_ttl: float = 900.0
    #: FSA_MAX_PIXELS: pixels decoded from an upload at most (JPEGs count after the decoder's 1/8
    #: reduction). 120 MP: a 10000×10000 photo passes; ≤ 5 bytes a pixel while decoding (a palette
    #: image expanded to RGBA), so ≤ 600 MB.
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: FSA_MAX_CLASSES: text queries (class names and synonyms) at most, for a working image of
    #: `CLASS_BUDGET_PIXELS`; larger working images get proportionally fewer. The score maps cost
    #: ~8 bytes per query and working pixel (two float32 canvases, baseline and FSA, averaged in place;
    #: the decision works on 16 MB bands), besides the text tower's activations while new names are
    #: encoded: measured +584 MB with ViT-B/16 for 150 new queries on a 2000×1500 photo (597×448
    #: working pixels). 150: ADE20K's vocabulary fits; encoding 150 new names takes ~1 min on 2 vCPUs.
    max_classes: int = 150
    #: FSA_TEMP_TTL: seconds Gradio's temp files (uploads, the PNGs sent back) are kept.
    temp_ttl: float = 900.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "RuntimeLimits":
        """The limits from FSA_CONCURRENCY, FSA_SESSION_TTL, FSA_MAX_PIXELS, FSA_MAX_CLASSES, FSA_TEMP_TTL;
        `ValueError` naming the variable when one is not a positive number."""
        d = cls()
        return cls(
            concurrency=_env_number(environ, "FSA_CONCURRENCY", d.concurrency, int),
            session_ttl=_env_number(environ, "FSA_SESSION_TTL", d.session_ttl, float),
            max_pixels=_env_number(environ, "FSA_MAX_PIXELS", d.max_pixels, int),
            max_classes=_env_number(environ, "FSA_MAX_CLASSES", d.max_classes, int),
            temp_ttl=_env_number(environ, "FSA_TEMP_TTL", d.temp_ttl, float),
        )

    @property
    def temp_sweep_every(self) -> float:
        """How often the temp folder is swept: files live at most temp_ttl + this."""
        return max(1.0, min(300.0, self.temp_ttl / 3))


#: Working pixels FSA_MAX_CLASSES is meant for: a 4:3 photo at the default short side (597 × 448).
CLASS_BUDGET_PIXELS = 597 * 448
#: Attention memory one batch of windows may take: heads × tokens² float32 matrices, ATTENTION_COPIES of
#: them alive at once. Measured on CPU with ViT-B/16: one 768×1024 window (3072 tokens) peaks at ~1.9
#: such matrices (0.85 GB above the rest of the request); the default 448-px windows take ~0.2 GB for a
#: batch of 4. The batch shrinks to fit; a single window above the budget is refused.
ATTENTION_BUDGET_BYTES = 2**30
ATTENTION_COPIES = 2
#: Patch size and heads of ProxyCLIP's proxy models (timm vit_base_patch8 / vit_base_patch14: ViT-B, 12
#: heads; the tiny test proxy: patch 8, 2 heads, fsa.proxies.tiny_test_proxy).
PROXY_GEOMETRY = {"dino-b8": (8, 12), "dinov2-b14-reg": (14, 12), TINY_TEST: (8, 2)}
#: Class names encoded at once (× 80 prompts). Measured on ViT-B/16, 40 new names: 2 a batch peak at +272 MB
#: in 16 s, 8 a batch at +365 MB in 20 s.
TEXT_NAMES_PER_BATCH = 2
#: Text features kept (≈2-4 KB each); the cache is emptied when it grows past this.
TEXT_CACHE_MAX_NAMES = 20_000
#: File format of the four attention heatmaps sent back for every click: photo-like pictures, where a
#: PNG takes ~125 ms to encode at 640×480 and 490 KB, a JPEG ~3 ms and 90 KB. Masks, the compare grid
#: and the Π chart stay PNG (exact class colours, text).
HEATMAP_FORMAT = "jpeg"
#: Classes the Π chart of a click shows at most (the most probable ones, when the vocabulary is longer).
CHART_MAX_BARS = 12
#: Sessions Gradio remembers at most (~110 KB of page config each, besides their state).
SESSION_CAPACITY = 1000
#: Width of one cell of the compare-all grid (fsa.visualize.compare_grid's default).
COMPARE_CELL_WIDTH = 256


def class_budget_message(queries: int, working_hw: tuple[int, int], max_classes: int) -> Optional[str]:
    """Why `queries` text queries on a working image of `working_hw` exceed the budget, or None."""
    wh, ww = working_hw
    allowed = min(max_classes, int(max_classes * CLASS_BUDGET_PIXELS // max(1, wh * ww)))
    if queries <= allowed:
        return None
    if allowed < 1:
        return (f"The image is resized to {ww}×{wh} pixels for the network, too large for this server's "
                f"memory budget: lower the short side (Advanced settings).")
    where = "" if allowed == max_classes else (f" for a {ww}×{wh} working image (lower the short side in "
                                               f"Advanced settings to allow more)")
    return (f"The vocabulary has {queries} names (class names and synonyms); this server takes at most "
            f"{allowed}{where}. Remove some names (limit FSA_MAX_CLASSES={max_classes}).")


def window_batch_for(tokens: int, heads: int, requested: int) -> int:
    """Windows per forward pass so that their attention stays within ATTENTION_BUDGET_BYTES (0: none fits)."""
    per_window = heads * (tokens + 1) ** 2 * 4 * ATTENTION_COPIES
    return max(0, min(requested, ATTENTION_BUDGET_BYTES // per_window))


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps them otherwise, and the process's RSS would stay
    at its high-water mark after sessions end (their arrays are freed, the pages are not returned)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def compare_cell(result, colors: np.ndarray) -> np.ndarray:
    """One cell of the compare-all grid: the mask over the image, COMPARE_CELL_WIDTH pixels wide."""
    panel = viz.segmentation_panel(result.image, result.labels, result.class_names, colors=colors)
    h, w = panel.shape[:2]
    if w == COMPARE_CELL_WIDTH:
        return panel
    size = (COMPARE_CELL_WIDTH, max(1, round(h * COMPARE_CELL_WIDTH / w)))
    return cv2.resize(panel, size, interpolation=cv2.INTER_AREA if w > COMPARE_CELL_WIDTH else cv2.INTER_LINEAR)


def prune_empty_dirs(root: Path, older_than: float) -> int:
    """Remove the empty sub-folders of `root` untouched for `older_than` seconds; → how many.

    Gradio keeps every temp file in a folder of its own and leaves the folder behind when
    `delete_cache` removes the file: without this, the temp folder would still grow by ~4 KB
    per file.
    """
    removed, now = 0, time.time()
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > older_than:
                os.rmdir(entry.path)  # fails (and is skipped) unless empty
                removed += 1
        except OSError:
            pass
    return removed


def temp_sweeper(limits: RuntimeLimits):
    """A server lifespan that sweeps empty folders out of Gradio's temp folder every `temp_sweep_every` s."""

    @contextlib.asynccontextmanager
    async def lifespan(_server_app):
        async def sweep() -> None:
            while True:
                await asyncio.sleep(limits.temp_sweep_every)
                await asyncio.to_thread(prune_empty_dirs, Path(gr.utils.get_upload_folder()), limits.temp_ttl)

        task = asyncio.create_task(sweep())
        try:
            yield
        finally:
            task.cancel()

    return lifespan


# --------------------------------------------------------------------------- per-session data
@dataclass(frozen=True)
class RunRecord:
    """What one session keeps in its `gr.State`: what a click on its last forward pass needs.

    Grid-level data and the picture only (no full-resolution label or score maps): a few MB.
    """

    key: tuple  #: (image digest, vocabulary, backbone, settings) that produced the pass
    image: np.ndarray  #: (h, w, 3) uint8: the picture the masks and maps are drawn on
    class_names: tuple[str, ...]
    diagnostics: Optional[DiagnosticsStore]  #: per-window data of the FSA pass; None when FSA was off
    input_size: tuple[int, int]  #: (width, height) of the image the user gave
    method: str = "clearclip"
    #: (h, w) uint8 labels of the baseline and of baseline + FSA (None with FSA off), for scoring
    labels: Optional[np.ndarray] = None
    fsa_labels: Optional[np.ndarray] = None
    point: Optional[tuple[float, float]] = None  #: last query point, in pixels of `image`

    def masks(self) -> tuple["MaskView", Optional["MaskView"]]:
        """The baseline's and FSA's label maps as `fsa.scoring.score_against` takes them."""
        def view(labels):
            return None if labels is None else MaskView(self.class_names, labels, self.method)

        return view(self.labels), view(self.fsa_labels)

    def explain(self, x: float, y: float) -> "fsa.PatchExplanation":
        """Attention rows of the patch under (x, y) (pixels of `image`).

        A fresh store each time: the N×N matrices it builds for a window live for this click only,
        not for the session's lifetime (~35 MB per window of ViT-B/16).
        """
        d = self.diagnostics
        return DiagnosticsStore(d.windows, d.details, d.scale, d.vocabulary).explain(x, y)


@dataclass(frozen=True)
class MaskView:
    """A label map of a session's pass, with what scoring needs to know about it."""

    class_names: tuple[str, ...]
    labels: np.ndarray  #: (h, w) class indices
    method: str
    notes: tuple[str, ...] = ()


def _compact_labels(labels: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """int64 labels → uint8 (the vocabulary budget keeps classes far below 256): 8× less session memory."""
    if labels is None:
        return None
    return labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)


def image_digest(image) -> str:
    """Content hash of an image: a file's bytes, a file object's bytes, a PIL image or an array."""
    h = hashlib.sha1()
    if isinstance(image, (str, Path)):
        with open(image, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return "file:" + h.hexdigest()
    if hasattr(image, "getvalue"):
        h.update(image.getvalue())
        return "file:" + h.hexdigest()
    if isinstance(image, Image.Image):
        meta, data = f"{image.mode}{image.size}", image.tobytes()
    else:
        arr = np.ascontiguousarray(image)
        meta, data = f"{arr.dtype}{arr.shape}", arr.tobytes()
    h.update(meta.encode() + data)
    return h.hexdigest()


def run_key(image, vocabulary: str, backbone: str, settings) -> tuple:
    """What a `RunRecord` was made for: a later request with the same key may reuse its pass."""
    return image_digest(image), vocabulary, backbone, settings


def parse_head(value: Optional[str]) -> Optional[int]:
    """Head selector value → None (mean) or a 0-based head index."""
    if not value or value == MEAN_HEADS:
        return None
    try:
        return int(str(value).split()[-1]) - 1
    except ValueError:
        raise gr.Error(f"unknown head {value!r}; pick “{MEAN_HEADS}” or “head N”") from None


def head_choices(num_heads: int) -> list[str]:
    return [MEAN_HEADS] + [f"head {h + 1}" for h in range(num_heads)]


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def friendly_errors(fn: Callable) -> Callable:
    """Turn every exception of a callback into a `gr.Error` a person understands (no traceback).

    Logging: a user error (a `gr.Error`, a `ValueError` such as a bad setting or vocabulary, missing
    weights, out of memory) is one line; only a bug (any other exception, or NaN in a result) logs
    its traceback. Gradio prints a traceback for every `gr.Error` it is given unless told not to
    (`print_exception=False`), so every error leaving here says so.
    """
    name = getattr(fn, "__name__", str(fn))

    def user_error(message: str, *, title: str = "Check the inputs", duration: Optional[float] = 10,
                   level: int = logging.INFO) -> gr.Error:
        log.log(level, "%s: %s: %s", name, title, _one_line(message))
        return gr.Error(message, title=title, duration=duration, print_exception=False)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as exc:  # before ValueError: gr.Error is one
            log.info("%s: %s: %s", name, exc.title, _one_line(exc.message))
            exc.print_exception = False
            raise
        except fsa.WeightsUnavailableError as exc:
            raise user_error(f"Model weights unavailable: {exc}", title="Weights missing", duration=None,
                             level=logging.WARNING) from None
        except NumericalError as exc:  # NaN/inf reached a result: a bug or an unchecked extreme setting
            log.error("%s produced non-finite values", name, exc_info=True)
            raise gr.Error(f"{exc}", title="No meaningful result", print_exception=False) from None
        except (ValueError, FileNotFoundError) as exc:
            raise user_error(str(exc)) from None
        except MemoryError:
            raise user_error("Out of memory: lower the short side or the window crop in Advanced settings.",
                             title="Out of memory", level=logging.WARNING) from None
        except Exception as exc:  # noqa: BLE001 - the page must never show a traceback
            if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
                raise user_error("Out of GPU memory: lower the short side or the window crop in Advanced "
                                 "settings.", title="Out of memory", level=logging.WARNING) from None
            log.exception("callback %s failed", name)
            raise gr.Error(f"Unexpected error ({type(exc).__name__}: {exc}). The server log has the details.",
                           print_exception=False) from None

    return wrapper


def check_number_inputs(demo: gr.Blocks) -> None:
    """Check every Number and Slider input of ``demo`` before Gradio's own preprocessing.

    Gradio's checks run before any callback: a value out of a component's range raises a `gr.Error`
    that prints a traceback, and NaN or inf in a whole-number field fails inside `int()` with a bare
    ValueError that clients see as ``error: null``. Here such a value is one log line and a message
    naming the field, its value and its range.
    """
    for block in demo.blocks.values():
        if isinstance(block, (gr.Number, gr.Slider)):
            block.preprocess = _checked_preprocess(block)


def _checked_preprocess(block) -> Callable:
    original = block.preprocess
    label = block.label or block.elem_id or "a number field"

    def preprocess(payload):
        if payload is not None:
            try:
                check_number(label, payload, low=block.minimum, high=block.maximum)
            except ValueError as exc:
                log.info("input: %s", _one_line(exc))
                raise gr.Error(str(exc), title="Check the inputs", print_exception=False) from None
        return original(payload)

    return preprocess


CANCELLED_MESSAGE = "Stopped: the page or client that asked for this result has gone."


class ClientWatch:
    """Whether the client of the queued event running in this thread is still there.

    Gradio 6.31 marks a running event `alive = False` when its client's event stream disconnects
    (tab closed, client gone) and drops it from the queue's active jobs when the client cancels
    it (`/cancel`); the handler's thread keeps running either way. The library reports progress
    between window batches, so checking there stops an abandoned pass within one batch. Outside a
    queued event (direct calls, tests, ZeroGPU's worker) it never reports the client gone.
    """

    def __init__(self) -> None:
        self._queue = self._event = None
        try:
            from gradio.context import LocalContext

            blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
            queue = getattr(blocks, "_queue", None)
            if queue is None or not event_id:
                return
            for job in queue.active_jobs:
                for event in job or ():
                    if event._id == event_id:
                        self._queue, self._event = queue, event
        except (AttributeError, LookupError, ImportError):  # another Gradio: no cancellation, no harm
            self._queue = self._event = None

    def gone(self) -> bool:
        event = self._event
        if event is None:
            return False
        if not event.alive:
            return True
        return not any(job is not None and any(e is event for e in job) for job in self._queue.active_jobs)

    def check(self) -> None:
        """Raise (a quiet `gr.Error` no one will read) when the client has gone."""
        if self.gone():
            log.info("stopping a job whose client has gone")
            raise gr.Error(CANCELLED_MESSAGE, print_exception=False)


def _progress_callback(progress, start: float = 0.0, span: float = 1.0, watch: Optional[ClientWatch] = None):
    """The library's `progress(fraction, message)` → a `gr.Progress` (None-safe); stops the job there
    when `watch` says the client has gone."""
    if progress is None and watch is None:
        return None

    def report(fraction: float, message: str) -> None:
        if watch is not None:
            watch.check()
        if progress is not None:
            progress(start + span * max(0.0, min(1.0, float(fraction))), desc=message)

    return report


# --------------------------------------------------------------------------- beyond the paper
#: The paper's values of the switches FSA leaves open (fsa.FeedbackConfig's defaults).
PAPER_SIMILARITY, PAPER_ITERATIONS = "kl", 1
SIMILARITY_CHOICES = [("KL divergence (the paper)", "kl"), ("symmetric KL (beyond the paper)", "sym_kl"),
                      ("Jensen–Shannon (beyond the paper)", "js")]
ITERATIONS_MAX = 4
LAST_BLOCK, LAST_TWO_BLOCKS = "last", "last two"
NO_STEPS_MESSAGE = ("Segment, then click a point on the image or on a mask: its patch's feedback is played here "
                    "step by step.")
BEYOND_INTRO = """\
The paper runs **one** feedback pass into the **last** block, with a **KL** similarity. These switches ask what
the paper leaves open; any value other than the first one is **not the paper's method** and the run summary says so.
They apply to *Segment* and `/segment`; *Compare all baselines*, `/attention` and `/score` keep the paper's
settings. The step-by-step view below works for the paper's settings too."""


def parse_iterations(value) -> int:
    """Feedback passes from the page (a slider may send 2.0) → int in 1..ITERATIONS_MAX; None → the paper's 1."""
    if value is None:
        return PAPER_ITERATIONS
    return check_number("iterations (feedback passes)", value, low=1, high=ITERATIONS_MAX, integer=True)


def parse_blocks(text, depth: Callable[[], int]) -> Optional[tuple[int, ...]]:
    """The blocks box → FeedbackConfig.blocks: None (the last block, the paper) or sorted 1-based blocks.

    Accepts empty / "last" (the paper), "last two", or block numbers separated by commas or spaces
    ("11, 12"); `depth()` (blocks of the vision tower) is only asked for when needed. The last block
    alone is returned as None, the paper's setting. Raises ValueError naming the bad entry.
    """
    if text is None:
        return None
    if not isinstance(text, str):  # a sequence of block numbers from Python
        text = ", ".join(str(b) for b in text)
    words = text.strip().lower().replace("(the paper)", "").replace("(paper)", "").strip()
    if words in ("", LAST_BLOCK):
        return None
    n = depth()
    if words == LAST_TWO_BLOCKS:
        return (n - 1, n) if n > 1 else None
    hint = (f"type 1-based block numbers separated by commas (e.g. “{max(1, n - 1)}, {n}”), "
            f"“{LAST_TWO_BLOCKS}”, or leave the box empty for the last block (the paper)")
    blocks = []
    for token in words.replace(",", " ").split():
        if not (token.isascii() and token.isdigit()):
            raise ValueError(f"blocks: {token!r} is not a block number; {hint}")
        block = int(token)
        if not 1 <= block <= n:
            raise ValueError(f"blocks: block {block} is outside 1..{n} of this backbone's {n}-block vision tower; "
                             f"{hint}")
        if block in blocks:
            raise ValueError(f"blocks: block {block} is listed twice; {hint}")
        blocks.append(block)
    return None if blocks == [n] else tuple(sorted(blocks))


def beyond_paper_switches(feedback) -> list[str]:
    """The switches of a FeedbackConfig (or None) that are not the paper's, in words ([] for the paper)."""
    if feedback is None:
        return []
    out = []
    if feedback.similarity != PAPER_SIMILARITY:
        out.append(f"similarity {feedback.similarity}")
    if feedback.iterations != PAPER_ITERATIONS:
        out.append(f"{feedback.iterations} iterations")
    if feedback.blocks is not None:
        out.append(f"blocks {', '.join(map(str, feedback.blocks))}")
    return out


def pass_choices(count: int) -> list[str]:
    return [f"pass {t}" for t in range(1, count + 1)]


def parse_pass(value: Optional[str], count: int) -> int:
    """Pass selector value ("pass 2") → 1-based pass, the last one if beyond `count`; None → 1."""
    if not value:
        return 1
    try:
        t = int(str(value).split()[-1])
    except ValueError:
        raise gr.Error(f"unknown pass {value!r}; pick “pass N”") from None
    return max(1, min(count, t))


_SIMILARITY_FORMULAS = {
    "kl": ("Ŝ[i] = 1/(1 + KL(Π_i‖Π_j))", ""),
    "sym_kl": ("Ŝ[i] = 1/(1 + ½(KL(Π_i‖Π_j) + KL(Π_j‖Π_i)))", " Symmetric KL: beyond the paper."),
    "js": ("Ŝ[i] = 1/(1 + JS(Π_i, Π_j))", " Jensen–Shannon: beyond the paper."),
}


def feedback_step_lines(exp, iteration: int, head: Optional[int] = None) -> list[str]:
    """One line of plain text per step of feedback pass `iteration` (1-based) of a PatchExplanation."""
    cfg = exp.feedback or fsa.FeedbackConfig()
    it = exp.iterations[iteration - 1]
    n = it.kept.size
    source = "the baseline" if iteration == 1 else f"FSA's pass {iteration - 1} (beyond the paper)"

    def top(names, values):
        j = int(np.argmax(values))
        return f"{names[j]} {values[j]:.2f}"

    lines = []
    if it.feedback_logits is not None:
        lines.append(f"1. Z = {cfg.feedback_scale:g}·cos: what {source} predicts for this patch, one logit per "
                     f"text query (highest: {top(exp.query_names, it.feedback_logits)}).")
    else:
        lines.append(f"1. Z = {cfg.feedback_scale:g}·cos: what {source} predicts for this patch.")
    if it.isolation_logits is not None:
        lines.append(f"2. U = {cfg.isolation_scale:g}·cos under uniform attention: what the block predicts when "
                     f"every token attends to every token equally, the ‘everything attends to everything’ bias "
                     f"(highest: {top(exp.query_names, it.isolation_logits)}).")
        pi_formula, pi_what = "Π = softmax(Z − U)", "with that bias removed"
    else:
        lines.append("2. U: attention isolation is off, so no bias is subtracted (an ablation of the paper).")
        pi_formula, pi_what = "Π = softmax(Z)", "as the feedback sees it (no bias removed)"
    lines.append(f"3. {pi_formula}: the patch's class distribution {pi_what}; a class takes its best synonym "
                 f"(most likely: {top(exp.class_names, it.class_probs)}).")
    formula, note = _SIMILARITY_FORMULAS.get(cfg.similarity, ("Ŝ[i]", ""))
    lines.append(f"4. {formula}: how much each patch j agrees with the query patch (1 = the same distribution; "
                 f"here {float(it.similarity.min()):.3f} to 1).{note}")
    kept = int(it.kept.sum())
    if cfg.pruning:
        lines.append(f"5. Kept set: top-p pruning (p = {cfg.p:g}) keeps the {kept} of {n} patches that agree most; "
                     f"the dimmed rest get no attention.")
    else:
        lines.append(f"5. Kept set: pruning is off, so all {n} patches stay (an ablation of the paper).")
    lines.append(f"6. A_new[i] = softmax(Ŝ·exp({cfg.lam:g}·Ŝ)) over the kept set: attention from agreement "
                 f"(largest weight {float(it.attn_new.max()):.3f}).")
    blocks = [b.block for b in it.blocks]
    where = f"block {blocks[-1]}"
    if len(blocks) > 1:
        where += (f"; blocks {', '.join(map(str, blocks[:-1]))} blend the same A_new with their own A₀ "
                  f"(beyond the paper)")
    head_text = "mean over heads" if head is None else f"head {head + 1}"
    if cfg.ensemble:
        lines.append(f"7. A_ens[i] = (A_new·A₀ + A₀·A_new + A_new)/3: blended with the baseline's attention "
                     f"A₀, this is what FSA uses ({where}; {head_text}).")
    else:
        lines.append(f"7. A_ens[i]: the adaptation ensemble is off, so FSA uses A_new[i] itself, without the "
                     f"baseline's attention (an ablation of the paper; {where}).")
    return lines


def _decoded_image_input(component: gr.Image) -> gr.Image:
    """Make `component` hand its handlers the uploaded file (a path, or the bytes of a base64 payload)
    instead of a decoded image.

    Gradio's own preprocessing opens the file with PIL first, and a text file named .png, an empty
    or a damaged file then fails inside Gradio with an opaque "the upstream app raised an exception";
    decoding it in the handler (`fsa.images.read_bounded`) names the problem, and decodes large
    images straight to the working size. Set on the instance: a `gr.Image` subclass would make
    Gradio write a .pyi stub next to this file.
    """

    def preprocess(payload):
        if payload is None:
            return None
        url = getattr(payload, "url", None) or ""
        if url.startswith("data:"):  # a base64 image in an API call
            try:
                return io.BytesIO(base64.b64decode(url.partition(",")[2], validate=True))
            except (binascii.Error, ValueError):
                raise gr.Error("The image data is not valid base64; send the image as a file.") from None
        return payload.path

    component.preprocess = preprocess
    return component


# --------------------------------------------------------------------------- the shared app object
class DemoApp:
    """Model caches (shared by all sessions, thread-safe) and the callbacks of the page.

    Holds no per-user data: every callback takes and returns the session's `RunRecord`.
    """

    def __init__(self, backbone: Optional[str] = None, *, device=None,
                 short_side: Optional[int] = SHORT_SIDE_DEFAULT, preload: bool = True,
                 limits: Optional[RuntimeLimits] = None):
        self.limits = limits or RuntimeLimits.from_env()
        self.cache = fsa.ModelCache()
        # Trimmed after new names: the text tower's freed activations would otherwise stay resident (glibc
        # keeps them) under the windows' peak (measured on ViT-B/16, 150 names: +1106 → +619 MB).
        self.text_cache = TextFeatureCache(names_per_batch=TEXT_NAMES_PER_BATCH, on_encoded=release_freed_memory)
        self.device = device
        #: a short side for every method (tests, small servers), or None for each method's own
        self.default_short_side = None if short_side is None else int(short_side)
        self._segmenters: dict[str, Any] = {}
        self._lock = threading.Lock()
        # Forward passes at once, whoever asks: the queue's "model" group and /attention calls that find
        # no cached pass (they run in the click group so that cached clicks never wait).
        self._model_slots = threading.BoundedSemaphore(self.limits.concurrency)
        self._trim_lock = threading.Lock()
        self._last_trim = 0.0
        first = self.segmenter(backbone)
        self.default_backbone = first.backbone_name
        self.is_test_model = first.is_test_model
        self.weights_error: Optional[str] = None
        self.num_heads = 12
        if preload:
            self.preload()
        # GPU work (ZeroGPU): plain-data arguments in, CPU results out; the caches stay outside.
        self._infer = _gpu(90)(self._infer_impl)
        self._infer_cells = _gpu(180)(self._infer_cells_impl)

    # -- models -------------------------------------------------------------------------------
    def segmenter(self, backbone: Optional[str] = None):
        """One `fsa.Segmenter` per backbone, all sharing this app's model and text caches."""
        name = backbone or getattr(self, "default_backbone", None)
        with self._lock:
            key = name or ""
            if key not in self._segmenters:
                self._segmenters[key] = fsa.Segmenter(name, device=self.device, cache=self.cache,
                                                      text_cache=self.text_cache)
            return self._segmenters[key]

    def preload(self) -> None:
        """Load the default CLIP now, so that the page can say at once when its weights are missing."""
        try:
            clip = self.segmenter().load()
        except fsa.WeightsUnavailableError as exc:
            self.weights_error = str(exc)
            log.warning("weights unavailable: %s", exc)
            return
        try:
            self.num_heads = int(clip.model.visual.transformer.resblocks[-1].attn.num_heads)
        except AttributeError:
            pass
        if os.environ.get("SPACE_ID"):  # on Hugging Face Spaces: ProxyCLIP's DINO too, before any GPU worker forks
            segmenter = self.segmenter()
            try:
                self.cache.get_proxy(segmenter.proxy_name, device=segmenter.device)
            except fsa.WeightsUnavailableError as exc:
                log.warning("ProxyCLIP's proxy model is unavailable: %s", exc)

    def backbone_choices(self) -> list[str]:
        names = list(BACKBONES)
        if self.default_backbone not in names:
            names.insert(0, self.default_backbone)
        return names

    def status_markdown(self) -> str:
        if self.weights_error:
            return (f"⚠️ **The {self.default_backbone} weights are not available, so nothing can be segmented "
                    f"yet.** {self.weights_error}")
        if self.is_test_model:
            return (f"⚠️ **Test model with random weights** (`FSA_MODEL={TINY_TEST}`): the masks are meaningless. "
                    f"Start without FSA_MODEL (ViT-B/16 weights) for real results.")
        return f"Model: **{self.default_backbone}** on {self.segmenter().device}."

    # -- settings -----------------------------------------------------------------------------
    def settings(self, method: str, fsa_on: bool, isolation: bool, pruning: bool, ensemble: bool, lam: float,
                 p: float, short_side=None, crop=None, stride=None, logit_scale=None, bg_threshold=0.0,
                 keep_diagnostics: bool = True, similarity: str = PAPER_SIMILARITY,
                 iterations: int = PAPER_ITERATIONS, blocks: Optional[tuple[int, ...]] = None
                 ) -> "fsa.SegmentSettings":
        # Numbers go to the settings as they came (NaN, inf, None too): their checks name the field.
        # similarity, iterations, blocks: "Explore beyond the paper" (defaults = the paper).
        feedback = fsa.FeedbackConfig(lam=lam, p=p, isolation=bool(isolation),
                                      pruning=bool(pruning), ensemble=bool(ensemble), similarity=similarity,
                                      iterations=iterations, blocks=blocks) if fsa_on else None
        return fsa.SegmentSettings(
            method=method or "clearclip", feedback=feedback,
            short_side=short_side if short_side else self.default_short_side,
            crop=crop,
            stride=None if stride is None or stride == 0 else stride,
            logit_scale=None if not logit_scale else logit_scale,
            prob_threshold=bg_threshold or 0.0,
            keep_diagnostics=keep_diagnostics,
        )

    # -- GPU work -----------------------------------------------------------------------------
    def _infer_impl(self, backbone: Optional[str], image, vocabulary: str, settings, progress=None):
        """One forward pass → (baseline result, baseline + FSA result or None)."""
        segmenter = self.segmenter(backbone)
        report = _progress_callback(progress, watch=ClientWatch())
        if settings.feedback is None:
            return segmenter.segment(image, vocabulary, settings, progress=report), None
        out = segmenter.compare(image, vocabulary, settings, progress=report)
        return out.baseline, out.fsa

    def _infer_cells_impl(self, backbone: Optional[str], image, vocabulary: str, settings_list, progress=None):
        """Every settings' pass drawn into its two compare-grid cells as soon as it exists, then dropped,
        so that one pair of results is alive at a time.

        → (class names or None, [(method, [baseline cell, FSA cell] or None, seconds, error or None)])
        """
        segmenter = self.segmenter(backbone)
        watch = ClientWatch()
        names, colors, rows = None, None, []
        for i, settings in enumerate(settings_list):
            report = _progress_callback(progress, i / len(settings_list), 1.0 / len(settings_list), watch)
            report(0.0, f"{METHOD_LABELS[settings.method]} ({i + 1} of {len(settings_list)})")
            try:
                out = segmenter.compare(image, vocabulary, settings, progress=report)
            except fsa.WeightsUnavailableError as exc:  # e.g. ProxyCLIP without DINO weights
                rows.append((settings.method, None, 0.0, str(exc)))
                continue
            if names is None:
                names = tuple(out.fsa.class_names)
                colors = viz.class_colors(names)
            cells = [compare_cell(result, colors) for result in (out.baseline, out.fsa)]
            rows.append((settings.method, cells, out.baseline.timings.get("total", 0.0), None))
            del out
        return names, rows

    # -- budgets and forward passes -----------------------------------------------------------
    @staticmethod
    def _check_inputs(image, vocabulary: Optional[str]) -> None:
        if image is None:
            raise gr.Error("Upload an image first (or pick one of the examples).", title="No image")
        if not vocabulary or not vocabulary.strip(" \n\t,;"):
            raise gr.Error("Type at least one class name, e.g. “cat; kitten, sofa, background”.",
                           title="Empty vocabulary")

    def _prepare(self, image, vocabulary: str, backbone: Optional[str], settings_list: list):
        """Decode the image to the working size and check the request against the memory budgets, before
        any model work. → (fsa.images.BoundedImage, the settings with a window batch that fits)."""
        self._check_inputs(image, vocabulary)
        queries = len(parse_vocabulary(vocabulary, max_names=1 << 30).queries)  # counted here, limited below
        short_side = max(settings.resolved_short_side() for settings in settings_list)
        name = Path(image).name if isinstance(image, (str, Path)) else None
        decoded = read_bounded(image, short_side, max_pixels=self.limits.max_pixels, name=name)
        segmenter = self.segmenter(backbone)
        clip = segmenter.load()
        h, w = decoded.rgb.shape[:2]
        working = working_size(h, w, short_side, min_side=clip.patch_size)
        message = class_budget_message(queries, working, self.limits.max_classes)
        if message is not None:
            raise gr.Error(message, title="Over this server's budget")
        try:
            heads = int(clip.model.visual.transformer.resblocks[-1].attn.num_heads)
        except AttributeError:
            heads = 16
        fitted = []
        for settings in settings_list:
            crop = settings.resolved_crop()
            win_h, win_w = working if crop <= 0 else (min(crop, working[0]), min(crop, working[1]))
            tokens, win_heads = (win_h // clip.patch_size) * (win_w // clip.patch_size), heads
            if settings.method == "proxyclip":
                patch, proxy_heads = PROXY_GEOMETRY.get(segmenter.proxy_name, (8, 12))
                tokens, win_heads = max(tokens, (win_h // patch) * (win_w // patch)), max(heads, proxy_heads)
            batch = window_batch_for(tokens, win_heads, settings.window_batch)
            if batch < 1:
                raise gr.Error(
                    f"A {win_w}×{win_h}-pixel window ({tokens} patches) needs more attention memory than this "
                    f"server allows. Lower the window crop (the method's default is "
                    f"{METHOD_DEFAULTS[settings.method].crop}) or the short side in Advanced settings.",
                    title="Over this server's budget")
            fitted.append(settings if batch == settings.window_batch else replace(settings, window_batch=batch))
        return decoded, fitted

    @contextlib.contextmanager
    def _model_slot(self, progress):
        """One of the FSA_CONCURRENCY forward-pass slots; says so while waiting, gives up if the client goes."""
        if not self._model_slots.acquire(blocking=False):
            if progress is not None:
                progress(0.0, desc="waiting for a free model slot")
            watch = ClientWatch()
            while not self._model_slots.acquire(timeout=0.5):
                watch.check()
        try:
            yield
        finally:
            self._model_slots.release()
            if len(self.text_cache) > TEXT_CACHE_MAX_NAMES:
                self.text_cache.clear()

    def release_memory(self, min_interval: float = 2.0) -> None:
        """`release_freed_memory`, at most once per `min_interval` seconds, off the calling thread."""
        with self._trim_lock:
            now = time.monotonic()
            if now - self._last_trim < min_interval:
                return
            self._last_trim = now
        threading.Thread(target=release_freed_memory, name="malloc-trim", daemon=True).start()

    def _default_pass(self, record, image, vocabulary, method, progress) -> RunRecord:
        """The session's `record` when it was made for this image, vocabulary and method with FSA's default
        settings on the default backbone (no decoding, no model); else a new pass with those settings."""
        settings = self.settings(method, True, True, True, True, default_lambda(self.default_backbone), 0.45)
        if record is not None and record.key == run_key(image, vocabulary, self.default_backbone, settings):
            return record
        return self._run(image, vocabulary, None, settings, progress)[0]

    def _run(self, image, vocabulary, backbone, settings, progress) -> tuple[RunRecord, tuple, str]:
        """One forward pass for a session → (its RunRecord, the two mask images, the summary line)."""
        backbone = backbone or self.default_backbone
        decoded, (fitted,) = self._prepare(image, vocabulary, backbone, [settings])
        key = run_key(image, vocabulary, backbone, settings)
        with self._model_slot(progress):
            baseline, fsa_result = self._infer(backbone, decoded.rgb, vocabulary, fitted, progress)
        masks = self.mask_images(baseline, fsa_result)
        summary = self.run_summary(fsa_result or baseline, settings)
        record = RunRecord(key=key, image=baseline.image, class_names=tuple(baseline.class_names),
                           diagnostics=None if fsa_result is None else fsa_result.diagnostics,
                           input_size=decoded.source_size, method=baseline.method,
                           labels=_compact_labels(baseline.labels),
                           fsa_labels=None if fsa_result is None else _compact_labels(fsa_result.labels))
        del baseline, fsa_result
        self.release_memory()
        return record, masks, summary

    # -- drawing ------------------------------------------------------------------------------
    @staticmethod
    def mask_images(baseline, fsa_result) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """The baseline and FSA masks over the image, each with a legend of the classes present."""
        names = baseline.class_names
        colors = viz.class_colors(names)

        def panel(result):
            if result is None:
                return None
            body = viz.segmentation_panel(result.image, result.labels, names, colors=colors)
            font = max(14, round(body.shape[1] / 30))
            return viz.with_legend(body, names, colors, present=np.unique(result.labels), font_size=font)

        return panel(baseline), panel(fsa_result)

    @staticmethod
    def run_summary(res, settings) -> str:
        """One line about a pass (`res`: the FSA result when FSA ran, else the baseline's)."""
        label = METHOD_LABELS[res.method] + (" + FSA" if res.fsa_enabled else " (FSA off)")
        crop = settings.resolved_crop()
        if len(res.windows) == 1:
            layout = "one window over the whole image"
        else:
            layout = f"{len(res.windows)} windows ({crop} px crop, stride {settings.resolved_stride()})"
        timings = ", ".join(f"{k} {v:.2f} s" for k, v in res.timings.items())
        gh, gw = res.grid
        line = (f"**{label}** on {res.backbone} · patch grid **{gh}×{gw}** per window, {layout} (image resized "
                f"to {res.working_size[1]}×{res.working_size[0]}) · timings: {timings}")
        notes = list(res.notes)
        if res.is_test_model:
            notes.append("random test weights: the masks are meaningless")
        beyond = beyond_paper_switches(settings.feedback if res.fsa_enabled else None)
        if beyond:
            line += (f"\n\n**Not the paper's method, beyond the paper: {', '.join(beyond)}** (the paper: similarity "
                     f"kl, 1 iteration, the last block).")
        return line + "".join(f"\n\nNote: {n}" for n in notes)

    def attention_outputs(self, record: Optional[RunRecord], head: Optional[str]):
        """(A₀ row, A_new, A_ens, Ŝ with kept set, Π chart, description, head selector update)."""
        if record is None or record.point is None:
            raise gr.Error(NO_RUN_MESSAGE, title="Nothing to inspect yet")
        if record.diagnostics is None:
            raise gr.Error("The attention maps come from the FSA pass: switch FSA on and press “Segment” again.",
                           title="FSA is off")
        x, y = record.point
        exp = record.explain(x, y)
        h = parse_head(head)
        if h is not None and h >= exp.num_heads:
            h = None
        image, win, patch = record.image, exp.window, exp.patch
        original = viz.heatmap_overlay(image, win, exp.head_view(exp.attn_original, h), patch)
        new = viz.heatmap_overlay(image, win, exp.attn_new, patch)
        adapted = viz.heatmap_overlay(image, win, exp.head_view(exp.attn_ensemble, h), patch)
        similarity = viz.heatmap_overlay(image, win, exp.similarity, patch, kept=exp.kept)
        chart = viz.class_bar_chart(exp.class_names, exp.class_probs, viz.class_colors(exp.class_names),
                                    max_bars=CHART_MAX_BARS)
        best = exp.class_names[int(np.argmax(exp.class_probs))]
        head_text = "mean over heads" if h is None else f"head {h + 1} of {exp.num_heads}"
        ih, iw = image.shape[:2]
        x0, x1, y0, y1 = max(0, win.x0), min(iw, win.x1), max(0, win.y0), min(ih, win.y1)
        padded = ("; its grid also covers the zero padding past the border"
                  if (x0, x1, y0, y1) != (win.x0, win.x1, win.y0, win.y1) else "")
        text = (f"Query patch row {patch[0]}, column {patch[1]} of a {exp.grid[0]}×{exp.grid[1]} grid, in the window "
                f"x {x0}–{x1}, y {y0}–{y1}{padded} (point x={x:.0f}, y={y:.0f}); {head_text}; "
                f"{int(exp.kept.sum())} of {exp.kept.size} patches kept by pruning; most likely class under Π: "
                f"**{best}**. Each map is scaled to its own range; the cyan square is the query patch.")
        choices = head_choices(exp.num_heads)
        head_update = gr.update(choices=choices, value=choices[0] if h is None else choices[h + 1])
        return original, new, adapted, similarity, chart, text, head_update

    # -- callbacks ----------------------------------------------------------------------------
    def run(self, record, image, vocabulary, method, backbone, fsa_on, isolation, pruning, ensemble, lam, p,
            short_side, crop, stride, logit_scale, bg_threshold, similarity=PAPER_SIMILARITY,
            iterations=PAPER_ITERATIONS, blocks="", progress=gr.Progress()):
        """Segment button: both masks, the summary line; resets the clicked-patch view.

        similarity, iterations, blocks: the "Explore beyond the paper" fields (defaults = the paper).
        """
        settings = self.settings(method, fsa_on, isolation, pruning, ensemble, lam, p, short_side, crop, stride,
                                 logit_scale, bg_threshold,
                                 **self.feedback_switches(backbone, fsa_on, similarity, iterations, blocks))
        record, (baseline_img, fsa_img), summary = self._run(image, vocabulary, backbone, settings, progress)
        cleared = (None,) * 5 + ("Click a point on the image or on a mask to inspect its patch.",)
        return (baseline_img, fsa_img, summary, record) + cleared

    def api_segment(self, record, image, vocabulary, method, fsa_on, isolation, pruning, ensemble, lam, p,
                    similarity=PAPER_SIMILARITY, iterations=PAPER_ITERATIONS, blocks="", progress=gr.Progress()):
        """/segment: (image, vocabulary, method, FSA settings[, similarity, iterations, blocks]) → baseline mask,
        FSA mask, summary. The last three are beyond the paper; their defaults are the paper's."""
        settings = self.settings(method, fsa_on, isolation, pruning, ensemble, lam, p,
                                 **self.feedback_switches(None, fsa_on, similarity, iterations, blocks))
        record, (baseline_img, fsa_img), summary = self._run(image, vocabulary, None, settings, progress)
        return baseline_img, fsa_img, summary, record

    def api_attention(self, record, image, vocabulary, method, x, y, head, progress=gr.Progress()):
        """/attention: (image, vocabulary, method, x, y[, head]) → the four maps, the Π chart, a description.

        x, y are pixels of the given image. Reuses this session's forward pass when it was made for
        the same image, vocabulary and method with the default settings (no decoding, no model: it
        answers beside running passes); runs one otherwise, in a model slot.
        """
        self._check_inputs(image, vocabulary)
        if x is None or y is None:
            raise gr.Error("Give the x and y pixel coordinates of the query point.")
        record = self._default_pass(record, image, vocabulary, method, progress)
        record = self._with_point(record, float(x), float(y), from_input=True)
        return self.attention_outputs(record, head)[:6] + (record,)

    def _with_point(self, record: RunRecord, x: float, y: float, from_input: bool) -> RunRecord:
        h, w = record.image.shape[:2]
        if from_input:  # pixels of the user's image → pixels of the result's image
            in_w, in_h = record.input_size
            x, y = x * w / in_w, y * h / in_h
        if not (0 <= x < w and 0 <= y < h):
            raise gr.Error(f"The point ({x:.0f}, {y:.0f}) is outside the {w}×{h} image; click on the picture.")
        return replace(record, point=(x, y))

    def click(self, record, head, evt: gr.SelectData, from_input: bool = False):
        """A click on the input image or on a mask: reuse the session's forward pass."""
        if record is None:
            raise gr.Error(NO_RUN_MESSAGE, title="Nothing to inspect yet")
        if evt is None or evt.index is None or len(evt.index) < 2:
            raise gr.Error("Click on a point of the picture.")
        x, y = float(evt.index[0]), float(evt.index[1])
        if not from_input and y >= record.image.shape[0]:
            raise gr.Error("That is the legend: click on the picture above it.", title="Not on the image")
        record = self._with_point(record, x, y, from_input)
        return self.attention_outputs(record, head) + (record,)

    def click_input(self, record, head, evt: gr.SelectData):
        return self.click(record, head, evt, from_input=True)

    def click_mask(self, record, head, evt: gr.SelectData):
        return self.click(record, head, evt, from_input=False)

    def change_head(self, record, head):
        """Head selector: redraw the maps of the last clicked patch (no network run)."""
        if record is None or record.point is None or record.diagnostics is None:
            return (gr.skip(),) * 7
        return self.attention_outputs(record, head)

    def compare_all(self, image, vocabulary, backbone, fsa_on, isolation, pruning, ensemble, lam, p, short_side,
                    bg_threshold, progress=gr.Progress()):
        """Every baseline with and without FSA (each with its own window and logit-scale defaults).

        Each method's cells are drawn as soon as its pass exists and the pass is dropped: one method's
        results in memory at a time, whatever the number of baselines.
        """
        backbone = backbone or self.default_backbone
        settings_list = [self.settings(m, True, isolation, pruning, ensemble, lam, p, short_side, None, None, None,
                                       bg_threshold, keep_diagnostics=False) for m in METHODS]
        decoded, fitted = self._prepare(image, vocabulary, backbone, settings_list)
        with self._model_slot(progress):
            names, rows = self._infer_cells(backbone, decoded.rgb, vocabulary, fitted, progress)
        self.release_memory()
        if names is None:
            raise gr.Error(rows[0][3], title="Weights missing")
        colors = viz.class_colors(names)
        cells, labels, notes = [], [], []
        for method, pair, seconds, error in rows:
            if error is not None:
                notes.append(f"{METHOD_LABELS[method]} skipped: {error}")
                continue
            labels.append(f"{METHOD_LABELS[method]}  ({seconds:.2f} s)")
            cells.append(pair)
        grid = viz.compare_grid(cells, labels, ["baseline", "baseline + FSA"], cell_width=COMPARE_CELL_WIDTH,
                                footer=viz.legend(names, colors, width=2 * COMPARE_CELL_WIDTH + 3 * 4))
        text = f"{len(cells)} baselines on {backbone}" + (" (random test weights)" if self.is_test_model else "")
        if not fsa_on:
            text += "; the FSA switch is off, but this view always shows both columns"
        return grid, text + "".join(f"\n\n{n}" for n in notes)

    # -- scoring against a reference mask -----------------------------------------------------------
    def score(self, record, reference_file):
        """Score button: the session's last run against an uploaded reference mask → table, error maps."""
        if record is None:
            raise gr.Error(NO_RUN_SCORE_MESSAGE, title="Nothing to score yet")
        if not reference_file:
            raise gr.Error("Upload a reference mask first: a PNG of class indices (vocabulary order, 255 = "
                           "ignore) or of the app's class colours.", title="No reference mask")
        names = record.class_names
        reference = read_reference_mask(str(reference_file), names, viz.class_colors(names))
        reference, note = self._reference_at_image_size(record, reference)
        baseline, fsa_masks = record.masks()
        report = score_against(baseline, fsa_masks, reference)
        label = METHOD_LABELS.get(record.method, record.method)
        results = [(label, baseline, report.baseline)]
        if fsa_masks is not None:
            results.append((f"{label} + FSA", fsa_masks, report.fsa))
        maps = viz.error_maps(record.image, [r.labels for _, r, _ in results], reference,
                              [f"{name}: {100 - s.aacc:.1f}% wrong" for name, _, s in results])
        return report.markdown(label) + (f"\n\n{note}" if note else ""), maps

    @staticmethod
    def _reference_at_image_size(record: RunRecord, reference: np.ndarray) -> tuple[np.ndarray, str]:
        """A reference of the uploaded image's size, brought to the size the app segmented at (large uploads
        are decoded reduced): nearest neighbour, and a note saying so. Any other size is left to
        `score_against`, which refuses it naming both sizes."""
        h, w = record.image.shape[:2]
        rh, rw = reference.shape
        if (rh, rw) == (h, w) or (rw, rh) != tuple(record.input_size):
            return reference, ""
        small = cv2.resize(reference.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        return small.astype(np.int64), (f"Note: the image was segmented at {w}×{h} pixels (large uploads are "
                                        f"reduced), so the {rw}×{rh} reference was reduced to that size with "
                                        f"nearest-neighbour sampling before scoring.")

    def api_score(self, record, image, vocabulary, method, reference, progress=gr.Progress()):
        """/score: (image, vocabulary, method, reference mask file) → IoU table (markdown), error maps.

        Runs the baseline with FSA at its default settings, or reuses this session's forward pass made
        for the same image, vocabulary and method (as /attention does).
        """
        self._check_inputs(image, vocabulary)
        if not reference:
            raise gr.Error("Give a reference mask file (PNG).", title="No reference mask")
        record = self._default_pass(record, image, vocabulary, method, progress)
        return self.score(record, reference) + (record,)

    # -- sessions -----------------------------------------------------------------------------
    def forget(self, record: Optional[RunRecord]) -> None:
        """`gr.State` delete callback (session ended or its TTL passed): give the memory back."""
        if record is not None:
            self.release_memory()

    def method_defaults(self, method: str):
        """Method selector: put that method's short side (unless the app fixes one), window crop, stride and
        logit scale in the fields."""
        d = METHOD_DEFAULTS.get(method or "clearclip", METHOD_DEFAULTS["clearclip"])
        return self.short_side_for(method), d.crop, d.stride, d.logit_scale

    def short_side_for(self, method: Optional[str]) -> int:
        """The short side the page shows for `method`: the app's fixed one, else the method's published one."""
        if self.default_short_side is not None:
            return self.default_short_side
        return METHOD_DEFAULTS.get(method or "clearclip", METHOD_DEFAULTS["clearclip"]).short_side

    @staticmethod
    def backbone_defaults(backbone: str):
        return default_lambda(backbone or "")

    # -- explore beyond the paper -------------------------------------------------------------------
    def tower_depth(self, backbone: Optional[str] = None) -> int:
        """Blocks in the vision tower of `backbone` (loads its CLIP, as a run would)."""
        return len(self.segmenter(backbone).load().model.visual.transformer.resblocks)

    def feedback_switches(self, backbone, fsa_on, similarity, iterations, blocks) -> dict:
        """The "Explore beyond the paper" fields → FeedbackConfig's similarity, iterations, blocks (checked;
        ignored with FSA off). Raises ValueError naming a bad field."""
        if not fsa_on:
            return {}
        return dict(similarity=similarity or PAPER_SIMILARITY, iterations=parse_iterations(iterations),
                    blocks=parse_blocks(blocks, lambda: self.tower_depth(backbone)))

    def feedback_steps_if_shown(self, record, iteration, head, shown: bool):
        """`feedback_steps` while its section is open; otherwise nothing is drawn and the outputs stay."""
        if not shown:
            return gr.skip(), gr.skip(), gr.skip()
        return self.feedback_steps(record, iteration, head)

    def feedback_steps(self, record, iteration, head):
        """"Feedback step by step": the 7 pictures (with their lines as captions) of one feedback pass for the
        clicked patch, the lines as text, and the pass selector. No network run."""
        if record is None or record.point is None or record.diagnostics is None:
            message = NO_STEPS_MESSAGE
            if record is not None and record.diagnostics is None:
                message = "FSA is off: switch it on and press “Segment” to see its feedback step by step."
            return [], message, gr.update(choices=pass_choices(1), value=pass_choices(1)[0])
        exp = record.explain(*record.point)
        count = len(exp.iterations)
        t = parse_pass(iteration, count)
        it = exp.iterations[t - 1]
        h = parse_head(head)
        if h is not None and h >= exp.num_heads:
            h = None
        colors = viz.class_colors(record.class_names)[:len(exp.class_names)]
        query_colors = colors[exp.query_classes] if exp.query_classes else None
        panels = viz.feedback_step_panels(
            record.image, exp.window, exp.patch, query_names=exp.query_names,
            feedback_logits=(it.feedback_logits if it.feedback_logits is not None
                             else np.zeros(len(exp.query_names))),
            isolation_logits=it.isolation_logits, class_names=exp.class_names, class_probs=it.class_probs,
            similarity=it.similarity, kept=it.kept, attn_new=it.attn_new,
            attn_ensemble=exp.head_view(it.attn_ensemble, h), query_colors=query_colors, colors=colors)
        lines = feedback_step_lines(exp, t, h)
        beyond = beyond_paper_switches(exp.feedback)
        header = (f"**Pass {t} of {count}** for the query patch at row {exp.patch[0]}, column {exp.patch[1]}: how "
                  f"its attention moves from the baseline's A₀[i] (under “Clicked patch”) to FSA's A_ens[i] "
                  f"(step 7).")
        if t > 1:
            header += f" This pass feeds back pass {t - 1}'s output instead of the baseline's (beyond the paper)."
        if beyond:
            header += f" Not the paper's method, beyond the paper: {', '.join(beyond)}."
        text = header + "\n\n" + "\n".join(lines)
        choices = pass_choices(count)
        return list(zip(panels, lines)), text, gr.update(choices=choices, value=choices[t - 1])



# --------------------------------------------------------------------------- layout
def build_demo(app: Optional[DemoApp] = None) -> gr.Blocks:
    """The page, wired to `app` (created from the environment when None). Queue included; launch it with
    `launch_options(app.limits)` for the temp-folder sweeper."""
    app = app or DemoApp()
    limits = app.limits
    d0 = METHOD_DEFAULTS["clearclip"]
    wrap = friendly_errors
    # delete_cache: Gradio deletes its temp files (uploads, PNGs sent back) older than temp_ttl, every
    # temp_sweep_every seconds, and all of them when the server stops.
    with gr.Blocks(title="FSA segmentation demo", analytics_enabled=False,
                   delete_cache=(int(limits.temp_sweep_every), max(1, int(limits.temp_ttl)))) as demo:
        # The session's last pass: dropped after session_ttl without a request, or when the page closes
        # (`end_session` below; Gradio alone would keep a closed session's state for an hour).
        record = gr.State(None, time_to_live=limits.session_ttl, delete_callback=app.forget)
        gr.Markdown(f"# {TITLE}\n{INTRO}", elem_id="header")
        gr.Markdown(app.status_markdown(), elem_id="model-status")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                image = _decoded_image_input(gr.Image(label="Image", type="filepath", image_mode=None,
                                                      sources=["upload", "clipboard", "webcam"],
                                                      elem_id="image-input"))
                classes = gr.Textbox(label="Vocabulary", lines=2, elem_id="classes",
                                     placeholder="cat; kitten, sofa, background",
                                     info="Classes separated by commas, synonyms by “;”; add “background” "
                                          "for a catch-all class.")
                with gr.Row():
                    method = gr.Dropdown([(METHOD_LABELS[m], m) for m in METHODS], value="clearclip",
                                         label="Baseline", elem_id="method")
                    backbone = gr.Dropdown(app.backbone_choices(), value=app.default_backbone, label="Backbone",
                                           elem_id="backbone",
                                           info="Other backbones download their weights on first use.")
                fsa_on = gr.Checkbox(True, label="FSA (feedback self-adaptive attention)", elem_id="fsa-toggle")
                with gr.Accordion("FSA parts", open=False, elem_id="fsa-parts"):
                    with gr.Row():
                        isolation = gr.Checkbox(True, label="Attention isolation", elem_id="fsa-isolation")
                        pruning = gr.Checkbox(True, label="Confidence-based pruning", elem_id="fsa-pruning")
                        ensemble = gr.Checkbox(True, label="Adaptation ensemble", elem_id="fsa-ensemble")
                    lam = gr.Slider(0.0, 10.0, value=default_lambda(app.default_backbone), step=0.1,
                                    label="λ (scaling of the similarity)", elem_id="fsa-lambda")
                    p = gr.Slider(0.05, 1.0, value=0.45, step=0.01, label="p (top-p kept by pruning)",
                                  elem_id="fsa-p")
                with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
                    short_side = gr.Number(app.short_side_for("clearclip"), label="Short side (pixels)",
                                           precision=0, minimum=16, maximum=2048, elem_id="short-side")
                    with gr.Row():
                        crop = gr.Number(d0.crop, label="Window crop (px, 0 = whole image)", precision=0,
                                         minimum=0, elem_id="crop")
                        stride = gr.Number(d0.stride, label="Window stride (px)", precision=0, minimum=1,
                                           elem_id="stride")
                    with gr.Row():
                        logit_scale = gr.Number(d0.logit_scale, label="Logit scale τ", minimum=0.1,
                                                elem_id="logit-scale")
                        bg_threshold = gr.Slider(0.0, 0.99, value=0.0, step=0.01, elem_id="bg-threshold",
                                                 label="Background threshold (best probability below → background)")
                with gr.Row():
                    run = gr.Button("Segment", variant="primary", elem_id="run")
                    compare = gr.Button("Compare all baselines", elem_id="compare-all")
                gr.Examples([[str(EXAMPLES_DIR / f), v, m] for f, v, m in EXAMPLES], inputs=[image, classes, method],
                            label="Examples (public domain / CC0, see examples/SOURCES.md)", cache_examples=False,
                            elem_id="examples")
            with gr.Column(scale=3, min_width=480):
                with gr.Row():
                    mask_baseline = gr.Image(label="Baseline", type="numpy", format="png", interactive=False,
                                             elem_id="mask-baseline")
                    mask_fsa = gr.Image(label="Baseline + FSA", type="numpy", format="png", interactive=False,
                                        elem_id="mask-fsa")
                run_info = gr.Markdown("Pick an image and a vocabulary, then press “Segment”.", label="Summary",
                                       elem_id="run-info")
                gr.Markdown("### Clicked patch")
                with gr.Row():
                    head = gr.Dropdown(head_choices(app.num_heads), value=MEAN_HEADS, label="Attention head",
                                       elem_id="head", scale=1)
                    attn_info = gr.Markdown("Click a point on the image or on a mask to inspect its patch.",
                                            label="Patch description", elem_id="attn-info")
                with gr.Row():
                    attn_original = gr.Image(label="Baseline attention row A₀[i]", type="numpy", format=HEATMAP_FORMAT,
                                             interactive=False, elem_id="attn-original")
                    attn_new = gr.Image(label="A_new[i] (from the output similarity)", type="numpy", format=HEATMAP_FORMAT,
                                        interactive=False, elem_id="attn-new")
                with gr.Row():
                    attn_adapted = gr.Image(label="Adapted attention A_ens[i]", type="numpy", format=HEATMAP_FORMAT,
                                            interactive=False, elem_id="attn-adapted")
                    attn_similarity = gr.Image(label="Similarity Ŝ[i] (dimmed: pruned)", type="numpy",
                                               format=HEATMAP_FORMAT, interactive=False, elem_id="attn-similarity")
                class_probs = gr.Image(label="Π_i: class distribution after isolation", type="numpy",
                                       format="png", interactive=False, elem_id="class-probs")
        with gr.Accordion("Compare all baselines", open=True, elem_id="compare-section"):
            compare_grid = gr.Image(label="Every baseline, without and with FSA", type="numpy", format="png",
                                    interactive=False, elem_id="compare-grid")
            compare_info = gr.Markdown("", label="Compare notes", elem_id="compare-info")
        with gr.Accordion("Score against a reference mask", open=False, elem_id="score-section"):
            gr.Markdown("Upload the ground truth of the image you segmented: a PNG of class indices in the order "
                        "of the vocabulary (255 = ignore), or a colour PNG in the app's class colours (black, "
                        "white and transparent = ignore), of the image's exact size. The last run is scored.")
            with gr.Row():
                score_reference = gr.File(label="Reference mask (PNG)", file_types=["image"], type="filepath",
                                          elem_id="score-reference", scale=2)
                score_button = gr.Button("Score", elem_id="score-run", scale=1)
            score_table = gr.Markdown("", label="Per-class IoU", elem_id="score-table")
            score_errors = gr.Image(label="Error maps (red: wrong)", type="numpy", format="png", interactive=False,
                                    elem_id="score-errors")
            api_score = gr.Button("api-score", visible=False)
        with gr.Accordion("Explore beyond the paper", open=False, elem_id="beyond-section") as beyond_section:
            gr.Markdown(BEYOND_INTRO)
            with gr.Row():
                beyond_similarity = gr.Radio(SIMILARITY_CHOICES, value=PAPER_SIMILARITY, elem_id="beyond-similarity",
                                             label="Output similarity Ŝ (other than KL: beyond the paper)")
                beyond_iterations = gr.Slider(1, ITERATIONS_MAX, value=PAPER_ITERATIONS, step=1,
                                              label="Feedback passes (1 = the paper; more: beyond the paper)",
                                              elem_id="beyond-iterations")
                beyond_blocks = gr.Textbox("", label="Adapted blocks (other than the last: beyond the paper)",
                                           placeholder="empty = the last block (the paper); “last two”; "
                                                       "“11, 12”",
                                           elem_id="beyond-blocks")
            gr.Markdown("### Feedback step by step\nFor the clicked patch: each step of one feedback pass, "
                        "in order, with one line saying what it is (the gallery's arrows go from step to step).")
            steps_pass = gr.Radio(pass_choices(1), value=pass_choices(1)[0], label="Feedback pass",
                                  elem_id="steps-pass")
            steps_text = gr.Markdown(NO_STEPS_MESSAGE, elem_id="steps-text")
            steps_gallery = gr.Gallery(label="Feedback step by step", columns=4, preview=True, format="png",
                                       object_fit="contain", elem_id="steps-gallery")
        # Hidden inputs of the /attention endpoint and triggers of the two API endpoints.
        with gr.Row(visible=False):
            query_x = gr.Number(label="x", elem_id="query-x")
            query_y = gr.Number(label="y", elem_id="query-y")
            api_segment = gr.Button("api-segment")
            api_attention = gr.Button("api-attention")

        attention = [attn_original, attn_new, attn_adapted, attn_similarity, class_probs, attn_info]
        # Forward passes queue in one group of FSA_CONCURRENCY; show_progress="full" puts the queue position
        # and the progress bar on the outputs. Clicks on a cached pass cost milliseconds: they have groups
        # of their own and never wait behind forward passes.
        model_job = dict(concurrency_id="model", concurrency_limit=limits.concurrency, show_progress="full")
        run_inputs = [record, image, classes, method, backbone, fsa_on, isolation, pruning, ensemble, lam, p,
                      short_side, crop, stride, logit_scale, bg_threshold]
        beyond = [beyond_similarity, beyond_iterations, beyond_blocks]
        run_inputs += beyond
        run.click(wrap(app.run), run_inputs, [mask_baseline, mask_fsa, run_info, record] + attention,
                  api_visibility="private", show_progress_on=[mask_baseline, mask_fsa], **model_job)
        compare.click(wrap(app.compare_all), [image, classes, backbone, fsa_on, isolation, pruning, ensemble, lam, p,
                                              short_side, bg_threshold], [compare_grid, compare_info],
                      api_name="compare_all", show_progress_on=[compare_grid], **model_job)
        click_outputs = attention + [head, record]
        click_job = dict(api_visibility="private", concurrency_id="click", concurrency_limit=4,
                         show_progress_on=[attn_original, attn_adapted])
        image.select(wrap(app.click_input), [record, head], click_outputs, **click_job)
        for mask in (mask_baseline, mask_fsa):
            mask.select(wrap(app.click_mask), [record, head], click_outputs, **click_job)
        head.input(wrap(app.change_head), [record, head], attention + [head], **click_job)
        method.change(app.method_defaults, method, [short_side, crop, stride, logit_scale],
                      api_visibility="private", queue=False)
        backbone.change(app.backbone_defaults, backbone, lam, api_visibility="private", queue=False)
        api_segment.click(wrap(app.api_segment),
                          [record, image, classes, method, fsa_on, isolation, pruning, ensemble, lam, p] + beyond,
                          [mask_baseline, mask_fsa, run_info, record], api_name="segment", **model_job)
        # /attention answers from the session's cached pass without the model; when it has to run a pass it
        # takes a model slot itself (DemoApp._model_slot), so it stays out of the "model" queue.
        api_attention.click(wrap(app.api_attention), [record, image, classes, method, query_x, query_y, head],
                            attention + [record], api_name="attention", concurrency_id="attention",
                            concurrency_limit=8, show_progress="full")

        score_button.click(wrap(app.score), [record, score_reference], [score_table, score_errors],
                           api_name="score_button", api_visibility="private", concurrency_limit=4)
        # /score, like /attention, answers from the cached pass without the model and takes a model slot
        # itself when it must run one.
        api_score.click(wrap(app.api_score), [record, image, classes, method, score_reference],
                        [score_table, score_errors, record], api_name="score", concurrency_id="score",
                        concurrency_limit=4, show_progress="full")
        # Feedback step by step: redrawn whenever the clicked-patch description changes (a click, the head
        # selector, or a new run that clears it) and when another pass is picked.
        steps_outputs = [steps_gallery, steps_text, steps_pass]
        # Drawn only while the section is open (it costs several times a click): on opening, and then on
        # every change; closed, a click leaves the gallery as it was.
        steps_job = dict(api_visibility="private", concurrency_limit=4)
        steps_inputs = [record, steps_pass, head]
        steps_shown = gr.State(False)
        beyond_section.expand(lambda: True, None, steps_shown, api_visibility="private", queue=False).then(
            wrap(app.feedback_steps), steps_inputs, steps_outputs, **steps_job)
        beyond_section.collapse(lambda: False, None, steps_shown, api_visibility="private", queue=False)
        attn_info.change(wrap(app.feedback_steps_if_shown), steps_inputs + [steps_shown], steps_outputs, **steps_job)
        steps_pass.input(wrap(app.feedback_steps), steps_inputs, steps_outputs, **steps_job)


        async def end_session(request: gr.Request) -> None:
            """The page closed: drop the session's state now, and the ~110 KB of page config Gradio keeps
            per session. Async, so that it runs on the event loop between the state holder's sweeps."""
            holder = getattr(getattr(demo, "server_app", None), "state_holder", None)
            session = request.session_hash
            if holder is None or not session:
                return
            holder.delete_state(session)
            with holder.lock:
                holder.session_data.pop(session, None)
                holder.time_last_used.pop(session, None)

        demo.unload(end_session)
    check_number_inputs(demo)
    demo.queue(max_size=64, default_concurrency_limit=2)
    return demo


def launch_options(limits: RuntimeLimits) -> dict:
    """`demo.launch` arguments besides the address: the temp-folder sweeper, and at most SESSION_CAPACITY
    sessions remembered (Gradio's default, 10000, could hold ~1 GB of per-session page config from
    API clients that never close; the least recently used session goes first)."""
    return {"app_kwargs": {"lifespan": temp_sweeper(limits)}, "state_session_capacity": SESSION_CAPACITY}


def server_options() -> dict:
    """launch() arguments from GRADIO_SERVER_NAME and GRADIO_SERVER_PORT / PORT."""
    port = os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("PORT")
    name = os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if os.environ.get("PORT") else None)
    return {"server_name": name, "server_port": int(port) if port else None}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = DemoApp()
    demo = build_demo(app)
    demo.launch(**server_options(), **launch_options(app.limits))


if __name__ == "__main__":
    main()
