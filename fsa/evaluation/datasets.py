"""The eight benchmarks of the published protocol: layouts, sample lists, image and label decoding, names.

Sources of the facts encoded here (read, not copied):
- open-mmlab/mmsegmentation 1.x: ``BaseSegDataset.load_data_list`` (split-file order, or a recursive
  scan sorted by image path; label path = image path with the image suffix replaced),
  ``LoadAnnotations`` (labels decoded with Pillow, 'unchanged', cast to uint8; reduce_zero_label is
  ``gt[gt == 0] = 255; gt = gt - 1; gt[gt == 254] = 255``), ``LoadImageFromFile`` (cv2 decode of the
  file bytes, colour, BGR; the data preprocessor flips to RGB), the dataset classes' suffixes and
  ``reduce_zero_label`` (ADE20KDataset, COCOStuffDataset, CityscapesDataset, PascalVOCDataset).
- chi-chi-zx/FSA and mc-lan/ProxyCLIP ``configs/cfg_*.py`` (data_prefix, ann_file) and ProxyCLIP
  ``custom_datasets.py`` (PascalVOC20Dataset, PascalContext60/59Dataset, COCOObjectDataset).
- Class-name files: see ``names/SOURCES.md``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional, Sequence, Union

import cv2
import numpy as np
from PIL import Image


PathLike = Union[str, "os.PathLike[str]"]
IGNORE_INDEX = 255
NAMES_DIR = Path(__file__).resolve().parent / "names"


class DatasetError(ValueError):
    """Bad or missing benchmark data; the message names the file or expected path and the layout."""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: what is scored and where its files lie under a data root.

    Paths are POSIX strings: ``folder`` is relative to the data root, ``image_dir``, ``label_dir``
    and ``split_file`` relative to ``folder``. ``split_file`` None means: scan ``image_dir``
    recursively for ``*image_suffix`` (mmseg's order: sorted by path).
    """

    name: str  # 'voc21'
    title: str  # 'PASCAL VOC 2012 (21)'
    num_classes: int
    has_background: bool  # class 0 is a background class: prob_thd applies
    reduce_zero_label: bool  # raw 0 -> 255 (ignored), v -> v - 1
    folder: str
    image_dir: str
    label_dir: str
    image_suffix: str
    label_suffix: str
    split_file: Optional[str]
    num_samples: int  # published validation size
    label_note: str  # what the raw label values mean
    source: str  # where the files come from / how to make them
    id_path: str = "<id>"  # how a sample's path below image_dir / label_dir is built from its id

    @property
    def raw_max(self) -> int:
        """Largest class value a raw label file may hold (255 aside)."""
        return self.num_classes if self.reduce_zero_label else self.num_classes - 1


_VOC_SOURCE = "VOCtrainval_11-May-2012.tar (PASCAL VOC 2012) extracted into DATA_ROOT"
_CONTEXT_SOURCE = (
    "VOCtrainval_03-May-2010.tar (PASCAL VOC 2010) extracted into DATA_ROOT, then mmseg's "
    "tools/dataset_converters/pascal_context.py with PASCAL-Context's trainval_merged.json (needs the "
    "Detail API) writes SegmentationClassContext/<id>.png and ImageSets/SegmentationContext/{train,val}.txt"
)


def _coco_source(name: str) -> str:
    return (f"COCO val2017.zip + stuffthingmaps_trainval2017.zip (COCO-Stuff), converted with "
            f"`python -m fsa prepare {name} SRC DATA_ROOT`")


