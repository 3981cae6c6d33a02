"""Deployment files: the Deta Space `Spacefile`, the Hugging Face Space front matter of README.md,
requirements.txt, and that .ci/run runs exactly the README's commands."""
from __future__ import annotations

import os
import re
from pathlib import Path

import gradio
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _front_matter() -> dict:
    match = re.match(r"---\n(.*?)\n---\n", README, re.S)
    assert match, "README.md must start with a YAML front matter block (Hugging Face Space config)"
    return yaml.safe_load(match.group(1))


def _readme_commands() -> tuple[str, str]:
    """The first two ```bash blocks after the title: install + start, and the tests."""
    body = README.split("\n# ", 1)[1]
    blocks = re.findall(r"```bash\n(.*?)\n```", body, re.S)
    assert len(blocks) >= 2
    return blocks[0].strip(), blocks[1].strip()


def test_spacefile_parses_and_runs_app_py():
    spec = yaml.safe_load((REPO / "Spacefile").read_text())
    assert spec["v"] == 0
    micros = spec["micros"]
    assert isinstance(micros, list) and len(micros) == 1
    micro = micros[0]
    assert micro["engine"].startswith("python") and micro["src"] == "."
    assert re.search(r"\bapp\.py\b", micro["run"])
    assert (REPO / "app.py").is_file()


def test_deployment_page_says_deta_space_is_closed():
    deployment = (REPO / "docs" / "deployment.md").read_text(encoding="utf-8")
    assert re.search(r"Deta Space (shut down|closed)[^.]*2024", deployment)


def test_space_front_matter():
    meta = _front_matter()
    assert meta["sdk"] == "gradio"
    assert str(meta["sdk_version"]) == "6.31.0" == gradio.__version__
    assert meta["app_file"] == "app.py"
    preload = " ".join(meta["preload_from_hub"])
    for repo in ("timm/vit_base_patch16_clip_224.openai", "timm/vit_base_patch8_224.dino"):
        assert repo in preload and repo in meta["models"]


def test_requirements():
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    reqs = {re.split(r"[<>=!~ ;\[]", line, 1)[0].lower().replace("_", "-"): line for line in lines if line}
    for name in ("torch", "torchvision", "open-clip-torch", "gradio", "gradio-client", "matplotlib",
                 "opencv-python-headless", "huggingface-hub", "timm", "pytest", "playwright"):
        assert name in reqs, f"{name} missing from requirements.txt"
    assert reqs["gradio"].replace(" ", "") == "gradio==6.31.0"
    assert "torch==2.13.0" not in reqs["torch"].replace(" ", "")
    assert reqs["torch"] == "torch" and reqs["torchvision"] == "torchvision"  # a matching pair is pip's job


def test_ci_run_runs_the_readme_commands():
    install, tests = _readme_commands()
    assert install.endswith(" && python app.py")
    ci = (REPO / ".ci" / "run").read_text()
    code = [line.strip() for line in ci.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert ci.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in code
    assert install[: -len(" && python app.py")] in code, "CI must install exactly as the README says"
    assert any(line.startswith(tests) for line in code), "CI must test exactly as the README says"
    assert any("apt-get install -y chromium" in line for line in code)
    assert not any("playwright install" in line for line in code)
    assert any("-eq 5" in line for line in code), "pytest exit 5 (no tests) must fail CI"
    assert os.access(REPO / ".ci" / "run", os.X_OK)


def test_readme_sections_and_picture():
    for heading in ("## Benchmark", "## HTTP API", "## Python API", "## Command line"):
        assert heading in README
    for endpoint in ("/segment", "/attention"):
        assert f'api_name="{endpoint}"' in README
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert pictures and all((REPO / p).is_file() for p in pictures)


@pytest.mark.parametrize("name", ["python -m fsa segment", "python -m fsa bench", "fsa.Segmenter", "fsa.patch_logits"])
def test_readme_documents(name):
    assert name in README
