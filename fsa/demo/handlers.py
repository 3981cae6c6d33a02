"""The demo's callbacks: `DemoApp` holds the model caches shared by every session (thread-safe) and has
one method per event or endpoint of the page. It keeps no per-user data: every callback takes and returns
the session's `RunRecord`. Budgets, sessions, forms, guards and pictures live in their own modules."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import replace
from typing import Any, Optional

import gradio as gr

import fsa
from .. import visualize as viz
from ..config import (
    BACKBONES, METHOD_DEFAULTS, METHODS, PROXIES, PROXY_LABELS, TINY_TEST, default_lambda,
)
from ..planning import clip_geometry, plan_request
from ..proxies import resolve_proxy_name
from ..scoring import score_reference
from ..text import TextFeatureCache
from .forms import PAPER_ITERATIONS, PAPER_SIMILARITY, parse_blocks, parse_iterations
from .guards import ClientWatch, progress_callback
from .limits import TEXT_CACHE_MAX_NAMES, TEXT_NAMES_PER_BATCH, OverBudget, RuntimeLimits, fit_to_budget
from .server import gpu, release_freed_memory
from .sessions import RunRecord, compact_labels, run_key
from .views import (
    NO_RUN_MESSAGE, NO_RUN_SCORE_MESSAGE, attention_views, compare_cell, compare_view, feedback_steps_view,
    mask_images, run_summary, score_view,
)

log = logging.getLogger("fsa.app")

#: None: each method's published short side (fsa.METHOD_DEFAULTS: 336 for SCLIP, NACLIP, ProxyCLIP, else 448)
SHORT_SIDE_DEFAULT: Optional[int] = None
#: ProxyCLIP's proxy when none is chosen (the published default, and what /segment callers without it get)
DEFAULT_PROXY = "dino-b8"


def proxy_choices() -> list[tuple[str, str]]:
    """(label, name) of every ProxyCLIP proxy, for the page's selector."""
    return [(PROXY_LABELS[name], name) for name in PROXIES]


