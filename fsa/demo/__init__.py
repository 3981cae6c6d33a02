"""The Gradio demo of FSA, inside the library: `python -m fsa.demo` (or `python app.py`) starts it.

The only part of `fsa` that imports Gradio, and only when a module below is imported (importing this
package alone does not, so `python -m fsa loadtest` stays light). Floors, lowest first:

- `limits` (budgets), `sessions` (per-session records): no Gradio;
- `server` (ZeroGPU hook, memory and temp-folder upkeep, launch options), `forms` (form values →
  settings), `guards` (errors → messages, number checks, uploads, gone clients);
- `views` (results → pictures and text);
- `handlers` (`DemoApp`: one method per event or endpoint);
- `page` (components, wiring, endpoint names, `build_demo`, `main`);
- `loadtest` (drives a started app from outside with `gradio_client`).
"""
from __future__ import annotations


def main() -> None:
    """Start the demo server (settings from the environment, see `fsa.demo.page`)."""
    from .page import main as page_main

    page_main()
