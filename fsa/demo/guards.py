"""What stands between a request and the handlers: every exception turned into a message a person
understands, number fields checked before Gradio's own preprocessing, uploads handed over undecoded,
and a job stopped when its client has gone."""
from __future__ import annotations

import base64
import binascii
import functools
import io
import logging
from typing import Callable, Optional

import gradio as gr

import fsa
from ..checks import NumericalError, check_number

log = logging.getLogger("fsa.app")


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


def progress_callback(progress, start: float = 0.0, span: float = 1.0, watch: Optional[ClientWatch] = None):
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


def decoded_image_input(component: gr.Image) -> gr.Image:
    """Make `component` hand its handlers the uploaded file (a path, or the bytes of a base64 payload)
    instead of a decoded image.

    Gradio's own preprocessing opens the file with PIL first, and a text file named .png, an empty
    or a damaged file then fails inside Gradio with an opaque "the upstream app raised an exception";
    decoding it in the handler (`fsa.planning.plan_request`, with `fsa.images.read_bounded`) names the
    problem, and decodes large images straight to the working size. Set on the instance: a `gr.Image` subclass would make
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