_BENCHMARK_LIST = (
    Benchmark("voc21", "PASCAL VOC 2012 (21)", 21, True, False,
              "VOCdevkit/VOC2012", "JPEGImages", "SegmentationClass", ".jpg", ".png",
              "ImageSets/Segmentation/val.txt", 1449,
              "palette PNG: 0 = background (scored), 1..20 classes, 255 = ignore", _VOC_SOURCE),
    Benchmark("context60", "PASCAL Context (60)", 60, True, False,
              "VOCdevkit/VOC2010", "JPEGImages", "SegmentationClassContext", ".jpg", ".png",
              "ImageSets/SegmentationContext/val.txt", 5104,
              "grey PNG from mmseg's converter: 0 = background (scored), 1..59 classes", _CONTEXT_SOURCE),
    Benchmark("coco_object", "COCO-Object (81)", 81, True, False,
              "coco_object", "images/val2017", "annotations/val2017", ".jpg", "_instanceTrainIds.png",
              None, 5000,
              "grey PNG: 0 = background (stuff and unlabeled), 1..80 things", _coco_source("coco_object")),
    Benchmark("voc20", "PASCAL VOC 2012 (20)", 20, False, True,
              "VOCdevkit/VOC2012", "JPEGImages", "SegmentationClass", ".jpg", ".png",
              "ImageSets/Segmentation/val.txt", 1449,
              "palette PNG: 0 = background (ignored), 1..20 classes, 255 = ignore", _VOC_SOURCE),
    Benchmark("context59", "PASCAL Context (59)", 59, False, True,
              "VOCdevkit/VOC2010", "JPEGImages", "SegmentationClassContext", ".jpg", ".png",
              "ImageSets/SegmentationContext/val.txt", 5104,
              "grey PNG from mmseg's converter: 0 = background (ignored), 1..59 classes", _CONTEXT_SOURCE),
    Benchmark("coco_stuff", "COCO-Stuff 164k (171)", 171, False, False,
              "coco_stuff164k", "images/val2017", "annotations/val2017", ".jpg", "_labelTrainIds.png",
              None, 5000,
              "grey PNG: 0..170 train ids, 255 = ignore", _coco_source("coco_stuff")),
    Benchmark("cityscapes", "Cityscapes (19)", 19, False, False,
              "cityscapes", "leftImg8bit/val", "gtFine/val", "_leftImg8bit.png", "_gtFine_labelTrainIds.png",
              None, 500,
              "grey PNG: 0..18 train ids, 255 = ignore",
              "leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip, labels converted with "
              "`python -m fsa prepare cityscapes SRC DATA_ROOT`", "<city>/<id>"),
    Benchmark("ade20k", "ADE20K (150)", 150, False, True,
              "ade/ADEChallengeData2016", "images/validation", "annotations/validation", ".jpg", ".png",
              None, 2000,
              "grey PNG: 0 = other (ignored), 1..150 classes", "ADEChallengeData2016.zip extracted into DATA_ROOT/ade"),
)

