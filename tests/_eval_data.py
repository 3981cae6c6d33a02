"""Small fake benchmark data in the exact published layouts, for tests of :mod:`fsa.evaluation`.

``make_dataset(root, name)`` writes images (JPEG, or PNG for Cityscapes) of odd sizes and label PNGs
(palette for VOC, grey otherwise) with a 255 border and random class blocks, and returns the
``(id, label)`` pairs in listing order with each label in the metric's space (after
reduce_zero_label), computed here independently of the code under test. ``make_raw_coco`` and
``make_raw_cityscapes`` write raw downloads for the converters; ``same_scores`` compares two results;
``run_cli`` runs ``python -m fsa`` (optionally under torchrun) with the tiny model.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from fsa.evaluation.datasets import BENCHMARKS

DEFAULT_SIZES = ((375, 500), (333, 500), (281, 417))
#: Image sizes and evaluator settings of the quick evaluations in the runner and sweep tests.
SMALL_SIZES = ((75, 100), (67, 100), (56, 83), (90, 61))
FAST = dict(backbone="tiny-test", short_side=64, progress=False)


REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: Sequence[str], env: Optional[dict] = None, torchrun: int = 0) -> subprocess.CompletedProcess:
    """``python -m fsa ARGS`` with the tiny model, offline, one thread per process; with ``torchrun`` = n, under
    ``torch.distributed.run`` with n (gloo) processes. A 600 s hang guard."""
    env = {**os.environ, "FSA_MODEL": "tiny-test", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    prefix = [sys.executable, "-m", "fsa"] if not torchrun else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", f"--master_port={free_port()}",
        "-m", "fsa"]
    return subprocess.run(prefix + list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def same_scores(a, b) -> bool:
    """Scores equal field by field, NaN equal to NaN (classes absent everywhere)."""
    return all(np.array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), equal_nan=True)
               for f in ("miou", "aacc", "macc", "iou", "acc"))
CITIES = ("frankfurt", "lindau", "munster")
BLOCK = 16  # label blocks, pixels
BORDER = 3  # 255 border, pixels


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), 256 RGB triples flattened."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def write_label(path: Path, values: np.ndarray, palette: bool = False) -> None:
    """(H, W) uint8 class indices as a PNG: mode P with the VOC palette, or mode L."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(values, dtype=np.uint8))
    if palette:
        image = image.convert("L")  # ensure a plain index plane before re-tagging
        image = Image.frombytes("P", image.size, image.tobytes())
        image.putpalette(voc_palette())
    image.save(path, format="PNG")


