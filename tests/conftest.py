"""Shared fixtures: the golden outputs of the published code (tests/data, see its README) and small random
inputs."""
from __future__ import annotations

import json
import os

import pytest
import torch

from _golden import load_golden

os.environ.setdefault("FSA_MODEL", "tiny-test")
os.environ.setdefault("HF_HUB_OFFLINE", "1")



@pytest.fixture(scope="session")
def golden():
    """The npz of published outputs of the methods on a tiny CLIP."""
    return load_golden("published_tiny.npz")


@pytest.fixture(scope="session")
def golden_model(golden):
    """The golden tiny open_clip CLIP in float64, eval mode."""
    import open_clip

    model = open_clip.CLIP(**json.loads(str(golden["config_json"]))).double().eval()
    state = {k[len("state/"):]: torch.from_numpy(golden[k]) for k in golden.files if k.startswith("state/")}
    model.load_state_dict(state)
    return model
