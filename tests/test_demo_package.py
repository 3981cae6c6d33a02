"""The demo's home: `fsa.demo` is the only part of the library that imports Gradio, `app.py` only starts it,
and the load test starts the app through the package (`python -m fsa.demo`), not through a file path."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from fsa.demo import loadtest

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_library_imports_without_gradio():
    """With gradio unimportable, `fsa`, the evaluation, the CLI and the demo's Gradio-free floors still import."""
    done = _python("import sys\nsys.modules['gradio'] = None\n"
                   "import fsa, fsa.evaluation, fsa.cli, fsa.bench, fsa.demo, fsa.demo.limits, fsa.demo.sessions, "
                   "fsa.demo.loadtest\nprint('imported')")
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stderr[-2000:]
    # and the page really needs it: the block above is not vacuous
    failed = _python("import sys\nsys.modules['gradio'] = None\nimport fsa.demo.page")
    assert failed.returncode != 0 and "gradio" in failed.stderr


def test_importing_fsa_leaves_gradio_unloaded():
    done = _python("import sys, fsa, fsa.evaluation, fsa.cli, fsa.demo\nprint('gradio' in sys.modules)")
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]


def test_app_py_only_starts_the_package():
    """app.py: the OMP policy, `spaces` before torch, then fsa.demo's main; it defines and re-exports nothing."""
    source = (REPO / "app.py").read_text()
    assert len(source.splitlines()) < 80
    tree = ast.parse(source)
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names if node.module != "__future__"]
    assert imported == ["main"]
    assert not [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign))]


def test_loadtest_starts_the_app_through_the_package(tmp_path):
    """`start_server` runs `python -m fsa.demo` (tiny model) and it serves the page with its endpoints."""
    args = loadtest.build_parser().parse_args([])
    server = loadtest.start_server(tmp_path, args)
    try:
        assert server.process.args[1:] == ["-m", "fsa.demo"]
        with urllib.request.urlopen(server.url + "config", timeout=10) as response:
            config = json.load(response)
        ids = {c["props"].get("elem_id") for c in config["components"]}
        assert {"image-input", "classes", "mask-fsa", "run"} <= ids
        names = {d.get("api_name") for d in config["dependencies"]}
        assert {"segment", "attention", "compare_all", "score"} <= names
    finally:
        server.stop()
