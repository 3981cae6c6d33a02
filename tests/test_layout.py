"""The repository's layout: the library's modules import each other without a circle, `fsa.demo` is the only
part that imports Gradio, `app.py` only starts it, and the load test starts the app through the package
(`python -m fsa.demo`), not through a file path."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from fsa.demo import loadtest

REPO = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _fsa_imports(path: Path) -> set[str]:
    """The `fsa` modules `path` imports anywhere in it (inside functions too), as dotted names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "fsa"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "fsa":
                continue
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}  # `from . import hub` names a module
    modules = {_module_name(p) for p in (REPO / "fsa").rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def test_the_library_has_no_import_circle():
    """Every module sits on a floor above the modules it imports (package __init__ files aside: they only
    gather names for users)."""
    graph = {_module_name(p): _fsa_imports(p) for p in (REPO / "fsa").rglob("*.py") if p.name != "__init__.py"}
    packages = {_module_name(p) for p in (REPO / "fsa").rglob("__init__.py")}
    graph = {m: {d for d in deps if d not in packages} for m, deps in graph.items()}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import circle: " + " -> ".join(path[path.index(module):] + (module,))
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            visit(dep, path + (module,))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())
    # the circle this layout removed, and the floors around it
    assert "fsa.proxies" not in graph["fsa.backbones"] and "fsa.backbones" not in graph["fsa.proxies"]
    assert not graph["fsa.hub"] - {"fsa.config"}
    assert {"fsa.backbones", "fsa.proxies"} <= graph["fsa.cache"]


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


def test_loadtest_finds_the_example_images(tmp_path, monkeypatch):
    """The load test's photos are the repository's examples (it moved into fsa/demo/ once and looked for them in
    fsa/examples): `make_images` writes them upscaled. The 132-megapixel refusal image is stubbed out here."""
    from PIL import Image

    assert (loadtest.EXAMPLES_DIR / "coffee.jpg").is_file() and (loadtest.EXAMPLES_DIR / "chelsea_cat.jpg").is_file()
    real_new = Image.new
    monkeypatch.setattr(Image, "new", lambda mode, size, color=0: real_new(mode, (8, 8), color))
    paths = loadtest.make_images(tmp_path, big_side=64)
    with Image.open(paths["medium"]) as medium, Image.open(paths["big_png"]) as big:
        assert medium.size == (2000, 1500) and big.size == (64, 64)


def test_every_package_is_installed():
    """pyproject.toml lists its packages by hand: a new sub-package (fsa/visualize/ became one) must be in it, or an
    installed fsa lacks it."""
    import re

    root = Path(__file__).resolve().parents[1]
    line = re.search(r"^packages = \[(.*)\]$", (root / "pyproject.toml").read_text(), re.M).group(1)
    listed = {name.strip().strip('"') for name in line.split(",")}
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "fsa").rglob("__init__.py")}
    assert found == listed
