"""Shared fixtures: the golden tiny CLIP of ../shared/golden and small random inputs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("FSA_MODEL", "tiny-test")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("FSA_GOLDEN", REPO.parent / "shared" / "golden" / "published_tiny.npz"))


@pytest.fixture(scope="session")
def golden():
    """The npz of published outputs; skipped (not failed) only outside CI when shared/ is absent."""
    if not GOLDEN.exists():
        if os.environ.get("CI"):
            pytest.fail(f"golden file missing: {GOLDEN}")
        pytest.skip(f"golden file missing: {GOLDEN}")
    return np.load(GOLDEN)


@pytest.fixture(scope="session")
def golden_model(golden):
    """The golden tiny open_clip CLIP in float64, eval mode."""
    import open_clip

    model = open_clip.CLIP(**json.loads(str(golden["config_json"]))).double().eval()
    state = {k[len("state/"):]: torch.from_numpy(golden[k]) for k in golden.files if k.startswith("state/")}
    model.load_state_dict(state)
    return model
