"""Where the golden outputs of the published code live: tests/data (its README says how each was made)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
#: The published code's outputs ship with the repository; FSA_GOLDEN_DIR may point elsewhere (same file names).
GOLDEN_DIR = Path(os.environ.get("FSA_GOLDEN_DIR", REPO / "tests" / "data"))


def load_golden(name: str):
    """One golden npz of tests/data by file name. A missing file is a failure, wherever the suite runs."""
    path = GOLDEN_DIR / name
    if not path.is_file():
        pytest.fail(f"golden file missing: {path} (it ships in tests/data)")
    return np.load(path)