def write_image(path: Path, rgb: np.ndarray) -> None:
    """(H, W, 3) uint8 RGB as JPEG (quality 95) or PNG, by the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(rgb).save(path, format="JPEG", quality=95)
    else:
        Image.fromarray(rgb).save(path, format="PNG")


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth-ish random (H, W, 3) uint8 RGB (coloured blocks plus a little noise; small JPEGs)."""
    blocks = rng.integers(0, 256, (-(-height // 32), -(-width // 32), 3))
    image = np.repeat(np.repeat(blocks, 32, axis=0), 32, axis=1)[:height, :width]
    noise = rng.integers(-8, 9, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def random_blocks(rng: np.random.Generator, height: int, width: int, values: Sequence[int]) -> np.ndarray:
    """(H, W) uint8 of BLOCK-sized blocks drawn from ``values``; the first blocks hold min and max."""
    values = np.asarray(values)
    grid = rng.choice(values, size=(-(-height // BLOCK), -(-width // BLOCK)))
    grid.flat[0], grid.flat[1] = values.min(), values.max()
    return np.repeat(np.repeat(grid, BLOCK, axis=0), BLOCK, axis=1)[:height, :width].astype(np.uint8)


def _raw_label(rng: np.random.Generator, height: int, width: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A raw label file's values and, independently, its metric-space label."""
    bench = BENCHMARKS[name]
    if bench.reduce_zero_label:
        raw = random_blocks(rng, height, width, range(0, bench.num_classes + 1))  # 0 = ignored, 1..C
        metric = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
    else:
        raw = random_blocks(rng, height, width, range(bench.num_classes))
        metric = raw.astype(np.int64)
    raw[:BORDER], raw[-BORDER:], raw[:, :BORDER], raw[:, -BORDER:] = 255, 255, 255, 255
    metric = np.where(raw == 255, 255, metric)
    return raw, metric.astype(np.uint8)


def _ids(name: str, n: int) -> list[str]:
    if name in ("voc21", "voc20", "context60", "context59"):
        return [f"2008_{7 * i + 3:06d}" for i in range(n)]
    if name in ("coco_object", "coco_stuff"):
        return [f"{139 + 17 * i:012d}" for i in range(n)]
    if name == "cityscapes":
        return [f"{CITIES[i % len(CITIES)]}_000000_{19 * i:06d}" for i in range(n)]
    return [f"ADE_val_{i + 1:08d}" for i in range(n)]


def _rel(name: str, sample_id: str) -> str:
    """Path of a sample below the image / label folder, without suffix."""
    return f"{sample_id.split('_')[0]}/{sample_id}" if name == "cityscapes" else sample_id


def make_dataset(root, name: str, n: int = 3, sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
                 seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Write ``n`` fake validation samples of benchmark ``name`` under the data root ``root``.

    Split-file layouts get a shuffled split file plus one train-only sample that must not be
    listed; scanned layouts get distractor files beside the labels (raw maps, colour renderings).
    Returns ``[(id, label in metric space), ...]`` in the order ``list_samples`` must give.
    """
    bench = BENCHMARKS[name]
    rng = np.random.default_rng(seed)
    base = Path(root) / bench.folder
    ids = _ids(name, n + 1)  # the last one is the train-only sample of split layouts
    truth: dict[str, np.ndarray] = {}
    for index, sample_id in enumerate(ids):
        if index == n and not bench.split_file:
            break
        height, width = sizes[index % len(sizes)]
        raw, metric = _raw_label(rng, height, width, name)
        rel = _rel(name, sample_id)
        write_image(base / bench.image_dir / f"{rel}{bench.image_suffix}", random_image(rng, height, width))
        write_label(base / bench.label_dir / f"{rel}{bench.label_suffix}", raw, palette=name.startswith("voc"))
        if index < n:
            truth[sample_id] = metric
        if name == "cityscapes":  # the other gtFine files sit beside the train-id maps
            write_label(base / bench.label_dir / f"{rel}_gtFine_labelIds.png", np.zeros_like(raw))
            write_image(base / bench.label_dir / f"{rel}_gtFine_color.png", random_image(rng, height, width))
        elif name in ("coco_object", "coco_stuff"):  # raw map left beside the converted one
            write_label(base / bench.label_dir / f"{rel}.png", np.full_like(raw, 200))
    if bench.split_file:
        order = [ids[i] for i in rng.permutation(n)]
        if n > 2 and order == sorted(order):
            order.reverse()  # the listing must follow the file, not sorted order
        split = base / bench.split_file
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text("".join(f"{sample_id}\n" for sample_id in order))
    else:
        order = sorted(truth, key=lambda sample_id: _rel(name, sample_id))
    return [(sample_id, truth[sample_id]) for sample_id in order]


# ---------------------------------------------------------------------------- raw downloads

# Raw COCO-Stuff values (COCO category id - 1), written here from COCO's 1-based ids: the 11
# category ids without annotations are 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91.
COCO_RAW_VALUES = tuple(i - 1 for i in range(1, 183) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)) + (255,)


def make_raw_coco(src, n: int = 3, sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
                  seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """mmseg's raw COCO-Stuff layout: SRC/images/val2017/<id>.jpg, SRC/annotations/val2017/<id>.png.

    Returns ``[(id, raw map), ...]`` sorted by id.
    """
    rng = np.random.default_rng(seed)
    out = []
    for index, sample_id in enumerate(_ids("coco_stuff", n)):
        height, width = sizes[index % len(sizes)]
        raw = random_blocks(rng, height, width, COCO_RAW_VALUES)
        write_image(Path(src) / "images" / "val2017" / f"{sample_id}.jpg", random_image(rng, height, width))
        write_label(Path(src) / "annotations" / "val2017" / f"{sample_id}.png", raw)
        out.append((sample_id, raw))
    return sorted(out, key=lambda item: item[0])


def make_raw_cityscapes(src, n: int = 3, sizes: Sequence[tuple[int, int]] = ((64, 128), (48, 96)),
                        seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Raw Cityscapes: SRC/gtFine/val/<city>/<id>_gtFine_labelIds.png (ids 0..33) and
    SRC/leftImg8bit/val/<city>/<id>_leftImg8bit.png. Returns ``[(id, raw ids), ...]`` sorted by path."""
    rng = np.random.default_rng(seed)
    out = []
    for index, sample_id in enumerate(_ids("cityscapes", n)):
        height, width = sizes[index % len(sizes)]
        raw = random_blocks(rng, height, width, range(34))
        rel = _rel("cityscapes", sample_id)
        write_image(Path(src) / "leftImg8bit" / "val" / f"{rel}_leftImg8bit.png", random_image(rng, height, width))
        write_label(Path(src) / "gtFine" / "val" / f"{rel}_gtFine_labelIds.png", raw)
        write_image(Path(src) / "gtFine" / "val" / f"{rel}_gtFine_color.png", random_image(rng, height, width))
        out.append((sample_id, raw))
    return sorted(out, key=lambda item: _rel("cityscapes", item[0]))
