"""Server upkeep of the demo: the ZeroGPU hook, handing freed memory back, sweeping Gradio's temp folder,
and the options `launch()` gets (address, lifespan, session capacity)."""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import time
from pathlib import Path
from typing import Callable

import gradio as gr

from .limits import RuntimeLimits

# ZeroGPU (Hugging Face Spaces) wants `spaces` imported before torch initialises CUDA: app.py does that
# first; here it is only looked up again. Locally the package is optional and `gpu` is a no-op.
try:
    import spaces  # type: ignore[import-not-found]
except ImportError:
    spaces = None


#: Sessions Gradio remembers at most (~110 KB of page config each, besides their state).
SESSION_CAPACITY = 1000


def gpu(duration: int) -> Callable[[Callable], Callable]:
    """`spaces.GPU(duration=...)` on Hugging Face ZeroGPU, the identity elsewhere."""
    if getattr(spaces, "GPU", None) is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps them otherwise, and the process's RSS would stay
    at its high-water mark after sessions end (their arrays are freed, the pages are not returned)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


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