# The paper's column order.
BENCHMARKS: Mapping[str, Benchmark] = MappingProxyType({b.name: b for b in _BENCHMARK_LIST})


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name``; ValueError listing the valid names otherwise."""
    key = str(name).strip().lower()
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]


@dataclass(frozen=True)
class Sample:
    """One validation sample: ``id`` is the image file name without its suffix."""

    id: str
    image: Path
    label: Path


# ---------------------------------------------------------------------------------------- layout


def layout_hint(bench: Benchmark) -> str:
    """One line: where the files go under DATA_ROOT."""
    parts = [f"{bench.image_dir}/{bench.id_path}{bench.image_suffix}",
             f"{bench.label_dir}/{bench.id_path}{bench.label_suffix}"]
    if bench.split_file:
        parts.append(bench.split_file)
    return f"expected DATA_ROOT/{bench.folder}/{{{', '.join(parts)}}}"


def layout_help(bench: Benchmark) -> str:
    """The expected layout under a data root, several lines (for error messages and the README)."""
    rows = [(f"{bench.image_dir}/{bench.id_path}{bench.image_suffix}", ""),
            (f"{bench.label_dir}/{bench.id_path}{bench.label_suffix}", bench.label_note)]
    if bench.split_file:
        rows.append((bench.split_file, f"{bench.num_samples} ids, one per line, in evaluation order"))
    width = max(len(path) for path, _ in rows) + 2
    lines = [f"{bench.title}: {bench.num_samples} validation images", "DATA_ROOT/", f"  {bench.folder}/"]
    lines += [f"    {path:<{width}}{note}".rstrip() for path, note in rows]
    if not bench.split_file:
        lines.append(f"Samples: every *{bench.image_suffix} under {bench.image_dir}/, sorted by path; "
                     "each needs its label.")
    lines.append(f"Source: {bench.source}.")
    return "\n".join(lines)


def dataset_dir(bench: Benchmark, data_root: PathLike) -> Path:
    """``data_root/bench.folder``; a data root that is itself that folder is accepted too."""
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{bench.title}: data root {root} is not a folder; {layout_hint(bench)}")
    folder = root / bench.folder
    if folder.is_dir():
        return folder
    if (root / bench.image_dir).is_dir():  # the user pointed at e.g. VOCdevkit/VOC2012 itself
        return root
    raise DatasetError(f"{bench.title}: folder {folder} not found; {layout_hint(bench)}")


def _require_dir(path: Path, what: str, bench: Benchmark) -> None:
    if not path.is_dir():
        raise DatasetError(f"{bench.title}: {what} folder {path} not found; {layout_hint(bench)}")


def _scan(top: Path, suffix: str) -> list[str]:
    """POSIX paths relative to ``top`` of the files ending with ``suffix``, recursively.

    As mmengine's list_dir_or_file: names starting with '.' are skipped, links are followed.
    """
    found: list[str] = []
    pending = [top]
    while pending:
        here = pending.pop()
        with os.scandir(here) as entries:
            for entry in entries:
                if entry.is_dir():
                    pending.append(Path(entry.path))
                elif not entry.name.startswith(".") and entry.name.endswith(suffix) and entry.is_file():
                    found.append(Path(entry.path).relative_to(top).as_posix())
    return sorted(found)


def _missing_error(bench: Benchmark, missing: Sequence[Path], total: int, what: str, where: str) -> DatasetError:
    return DatasetError(
        f"{bench.title}: {len(missing)} of {total} {what}, e.g. {missing[0]}; {where}; {layout_hint(bench)}")


def list_samples(bench: Benchmark, data_root: PathLike) -> list[Sample]:
    """Every validation sample, in mmseg's order (split-file order, or sorted image paths).

    DatasetError naming the expected path when a folder or the split file is missing, when an
    image has no label, or (scanned layouts) a label has no image.
    """
    base = dataset_dir(bench, data_root)
    image_dir, label_dir = base / bench.image_dir, base / bench.label_dir
    _require_dir(image_dir, "image", bench)
    _require_dir(label_dir, "label", bench)

    if bench.split_file:
        split = base / bench.split_file
        if not split.is_file():
            raise DatasetError(f"{bench.title}: split file {split} not found; {layout_hint(bench)}")
        ids = [line.strip() for line in split.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not ids:
            raise DatasetError(f"{bench.title}: split file {split} lists no ids; {layout_hint(bench)}")
        rel_ids = ids
    else:
        rel_images = _scan(image_dir, bench.image_suffix)
        if not rel_images:
            raise DatasetError(
                f"{bench.title}: no *{bench.image_suffix} images under {image_dir}; {layout_hint(bench)}")
        rel_ids = [rel[: -len(bench.image_suffix)] for rel in rel_images]
        images = set(rel_ids)
        rel_labels = _scan(label_dir, bench.label_suffix)
        orphans = [label_dir / rel for rel in rel_labels if rel[: -len(bench.label_suffix)] not in images]
        if orphans:
            raise _missing_error(bench, orphans, len(rel_labels), "labels have no image",
                                 f"expected images at {image_dir}/{bench.id_path}{bench.image_suffix}")

    samples = [Sample(rel.rsplit("/", 1)[-1], image_dir / f"{rel}{bench.image_suffix}",
                      label_dir / f"{rel}{bench.label_suffix}") for rel in rel_ids]
    no_image = [s.image for s in samples if not s.image.is_file()]
    if no_image:
        raise _missing_error(bench, no_image, len(samples), "images are missing", f"listed in {bench.split_file}")
    no_label = [s.label for s in samples if not s.label.is_file()]
    if no_label:
        raise _missing_error(bench, no_label, len(samples), "images have no label",
                             f"expected labels at {label_dir}/{bench.id_path}{bench.label_suffix}")
    return samples


# ------------------------------------------------------------------------------------- decoding


def read_image(path: PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB, decoded as mmseg does: cv2 colour decode of the file bytes, BGR -> RGB.

    cv2's colour decode turns grey images to 3 channels, drops alpha and applies the EXIF
    orientation, as in the published pipeline. DatasetError naming the file if it cannot be read.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"cannot read image {path}: {exc.strerror or exc}") from exc
    if data.size == 0:
        raise DatasetError(f"image {path} is empty (0 bytes); re-extract or re-download it")
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None or bgr.size == 0:
        raise DatasetError(f"image {path} is corrupt or not an image OpenCV can decode; re-extract or re-download it")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_raw_label(path: PathLike) -> np.ndarray:
    """The stored class indices of a label file, (H, W) uint8, as Pillow decodes them (no palette lookup).

    DatasetError naming the file if it is missing, corrupt, multi-channel or holds values above 255.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            mode = image.mode
            values = np.array(image)
    except FileNotFoundError as exc:
        raise DatasetError(f"label {path} not found") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"label {path} is corrupt or not an image Pillow can decode ({exc}); "
                           "re-extract or re-convert it") from exc
    if values.ndim != 2:
        raise DatasetError(f"label {path} has mode {mode} with {values.shape[-1]} channels; labels are "
                           "single-channel class-index PNGs (palette or grey), not colour renderings")
    if values.dtype == np.bool_:
        return values.astype(np.uint8)
    if not np.issubdtype(values.dtype, np.integer):
        raise DatasetError(f"label {path} has mode {mode} (dtype {values.dtype}); labels hold integer class indices")
    if values.dtype != np.uint8:
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if lo < 0 or hi > 255:
            raise DatasetError(f"label {path} (mode {mode}) has values in [{lo}, {hi}]; class indices must be 0..255")
        values = values.astype(np.uint8)
    return values


def reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label on uint8 labels: 0 -> 255, v -> v - 1, 255 stays 255. (H, W) -> (H, W)."""
    out = raw.astype(np.uint8, copy=True)
    out[out == 0] = 255
    out -= 1
    out[out == 254] = 255
    return out


def read_label(path: PathLike, bench: Benchmark, image_shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """(H, W) uint8 label in the metric's label space (after reduce_zero_label), 255 = ignore.

    Read with Pillow as stored indices (palette images are not converted to colours), never resized.
    ``image_shape`` (H, W[, 3]): DatasetError when the label's size differs. DatasetError naming the
    file and the bad values when a value lies outside the benchmark's classes (255 aside).
    """
    path = Path(path)
    raw = read_raw_label(path)
    if image_shape is not None and tuple(raw.shape) != tuple(image_shape[:2]):
        (h, w), (ih, iw) = raw.shape, tuple(image_shape[:2])
        raise DatasetError(f"label {path} is {h}x{w} (HxW) but its image is {ih}x{iw}; labels are never "
                           "resized, so each label must be the size of its image")
    counts = np.bincount(raw.ravel(), minlength=256)
    bad = np.flatnonzero(counts[bench.raw_max + 1: IGNORE_INDEX]) + bench.raw_max + 1
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        reduce_note = " with 0 = ignored" if bench.reduce_zero_label else ""
        raise DatasetError(
            f"label {path} has values {shown} outside {bench.title}'s 0..{bench.raw_max}{reduce_note} and "
            f"255 = ignore; is it a {bench.label_suffix} file of the {bench.name} layout? {layout_hint(bench)}")
    return reduce_zero_label(raw) if bench.reduce_zero_label else raw


# ----------------------------------------------------------------------------------- class names


def names_path(bench: Benchmark) -> Path:
    """The shipped class-name file of ``bench`` (``names/<name>.txt``)."""
    return NAMES_DIR / f"{bench.name}.txt"


def class_lines(bench: Benchmark, names_file: Optional[PathLike] = None) -> list[tuple[str, ...]]:
    """One tuple of synonyms per class, in label order, from ``names_file`` or the shipped file.

    Format (ProxyCLIP/FSA ``configs/cls_*.txt``): one class per line, synonyms separated by ``;``.
    DatasetError naming the file if it cannot be read, uses ``,`` between synonyms, has a line
    count other than ``bench.num_classes``.
    """
    path = Path(names_file).expanduser() if names_file is not None else names_path(bench)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read class-name file {path}: {exc}") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    for number, line in enumerate(lines, 1):
        if "," in line:
            raise DatasetError(f"class-name file {path}, line {number} ({line.strip()!r}) has a ','; "
                               "write one class per line with synonyms separated by '; '")
    if len(lines) != bench.num_classes:
        raise DatasetError(f"class-name file {path} has {len(lines)} classes (non-empty lines) but "
                           f"{bench.title} has {bench.num_classes}; write one line per class in label order")
    classes = []
    for number, line in enumerate(lines, 1):
        # One name may stand in two classes, as `bed` does in the published COCO-Object file (the
        # background prompts and class 60): kept, so that the softmax and the first-index argmax
        # on the tie behave as published. Within a line a repeated name counts once.
        synonyms = tuple(dict.fromkeys(name.strip() for name in line.split(";") if name.strip()))
        if not synonyms:
            raise DatasetError(f"class-name file {path}, line {number} has no name; write one class per line")
        classes.append(synonyms)
    return classes


def class_names(bench: Benchmark, names_file: Optional[PathLike] = None) -> list[str]:
    """Display name per class: the first synonym of each line; class 0 of a background benchmark
    is shown as 'background' (its published line is a list of stuff words)."""
    names = [synonyms[0] for synonyms in class_lines(bench, names_file)]
    if bench.has_background:
        names[0] = "background"
    return names
