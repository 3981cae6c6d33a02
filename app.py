"""Gradio demo of FSA (Feedback Self-adaptive Attention, ICCV 2025): `python app.py`, the Space's entry point.

Only what must happen before torch loads; the demo itself is the package `fsa.demo` (`python -m fsa.demo`
starts the same page): `fsa/demo/page.py` has the layout and `main`, `fsa/demo/handlers.py` the callbacks.

Environment: FSA_MODEL (backbone, default ViT-B-16; `tiny-test` = random weights for tests),
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (or PORT), and the `RuntimeLimits` variables FSA_CONCURRENCY,
FSA_SESSION_TTL, FSA_MAX_PIXELS, FSA_MAX_CLASSES, FSA_TEMP_TTL (see docs/deployment.md).
"""
from __future__ import annotations

import os

# Before torch loads OpenMP: its worker threads would otherwise spin while they wait, taking the CPU from
# the threads that answer clicks and stream progress. Sleeping costs a forward pass about nothing
# (ViT-B/16 /segment on 2 cores: 1.51-1.56 s passive, 1.42-1.58 s spinning).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# ZeroGPU (Hugging Face Spaces) wants `spaces` imported before torch initialises CUDA; locally the
# package is optional (fsa.demo.server.gpu is then a no-op).
try:
    import spaces  # type: ignore[import-not-found]  # noqa: F401
except ImportError:
    pass

from fsa.demo.page import main  # noqa: E402  (after the two steps above)

if __name__ == "__main__":
    main()
