"""``python -m fsa prepare {coco_object,coco_stuff,cityscapes} SRC DST``: raw downloads -> evaluation layout.

Each conversion is a fixed 256-entry lookup table from raw label values to the benchmark's label
values (numpy + Pillow only); values a raw file of that kind never holds are refused with an error
rather than passed through. Images are hard-linked (copied where linking fails, or with ``--copy``)
into ``DST/<benchmark folder>`` so that ``DST`` is the data root of :mod:`fsa.evaluation.datasets`.
Every file is written to a hidden temporary name and then renamed (nothing half-written); files
already in place are skipped, so an interrupted run resumes. Only the validation split is converted.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional, Sequence, TextIO

import numpy as np
from PIL import Image

from .datasets import BENCHMARKS, Benchmark, DatasetError, read_raw_label

EXIT_ERROR = 1


@dataclass(frozen=True)
class LabelTable:
    """Raw value -> label value: ``lut[v]`` for every ``v`` with ``valid[v]`` (both (256,), read-only)."""

    name: str
    lut: np.ndarray  # (256,) uint8
    valid: np.ndarray  # (256,) bool: the values a raw file of this kind may hold
    source: str


def _table(name: str, mapping: dict[int, int], source: str) -> LabelTable:
    lut = np.full(256, 255, dtype=np.uint8)
    valid = np.zeros(256, dtype=bool)
    for raw, value in mapping.items():
        lut[raw], valid[raw] = value, True
    lut.flags.writeable = False
    valid.flags.writeable = False
    return LabelTable(name, lut, valid, source)


# COCO-Stuff raw maps (stuffthingmaps_trainval2017) hold COCO category id - 1 (0..181) and 255 for
# unlabeled. These 11 ids are COCO categories that were never annotated; mmseg's
# tools/dataset_converters/coco_stuff164k.py (clsID_to_trID) skips them and numbers the other 171 in order.
COCO_UNANNOTATED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
_COCO_ANNOTATED_IDS = tuple(i for i in range(182) if i not in COCO_UNANNOTATED_IDS)
_COCO_LAST_THING_ID = 90  # raw ids 0..90 are things (80 annotated), 91..181 stuff

COCO_STUFF_TABLE = _table(
    "coco_stuff",
    {**{raw: train for train, raw in enumerate(_COCO_ANNOTATED_IDS)}, 255: 255},
    "open-mmlab/mmsegmentation tools/dataset_converters/coco_stuff164k.py, clsID_to_trID")

# COCO-Object: things -> 1..80 in COCO-Stuff's order, stuff and unlabeled (255) -> 0 = background
# (GroupViT's convert_to_trainID as shipped in chi-chi-zx/FSA and mc-lan/ProxyCLIP
# datasets/cvt_coco_object.py: train id + 1, then every raw id > 90 set to 0).
COCO_OBJECT_TABLE = _table(
    "coco_object",
    {**{raw: (train + 1 if raw <= _COCO_LAST_THING_ID else 0) for train, raw in enumerate(_COCO_ANNOTATED_IDS)},
     255: 0},
    "chi-chi-zx/FSA datasets/cvt_coco_object.py (from NVlabs/GroupViT), clsID_to_trID")

# Cityscapes labelIds 0..33 -> trainIds (cityscapesscripts/helpers/labels.py; 255 = no train id).
# mmseg draws *_gtFine_labelTrainIds.png from the polygons with the same table (json2labelImg,
# 'trainIds'); mapping the official *_gtFine_labelIds.png, drawn from the same polygons, gives the same map.
CITYSCAPES_TRAIN_IDS = (
    # 0 unlabeled, 1 ego vehicle, 2 rectification border, 3 out of roi, 4 static, 5 dynamic, 6 ground
    255, 255, 255, 255, 255, 255, 255,
    0, 1, 255, 255,  # 7 road, 8 sidewalk, 9 parking, 10 rail track
    2, 3, 4, 255, 255, 255,  # 11 building, 12 wall, 13 fence, 14 guard rail, 15 bridge, 16 tunnel
    5, 255, 6, 7,  # 17 pole, 18 polegroup, 19 traffic light, 20 traffic sign
    8, 9, 10, 11, 12,  # 21 vegetation, 22 terrain, 23 sky, 24 person, 25 rider
    # 26 car, 27 truck, 28 bus, 29 caravan, 30 trailer, 31 train, 32 motorcycle, 33 bicycle
    13, 14, 15, 255, 255, 16, 17, 18,
)
CITYSCAPES_TABLE = _table(
    "cityscapes", dict(enumerate(CITYSCAPES_TRAIN_IDS)),
    "mcordts/cityscapesScripts cityscapesscripts/helpers/labels.py, id -> trainId")

TABLES: Mapping[str, LabelTable] = MappingProxyType(
    {"coco_object": COCO_OBJECT_TABLE, "coco_stuff": COCO_STUFF_TABLE, "cityscapes": CITYSCAPES_TABLE})


def apply_table(raw: np.ndarray, table: LabelTable, path: Optional[Path] = None) -> np.ndarray:
    """``table.lut[raw]``, (H, W) uint8 -> (H, W) uint8; DatasetError naming the values a raw file
    of this kind cannot hold (and ``path``, when given)."""
    counts = np.bincount(raw.ravel(), minlength=256)
    bad = np.flatnonzero((counts > 0) & ~table.valid)
    if bad.size:
        where = f" in {path}" if path is not None else ""
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        raise DatasetError(f"unexpected values {shown}{where} for a raw {table.name} label map; "
                           f"{_RAW_HINT[table.name]}")
    return table.lut[raw]


_COCO_RAW_HINT = ("expected stuffthingmaps_trainval2017 PNGs (COCO id - 1 in 0..181, 255 = unlabeled), "
                  "not already converted *TrainIds.png files")
_RAW_HINT: Mapping[str, str] = MappingProxyType({
    "coco_stuff": _COCO_RAW_HINT,
    "coco_object": _COCO_RAW_HINT,
    "cityscapes": "expected *_gtFine_labelIds.png (label ids 0..33), not *_labelTrainIds.png or *_color.png",
})


# ------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Job:
    """One sample to convert: raw label -> label, image -> linked/copied image."""

    label_src: Path
    label_dst: Path
    image_src: Path
    image_dst: Path


def _first_dir(candidates: Sequence[Path], what: str, fix: str) -> Path:
    for path in candidates:
        if path.is_dir():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise DatasetError(f"{what} not found (looked in {tried}); {fix}")


def _check_missing(jobs: Sequence[Job], image_dir: Path) -> None:
    missing = [job.image_src for job in jobs if not job.image_src.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(jobs)} raw label maps have no image, e.g. {missing[0]}; "
                           f"is {image_dir} the right image folder (see --images)?")


def plan_coco(bench: Benchmark, src: Path, dst: Path, images: Optional[Path] = None,
              labels: Optional[Path] = None) -> list[Job]:
    """Jobs for COCO-Stuff / COCO-Object val2017, sorted by id.

    Raw maps are looked for in SRC/annotations/val2017 (mmseg's layout) or
    SRC/stuffthingmaps_trainval2017/val2017; images in SRC/images/val2017 or SRC/val2017.
    """
    fix = ("unzip stuffthingmaps_trainval2017.zip into SRC/annotations and val2017.zip into SRC/images, "
           "or name the folders with --labels / --images")
    label_dir = labels or _first_dir(
        [src / "annotations" / "val2017", src / "stuffthingmaps_trainval2017" / "val2017"],
        "COCO-Stuff raw val2017 label maps", fix)
    image_dir = images or _first_dir([src / "images" / "val2017", src / "val2017"], "COCO val2017 images", fix)
    for folder, what in ((label_dir, "label"), (image_dir, "image")):
        if not folder.is_dir():
            raise DatasetError(f"{what} folder {folder} not found; {fix}")
    raw = sorted(p for p in label_dir.iterdir()
                 if p.suffix == ".png" and "TrainIds" not in p.name and not p.name.startswith("."))
    if not raw:
        raise DatasetError(f"no raw *.png label maps in {label_dir}; {fix}")
    out = dst / bench.folder
    jobs = [Job(path, out / bench.label_dir / f"{path.stem}{bench.label_suffix}",
                image_dir / f"{path.stem}{bench.image_suffix}",
                out / bench.image_dir / f"{path.stem}{bench.image_suffix}")
            for path in raw]
    _check_missing(jobs, image_dir)
    return jobs


_CITYSCAPES_RAW_SUFFIX = "_gtFine_labelIds.png"


def plan_cityscapes(bench: Benchmark, src: Path, dst: Path, images: Optional[Path] = None,
                    labels: Optional[Path] = None) -> list[Job]:
    """Jobs for Cityscapes val, sorted by path: SRC holds gtFine/val/<city>/*_gtFine_labelIds.png and
    leftImg8bit/val/<city>/*_leftImg8bit.png (SRC/cityscapes is tried too)."""
    fix = ("unzip gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip into SRC, "
           "or name the val folders with --labels / --images")
    label_dir = labels or _first_dir([src / "gtFine" / "val", src / "cityscapes" / "gtFine" / "val"],
                                     "Cityscapes gtFine/val", fix)
    image_dir = images or _first_dir([label_dir.parent.parent / "leftImg8bit" / "val"],
                                     "Cityscapes leftImg8bit/val", fix)
    for folder, what in ((label_dir, "label"), (image_dir, "image")):
        if not folder.is_dir():
            raise DatasetError(f"{what} folder {folder} not found; {fix}")
    raw = sorted(label_dir.rglob(f"*{_CITYSCAPES_RAW_SUFFIX}"))
    if not raw:
        raise DatasetError(f"no *{_CITYSCAPES_RAW_SUFFIX} under {label_dir}; {fix}")
    out = dst / bench.folder
    jobs = []
    for path in raw:
        rel = path.relative_to(label_dir).as_posix()[: -len(_CITYSCAPES_RAW_SUFFIX)]  # <city>/<id>
        jobs.append(Job(path, out / bench.label_dir / f"{rel}{bench.label_suffix}",
                        image_dir / f"{rel}{bench.image_suffix}", out / bench.image_dir / f"{rel}{bench.image_suffix}"))
    _check_missing(jobs, image_dir)
    return jobs


# ------------------------------------------------------------------------------------- writing


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def convert_label(src: Path, dst: Path, table: LabelTable) -> None:
    """Read the raw map ``src``, map it with ``table`` and write ``dst`` (grey PNG) atomically."""
    values = apply_table(read_raw_label(src), table, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_name(dst)
    try:
        Image.fromarray(values).save(temp, format="PNG")
        os.replace(temp, dst)
    finally:
        temp.unlink(missing_ok=True)


def place_image(src: Path, dst: Path, copy: bool = False) -> None:
    """Hard-link ``src`` at ``dst`` (copy where linking fails, or when ``copy``), atomically."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_name(dst)
    try:
        if copy:
            shutil.copyfile(src, temp)
        else:
            try:
                os.link(src, temp)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(src, temp)
        os.replace(temp, dst)
    finally:
        temp.unlink(missing_ok=True)


def run(jobs: Sequence[Job], table: LabelTable, copy: bool = False, log: Optional[TextIO] = None) -> tuple[int, int]:
    """Convert every job; returns (written, skipped). Progress lines go to ``log`` (default stderr)."""
    log = sys.stderr if log is None else log
    written = skipped = 0
    step = max(1, len(jobs) // 20)
    for index, job in enumerate(jobs, 1):
        did = False
        if not job.label_dst.exists():
            convert_label(job.label_src, job.label_dst, table)
            did = True
        if not job.image_dst.exists() and not _same_file(job.image_src, job.image_dst):
            place_image(job.image_src, job.image_dst, copy)
            did = True
        written += did
        skipped += not did
        if index % step == 0 or index == len(jobs):
            print(f"prepare {table.name}: {index}/{len(jobs)} ({written} written, {skipped} already done)",
                  file=log, flush=True)
    return written, skipped


# ----------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m fsa prepare",
        description="Convert a raw download into the evaluation layout under DST (the data root): "
                    "COCO-Stuff 164k / COCO-Object from COCO val2017 + stuffthingmaps_trainval2017, "
                    "Cityscapes from gtFine + leftImg8bit. Validation split only; reruns skip finished files.")
    parser.add_argument("dataset", choices=sorted(TABLES), help="benchmark to prepare")
    parser.add_argument("src", type=Path, help="raw download folder (COCO: annotations/val2017 and images/val2017; "
                                               "Cityscapes: gtFine/val and leftImg8bit/val)")
    parser.add_argument("dst", type=Path, help="data root to write into (DST/<benchmark folder>/...)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="convert only the first N samples")
    parser.add_argument("--images", type=Path, default=None, metavar="DIR", help="folder of the raw val images")
    parser.add_argument("--labels", type=Path, default=None, metavar="DIR", help="folder of the raw val label maps")
    parser.add_argument("--copy", action="store_true", help="copy images instead of hard-linking them")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m fsa prepare``; returns the exit code (errors: one line on stderr)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be a positive number of samples")
    bench = BENCHMARKS[args.dataset]
    try:
        src = args.src.expanduser()
        if not src.is_dir():
            raise DatasetError(f"SRC {src} is not a folder")
        plan = plan_cityscapes if args.dataset == "cityscapes" else plan_coco
        jobs = plan(bench, src, args.dst.expanduser(), args.images, args.labels)
        if args.limit is not None:
            jobs = jobs[: args.limit]
        written, skipped = run(jobs, TABLES[args.dataset], copy=args.copy)
    except KeyboardInterrupt:
        print("fsa prepare: interrupted; rerun to resume (finished files are kept)", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        if os.environ.get("FSA_DEBUG"):
            raise
        print(f"fsa prepare: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    print(f"prepare {args.dataset}: done, {len(jobs)} samples in {args.dst / bench.folder} "
          f"({written} written, {skipped} already done)", file=sys.stderr)
    return 0
