"""The documentation: README.md stays a front page, the code's `method.md §N` citations name sections
that docs/method.md has, and nothing in the repository points at a file outside it."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
METHOD = (REPO / "docs" / "method.md").read_text(encoding="utf-8")

#: the pages the README links to, one per subject
PAGES = ("app", "http-api", "python-api", "cli", "evaluation", "benchmark", "deployment", "method", "development")
#: text files of the repository (what a clone holds besides pictures, data and the environment)
TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".yml", ".yaml", ".cfg", ".ipynb", ".sh", ".json"}
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", "node_modules", "out", "build", "dist"}


def _text_files() -> list[Path]:
    files = []
    for path in REPO.rglob("*"):
        parts = path.relative_to(REPO).parts
        if any(p in SKIP_DIRS or (p.startswith(".") and p != ".ci") or p.endswith(".egg-info") for p in parts[:-1]):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name in ("Spacefile", "run")):
            files.append(path)
    return files


def _sections(text: str) -> dict[str, str]:
    """'3' → the text of '## 3. …' up to the next '## ', '3.2' → that of '### 3.2 …'."""
    found = {}
    for level, number in (("##", r"\d+"), ("###", r"\d+\.\d+")):
        heads = list(re.finditer(rf"^{level} ({number})\.? .*$", text, re.M))
        for head, nxt in zip(heads, heads[1:] + [None]):
            end = nxt.start() if nxt is not None else len(text)
            if level == "##":
                later = re.search(r"^## ", text[head.end():], re.M)
                end = head.end() + later.start() if later else len(text)
            found[head.group(1)] = text[head.start():end]
    return found


def test_readme_is_a_front_page():
    assert len(README.splitlines()) <= 150
    for page in PAGES:
        assert f"](docs/{page}.md" in README, f"README does not link to docs/{page}.md"
    assert "](docs/tutorial.ipynb)" in README
    assert "FSA_MODEL=tiny-test" in README


def test_method_has_the_numbered_sections():
    sections = _sections(METHOD)
    for number in ("1", "2", "3", "4", "5", "6", "2.1", *(f"3.{k}" for k in range(1, 8))):
        assert number in sections, f"docs/method.md has no section {number}"
    # the symbols the app page uses are defined in §3 before any other page needs them
    for symbol in ("Π = softmax_K(Z − U)", "Ŝ_ij = 1 / (1 + KL_ij)", "A_ens = (A_new A₀ + A₀ A_new + A_new) / 3"):
        assert symbol in sections["3"], symbol


def test_method_citations_name_existing_sections():
    sections = _sections(METHOD)
    cited = 0
    for path in _text_files():
        if path.suffix != ".py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if "method.md" not in line:
                continue
            where = f"{path.relative_to(REPO)}:{number}"
            for major, minor in re.findall(r"§(\d+)(?:\.(\d+))?", line.split("method.md", 1)[1]):
                key = f"{major}.{minor}" if minor else major
                assert key in sections, f"{where} cites method.md §{key}, which docs/method.md does not have"
                cited += 1
            for major, name in re.findall(r'§(\d+) "([^"]+)"', line):
                assert name.lower() in sections[major].lower(), f'{where}: §{major} has no "{name}"'
    assert cited >= 20  # the docstrings do cite it


def test_nothing_points_outside_the_repository():
    patterns = ["../" + "shared", "shared/" + "golden", "/" + "work/"]
    hits = []
    for path in _text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        hits += [f"{path.relative_to(REPO)}: {p}" for p in patterns if p in text]
    assert not hits, hits


def test_method_citations_name_the_file_in_the_repository():
    """A bare `method.md` would name a file the repository does not have: the code cites docs/method.md."""
    bare = []
    for path in sorted(REPO.rglob("*.py")):
        if ".venv" in path.parts or "venv" in path.parts:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if re.search(r"(?<!docs/)\bmethod\.md", line) and path.name != "test_docs.py":
                bare.append(f"{path.relative_to(REPO)}:{number}")
    assert not bare, f"cite docs/method.md, not a bare method.md: {bare}"