def chosen_proxy(method: Optional[str], proxy: Optional[str]) -> str:
    """The proxy a request runs: the chosen one for ProxyCLIP (checked), DEFAULT_PROXY for the other methods
    (which run none), so that their passes and records do not depend on the hidden selector."""
    if (method or "clearclip") != "proxyclip":
        return DEFAULT_PROXY
    try:
        return resolve_proxy_name(proxy or DEFAULT_PROXY)
    except ValueError as exc:
        raise gr.Error(f"{exc}; pick one of {', '.join(PROXIES)}", title="Unknown proxy") from None


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
        self._infer = gpu(90)(self._infer_impl)
        self._infer_cells = gpu(180)(self._infer_cells_impl)

    # -- models -------------------------------------------------------------------------------
    def segmenter(self, backbone: Optional[str] = None, proxy: Optional[str] = None):
        """One `fsa.Segmenter` per backbone and ProxyCLIP proxy, all sharing this app's model and text caches."""
        name = backbone or getattr(self, "default_backbone", None)
        proxy = proxy or DEFAULT_PROXY
        with self._lock:
            key = (name or "", proxy)
            if key not in self._segmenters:
                self._segmenters[key] = fsa.Segmenter(name, device=self.device, cache=self.cache,
                                                      text_cache=self.text_cache, proxy=proxy)
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
            self.num_heads = clip_geometry(clip).heads
        except AttributeError:  # not an open_clip vision tower: the page offers 12 heads
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
    def _infer_impl(self, backbone: Optional[str], image, vocabulary, settings, progress=None, proxy=None):
        """One forward pass → (baseline result, baseline + FSA result or None)."""
        segmenter = self.segmenter(backbone, proxy)
        report = progress_callback(progress, watch=ClientWatch())
        if settings.feedback is None:
            return segmenter.segment(image, vocabulary, settings, progress=report), None
        out = segmenter.compare(image, vocabulary, settings, progress=report)
        return out.baseline, out.fsa

    def _infer_cells_impl(self, backbone: Optional[str], image, vocabulary, settings_list, progress=None,
                          proxy=None):
        """Every settings' pass drawn into its two compare-grid cells as soon as it exists, then dropped.
        The methods that see the same windows share the vision trunk (`Segmenter.iter_compare_methods`:
        each result equal, bit for bit, to that method run alone).

        → (class names or None, [(method, [baseline cell, FSA cell] or None, seconds, error or None)] in the
        order of `settings_list`)
        """
        segmenter = self.segmenter(backbone, proxy)
        report = progress_callback(progress, 0.0, 1.0, ClientWatch())
        names, colors, rows = None, None, {}
        for outcome in segmenter.iter_compare_methods(image, vocabulary, settings_list, progress=report):
            method = outcome.settings.method
            if outcome.error is not None:  # e.g. ProxyCLIP without its proxy's weights: the others go on
                rows[outcome.index] = (method, None, 0.0, str(outcome.error))
                continue
            out = outcome.result
            if names is None:
                names = tuple(out.fsa.class_names)
                colors = viz.class_colors(names)
            cells = [compare_cell(result, colors) for result in (out.baseline, out.fsa)]
            rows[outcome.index] = (method, cells, out.baseline.timings.get("total", 0.0), None)
            del out, outcome
        return names, [rows[i] for i in sorted(rows)]

    # -- budgets and forward passes -----------------------------------------------------------
    @staticmethod
    def _check_inputs(image, vocabulary: Optional[str]) -> None:
        if image is None:
            raise gr.Error("Upload an image first (or pick one of the examples).", title="No image")
        if not vocabulary or not vocabulary.strip(" \n\t,;"):
            raise gr.Error("Type at least one class name, e.g. “cat; kitten, sofa, background”.",
                           title="Empty vocabulary")

    def _prepare(self, image, vocabulary: str, backbone: Optional[str], settings_list: list, proxy=None):
        """Plan the request (the image decoded and the vocabulary parsed once) and check it against the memory
        budgets, before any model work. → (fsa.planning.RequestPlan, the settings with a window batch that
        fits)."""
        self._check_inputs(image, vocabulary)
        plan = plan_request(self.segmenter(backbone, proxy), image, vocabulary, settings_list,
                            max_pixels=self.limits.max_pixels)
        try:
            return plan, fit_to_budget(plan, self.limits, settings_list)
        except OverBudget as exc:
            raise gr.Error(str(exc), title="Over this server's budget") from None

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
        if record is not None and record.key == run_key(image, vocabulary, self.default_backbone, settings,
                                                       chosen_proxy(method, None)):
            return record
        return self._run(image, vocabulary, None, settings, progress)[0]

    def _run(self, image, vocabulary, backbone, settings, progress, proxy=None) -> tuple[RunRecord, tuple, str]:
        """One forward pass for a session → (its RunRecord, the two mask images, the summary line)."""
        backbone = backbone or self.default_backbone
        proxy = chosen_proxy(settings.method, proxy)
        plan, (fitted,) = self._prepare(image, vocabulary, backbone, [settings], proxy)
        key = run_key(image, vocabulary, backbone, settings, proxy)
        with self._model_slot(progress):
            baseline, fsa_result = self._infer(backbone, plan.image.rgb, plan.vocabulary, fitted, progress, proxy)
        masks = mask_images(baseline, fsa_result)
        (window,) = plan.windows
        summary = run_summary(fsa_result or baseline, settings, proxy_label=window.proxy_label)
        record = RunRecord(key=key, image=baseline.image, class_names=tuple(baseline.class_names),
                           diagnostics=None if fsa_result is None else fsa_result.diagnostics,
                           input_size=plan.image.source_size, method=baseline.method,
                           labels=compact_labels(baseline.labels),
                           fsa_labels=None if fsa_result is None else compact_labels(fsa_result.labels))
        del baseline, fsa_result
        self.release_memory()
        return record, masks, summary

    # -- callbacks ----------------------------------------------------------------------------
    def run(self, record, image, vocabulary, method, backbone, fsa_on, isolation, pruning, ensemble, lam, p,
            short_side, crop, stride, logit_scale, bg_threshold, similarity=PAPER_SIMILARITY,
            iterations=PAPER_ITERATIONS, blocks="", proxy=DEFAULT_PROXY, progress=gr.Progress()):
        """Segment button: both masks, the summary line; resets the clicked-patch view.

        similarity, iterations, blocks: the "Explore beyond the paper" fields (defaults = the paper); proxy:
        ProxyCLIP's proxy (`fsa.config.PROXIES`; ignored by the other methods).
        """
        settings = self.settings(method, fsa_on, isolation, pruning, ensemble, lam, p, short_side, crop, stride,
                                 logit_scale, bg_threshold,
                                 **self.feedback_switches(backbone, fsa_on, similarity, iterations, blocks))
        record, (baseline_img, fsa_img), summary = self._run(image, vocabulary, backbone, settings, progress, proxy)
        cleared = (None,) * 5 + ("Click a point on the image or on a mask to inspect its patch.",)
        return (baseline_img, fsa_img, summary, record) + cleared

    def api_segment(self, record, image, vocabulary, method, fsa_on, isolation, pruning, ensemble, lam, p,
                    similarity=PAPER_SIMILARITY, iterations=PAPER_ITERATIONS, blocks="", proxy=DEFAULT_PROXY,
                    progress=gr.Progress()):
        """/segment: (image, vocabulary, method, FSA settings[, similarity, iterations, blocks, proxy]) → baseline
        mask, FSA mask, summary. similarity, iterations and blocks are beyond the paper (their defaults are the
        paper's); proxy is ProxyCLIP's (default DINO ViT-B/8; ignored by the other methods)."""
        settings = self.settings(method, fsa_on, isolation, pruning, ensemble, lam, p,
                                 **self.feedback_switches(None, fsa_on, similarity, iterations, blocks))
        record, (baseline_img, fsa_img), summary = self._run(image, vocabulary, None, settings, progress, proxy)
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
        return attention_views(record, head)[:6] + (record,)

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
        record = self.clicked_point(record, evt, from_input)
        return attention_views(record, head) + (record,)

    def clicked_point(self, record, evt: gr.SelectData, from_input: bool = False) -> RunRecord:
        """The session's record with the clicked point (pixels of its image); `gr.Error` before any run, off
        the picture or on a mask's legend."""
        if record is None:
            raise gr.Error(NO_RUN_MESSAGE, title="Nothing to inspect yet")
        if evt is None or evt.index is None or len(evt.index) < 2:
            raise gr.Error("Click on a point of the picture.")
        x, y = float(evt.index[0]), float(evt.index[1])
        if not from_input and y >= record.image.shape[0]:
            raise gr.Error("That is the legend: click on the picture above it.", title="Not on the image")
        return self._with_point(record, x, y, from_input)

    def click_input(self, record, head, evt: gr.SelectData):
        return self.click(record, head, evt, from_input=True)

    def click_mask(self, record, head, evt: gr.SelectData):
        return self.click(record, head, evt, from_input=False)

    def change_head(self, record, head):
        """Head selector: redraw the maps of the last clicked patch (no network run)."""
        if record is None or record.point is None or record.diagnostics is None:
            return (gr.skip(),) * 7
        return attention_views(record, head)

    def compare_all(self, image, vocabulary, backbone, fsa_on, isolation, pruning, ensemble, lam, p, short_side,
                    bg_threshold, proxy=DEFAULT_PROXY, progress=gr.Progress()):
        """Every baseline with and without FSA (each with its own window and logit-scale defaults); ProxyCLIP's
        column runs `proxy` (the page's selector, DINO ViT-B/8 unless another is chosen).

        Each method's cells are drawn as soon as its pass exists and the pass is dropped: one method's
        results in memory at a time, whatever the number of baselines.
        """
        backbone = backbone or self.default_backbone
        settings_list = [self.settings(m, True, isolation, pruning, ensemble, lam, p, short_side, None, None, None,
                                       bg_threshold, keep_diagnostics=False) for m in METHODS]
        proxy = chosen_proxy("proxyclip", proxy)
        plan, fitted = self._prepare(image, vocabulary, backbone, settings_list, proxy)
        with self._model_slot(progress):
            names, rows = self._infer_cells(backbone, plan.image.rgb, plan.vocabulary, fitted, progress, proxy)
        self.release_memory()
        if names is None:
            raise gr.Error(rows[0][3], title="Weights missing")
        grid, text = compare_view(names, rows, backbone, self.is_test_model, fsa_on, settings_list[0].feedback)
        label = next((w.proxy_label for w in plan.windows if w.proxy_label), None)
        return grid, text + (f"\n\nProxyCLIP ran with the {label} proxy." if label else "")

    # -- scoring against a reference mask -----------------------------------------------------------
    def score(self, record, reference_file):
        """Score button: the session's last run against an uploaded reference mask → table, error maps."""
        if record is None:
            raise gr.Error(NO_RUN_SCORE_MESSAGE, title="Nothing to score yet")
        if not reference_file:
            raise gr.Error("Upload a reference mask first: a PNG of class indices (vocabulary order, 255 = "
                           "ignore) or of the app's class colours.", title="No reference mask")
        baseline, fsa_masks = record.masks()
        report, reference, note = score_reference(str(reference_file), baseline, fsa_masks,
                                                  source_size=record.input_size)
        return score_view(record, report, reference, note)

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
    def backbone_defaults(backbone: str, method: Optional[str] = None, proxy: Optional[str] = None):
        """λ the paper uses for the backbone, and for ProxyCLIP's proxy when ProxyCLIP is the method (4.5 with
        MAE)."""
        return default_lambda(backbone or "", proxy if method == "proxyclip" else None)

    def proxy_visibility(self, method: str, backbone: str, proxy: Optional[str]):
        """Method selector: the proxy selector shown for ProxyCLIP only; λ reset to the paper's when the chosen
        proxy has its own (MAE), else left as the user set it."""
        shown = gr.update(visible=method == "proxyclip")
        if default_lambda(backbone or "", proxy) == default_lambda(backbone or ""):
            return shown, gr.skip()
        return shown, self.backbone_defaults(backbone, method, proxy)

    # -- explore beyond the paper -------------------------------------------------------------------
    def tower_depth(self, backbone: Optional[str] = None) -> int:
        """Blocks in the vision tower of `backbone` (loads its CLIP, as a run would)."""
        return clip_geometry(self.segmenter(backbone).load()).depth

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
        """"Feedback step by step" for the clicked patch (`views.feedback_steps_view`). No network run."""
        return feedback_steps_view(record, iteration, head)
