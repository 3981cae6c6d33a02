"""The page's own events around `DemoApp`: what a visitor sees while using the page, as opposed to the
endpoints' raw answers. A refused or failed Segment or click is told in the summary (and a toast) while the
last good masks stay; every pass brings its masks' alt texts and HTML legends; a click moves the markers and
the row / column inputs; the class budget of the uploaded image is told before Segment.

`DemoApp`'s methods (and the four endpoints) keep raising `gr.Error` as clients expect; only the page's
buttons and clicks go through here."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional

import gradio as gr

from ..images import read_bounded, working_size
from ..vocabulary import parse_vocabulary
from .guards import friendly_errors
from .limits import class_budget
from .sessions import RunRecord
from .views import (
    NO_RUN_MESSAGE, attention_views, budget_line, failure_summary, mask_companions, point_marker,
)

log = logging.getLogger("fsa.app")

#: outputs of a click besides the six attention ones: head selector, record, marker, patch row, patch column
CLICK_EXTRA = 5


def _error_parts(exc: gr.Error) -> tuple[str, str]:
    return str(exc.title or "Check the inputs"), str(exc.message)


class PageEvents:
    """The page's Segment, clicks, patch inputs and budget line, wrapped around one `DemoApp`."""

    def __init__(self, app):
        self.app = app

    # -- Segment ------------------------------------------------------------------------------
    def segment_button(self, record, *inputs, progress=gr.Progress()):
        """Segment button: `DemoApp.run`'s outputs, then the masks' alt texts and legends, the cleared marker
        and patch inputs. A refusal or failure keeps every panel and says why in the summary."""
        try:
            out = friendly_errors(self.app.run)(record, *inputs, progress=progress)
        except gr.Error as exc:
            title, message = _error_parts(exc)
            gr.Warning(message, title=title)
            return (gr.skip(), gr.skip(), failure_summary(title, message, record)) + (gr.skip(),) * 12
        base_img, fsa_img, summary, new_record, *cleared = out
        base_alt, fsa_alt, base_legend, fsa_legend = mask_companions(new_record)
        # the page shows the HTML legends beside the masks: the pictures without the legend drawn under them
        # (API clients of /segment keep it)
        h = new_record.image.shape[0]
        base_alt["value"] = base_img[:h]
        fsa_alt["value"] = None if fsa_img is None else fsa_img[:h]
        return (base_alt, fsa_alt, summary, new_record, *cleared, base_legend, fsa_legend, "", None, None)

    # -- clicks and patch inputs ---------------------------------------------------------------
    def _views(self, record: RunRecord, head, common) -> tuple:
        row, col = record.patch_at(*record.point)
        return attention_views(record, head, bool(common), colorbars=True) + (record, point_marker(record), row, col)

    def _inline(self, fn, record, *args) -> tuple:
        """`fn`'s outputs, or its refusal said in the patch description (and a toast), the rest unchanged."""
        try:
            return friendly_errors(fn)(record, *args)
        except gr.Error as exc:
            title, message = _error_parts(exc)
            gr.Warning(message, title=title)
            skip = (gr.skip(),)
            return skip * 5 + (f"⚠️ **{title}.** {message}",) + skip * CLICK_EXTRA

    def _clicked(self, record, head, common, evt, from_input: bool):
        return self._views(self.app.clicked_point(record, evt, from_input), head, common)

    def click_input(self, record, head, common, evt: gr.SelectData):
        """A click on the input image."""
        return self._inline(lambda r, *a: self._clicked(r, *a, from_input=True), record, head, common, evt)

    def click_mask(self, record, head, common, evt: gr.SelectData):
        """A click on either mask."""
        return self._inline(lambda r, *a: self._clicked(r, *a, from_input=False), record, head, common, evt)

    def pick_patch(self, record, head, common, row, col):
        """The row and column inputs (keyboard): that patch of the image's grid, as a click on its centre."""
        def picked(record, head, common, row, col):
            if record is None:
                raise gr.Error(NO_RUN_MESSAGE, title="Nothing to inspect yet")
            if record.diagnostics is None:
                raise gr.Error("The attention maps come from the FSA pass: switch FSA on and press “Segment” "
                               "again.", title="FSA is off")
            if row is None or col is None:
                raise gr.Error("Give a row and a column number (from 1).", title="Which patch?")
            x, y = record.patch_center(int(row), int(col))
            return self._views(replace(record, point=(x, y)), head, common)

        return self._inline(picked, record, head, common, row, col)

    def redraw(self, record, head, common):
        """Head selector or common scale changed: redraw the last clicked patch (nothing when there is none)."""
        if record is None or record.point is None or record.diagnostics is None:
            return (gr.skip(),) * 7
        return attention_views(record, head, bool(common), colorbars=True)

    # -- the class budget before Segment ---------------------------------------------------------
    def image_budget(self, image, method, short_side, vocabulary, known=None):
        """The budget line for the current image and vocabulary, and (image, short side, working size) to keep
        in a state: an image already measured is not decoded again (the vocabulary changes at every key). An
        unreadable upload is said at once (and in a toast)."""
        if image is None:
            return None, self.budget_text(None, vocabulary)
        side = int(short_side) if short_side else self.app.short_side_for(method)
        if known is not None and tuple(known[:2]) == (str(image), side):
            return known, self.budget_text(known[2], vocabulary)
        name = Path(image).name if isinstance(image, (str, Path)) else None
        try:
            decoded = read_bounded(image, side, max_pixels=self.app.limits.max_pixels, name=name)
        except (ValueError, OSError) as exc:
            message = str(exc).replace(str(image), name or "the upload")
            gr.Warning(message, title="Unreadable image")
            return None, f"⚠️ **This upload cannot be used.** {message}"
        width, height = decoded.source_size
        hw = working_size(height, width, side)
        return (str(image), side, hw), self.budget_text(hw, vocabulary)

    def budget_text(self, working_hw, vocabulary) -> str:
        """The budget line for a working size (None: no image yet) and the vocabulary typed so far."""
        max_classes = self.app.limits.max_classes
        allowed = max_classes if working_hw is None else class_budget(tuple(working_hw), max_classes)
        queries: Optional[int] = None
        if vocabulary and vocabulary.strip(" \n\t,;"):
            try:
                queries = len(parse_vocabulary(vocabulary, max_names=1 << 30).queries)
            except ValueError:
                queries = None
        return budget_line(allowed, queries, None if working_hw is None else tuple(working_hw))
