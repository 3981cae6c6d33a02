"""fsa.scoring.score_reference: an uploaded reference mask's whole path (read, brought to the segmented size
when it has the user's image size, scored) in one call."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fsa.scoring import reference_at_size, score_against, score_reference

NAMES = ("cat", "sofa", "background")
H, W = 6, 8


def _result(labels):
    return SimpleNamespace(class_names=NAMES, labels=labels, method="clearclip", notes=[])


def test_a_reference_of_the_users_image_size_is_reduced_by_nearest_neighbour():
    reference = np.arange(2 * H * 2 * W).reshape(2 * H, 2 * W) % 3
    small, note = reference_at_size(reference, (H, W), source_size=(2 * W, 2 * H))
    assert small.dtype == np.int64 and np.array_equal(small, reference[::2, ::2])  # every other pixel
    assert note.startswith(f"The reference was given at the uploaded size, {2 * W}×{2 * H} pixels")  # says which
    assert f"segmented at {W}×{H}" in note and "nearest-neighbour" in note
    # the segmented size: used as it is, and the note says so
    same, note = reference_at_size(reference[:H, :W], (H, W), (2 * W, 2 * H))
    assert np.shares_memory(same, reference) and note == f"The reference was used at the segmented size, {W}×{H} pixels."
    # another size is refused naming both sizes the user may give
    with pytest.raises(ValueError, match=f"{W}×{H}.*{2 * W}×{2 * H}"):
        reference_at_size(reference[:H + 1], (H, W), (2 * W, 2 * H))
    # no source size: left as it is (score_against judges it), without a note
    same, note = reference_at_size(reference, (H, W), None)
    assert same is reference and note == ""


def test_score_reference_reads_resizes_and_scores(tmp_path):
    rng = np.random.default_rng(0)
    baseline, fsa = rng.integers(0, 3, (H, W)), rng.integers(0, 3, (H, W))
    big = np.repeat(np.repeat(rng.integers(0, 3, (H, W)), 2, axis=0), 2, axis=1).astype(np.uint8)
    big[0, :] = 255  # ignored
    path = tmp_path / "reference.png"
    Image.fromarray(big).save(path)
    report, reference, note = score_reference(str(path), _result(baseline), _result(fsa), source_size=(2 * W, 2 * H))
    assert np.array_equal(reference, big[::2, ::2].astype(np.int64)) and "reduced" in note
    expected = score_against(_result(baseline), _result(fsa), big[::2, ::2])
    assert report == expected
    # a mask of neither size is refused by the scoring, naming both sizes
    with pytest.raises(ValueError, match=f"is {2 * W}×{2 * H} pixels but the segmented image is {W}×{H}"):
        score_reference(str(path), _result(baseline), None)
