"""fsa.evaluation.datasets: layouts, listing order, label rules, decoding, errors and class-name files."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from _eval_data import make_dataset, voc_palette, write_image, write_label
from fsa.evaluation import datasets as ds
from fsa.evaluation.datasets import (
    BENCHMARKS, DatasetError, class_lines, class_names, get_benchmark, layout_help, list_samples,
    read_image, read_label,
)
from fsa.vocabulary import parse_vocabulary

# Written from the published configs (chi-chi-zx/FSA configs/cfg_*.py), ProxyCLIP custom_datasets.py and
# mmseg 1.x dataset classes: (C, background class, reduce_zero_label, image dir, label dir, label suffix, split).
PUBLISHED = {
    "voc21": (21, True, False, "VOCdevkit/VOC2012/JPEGImages", "VOCdevkit/VOC2012/SegmentationClass", ".png",
              "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"),
    "context60": (60, True, False, "VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/SegmentationClassContext",
                  ".png", "VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt"),
    "coco_object": (81, True, False, "coco_object/images/val2017", "coco_object/annotations/val2017",
                    "_instanceTrainIds.png", None),
    "voc20": (20, False, True, "VOCdevkit/VOC2012/JPEGImages", "VOCdevkit/VOC2012/SegmentationClass", ".png",
              "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"),
    "context59": (59, False, True, "VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/SegmentationClassContext",
                  ".png", "VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt"),
    "coco_stuff": (171, False, False, "coco_stuff164k/images/val2017", "coco_stuff164k/annotations/val2017",
                   "_labelTrainIds.png", None),
    "cityscapes": (19, False, False, "cityscapes/leftImg8bit/val", "cityscapes/gtFine/val",
                   "_gtFine_labelTrainIds.png", None),
    "ade20k": (150, False, True, "ade/ADEChallengeData2016/images/validation",
               "ade/ADEChallengeData2016/annotations/validation", ".png", None),
}


def _label_space(raw: np.ndarray, reduce: bool) -> np.ndarray:
    """Independent statement of mmseg's rule: reduce -> 0 and 255 become 255, others v - 1."""
    raw = raw.astype(np.int64)
    out = np.where((raw == 0) | (raw == 255), 255, raw - 1) if reduce else raw
    return out.astype(np.uint8)


def test_benchmarks_match_the_published_configs():
    assert list(BENCHMARKS) == ["voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff",
                                "cityscapes", "ade20k"]
    for name, (classes, background, reduce, image_dir, label_dir, label_suffix, split) in PUBLISHED.items():
        bench = BENCHMARKS[name]
        assert (bench.name, bench.num_classes, bench.has_background, bench.reduce_zero_label) == (
            name, classes, background, reduce)
        assert f"{bench.folder}/{bench.image_dir}" == image_dir
        assert f"{bench.folder}/{bench.label_dir}" == label_dir
        assert bench.label_suffix == label_suffix
        assert (f"{bench.folder}/{bench.split_file}" if bench.split_file else None) == split
        assert bench.image_suffix == ("_leftImg8bit.png" if name == "cityscapes" else ".jpg")
    assert [BENCHMARKS[n].num_samples for n in BENCHMARKS] == [1449, 5104, 5000, 1449, 5104, 5000, 500, 2000]
    with pytest.raises(TypeError):
        BENCHMARKS["x"] = BENCHMARKS["voc21"]  # read-only


def test_get_benchmark():
    assert get_benchmark(" VOC21 ") is BENCHMARKS["voc21"]
    with pytest.raises(ValueError, match="unknown benchmark 'voc'.*voc21, context60, coco_object"):
        get_benchmark("voc")


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_listing_and_labels_of_every_layout(tmp_path, name):
    bench = BENCHMARKS[name]
    expected = make_dataset(tmp_path, name, n=4)
    samples = list_samples(bench, tmp_path)
    assert [s.id for s in samples] == [sample_id for sample_id, _ in expected]
    for sample, (sample_id, truth) in zip(samples, expected):
        assert sample.image.name == f"{sample_id}{bench.image_suffix}"
        assert sample.label.name == f"{sample_id}{bench.label_suffix}"
        image = read_image(sample.image)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        label = read_label(sample.label, bench, image.shape)
        assert label.dtype == np.uint8 and label.shape == image.shape[:2]
        np.testing.assert_array_equal(label, truth)
        kept = truth[truth != 255]
        assert kept.max() == bench.num_classes - 1 and kept.min() == 0  # the generator's edge values
    # the data root may also be the benchmark folder itself
    assert [s.id for s in list_samples(bench, tmp_path / bench.folder)] == [s.id for s in samples]


def test_split_order_is_kept_and_train_samples_are_not_listed(tmp_path):
    expected = make_dataset(tmp_path, "voc21", n=5, seed=3)
    ids = [s.id for s in list_samples(BENCHMARKS["voc21"], tmp_path)]
    split = BENCHMARKS["voc21"]
    lines = (tmp_path / split.folder / split.split_file).read_text().split()
    assert ids == lines == [sample_id for sample_id, _ in expected]
    assert ids != sorted(ids)
    images = sorted(p.stem for p in (tmp_path / split.folder / split.image_dir).iterdir())
    assert len(images) == 6 and set(images) - set(ids)  # a train-only image exists but is not listed


def test_scan_order_is_sorted_by_path_and_skips_hidden_files(tmp_path):
    bench = BENCHMARKS["cityscapes"]
    make_dataset(tmp_path, "cityscapes", n=4)
    image_dir = tmp_path / bench.folder / bench.image_dir
    (image_dir / "frankfurt" / "._frankfurt_000000_000000_leftImg8bit.png").write_bytes(b"mac resource fork")
    samples = list_samples(bench, tmp_path)
    rel = [s.image.relative_to(image_dir).as_posix() for s in samples]
    assert rel == sorted(rel) and rel[0].startswith("frankfurt/") and len(rel) == 4
    assert samples[0].id == "frankfurt_000000_000000"  # stem without _leftImg8bit
    assert samples[0].label == (tmp_path / bench.folder / bench.label_dir / "frankfurt"
                                / "frankfurt_000000_000000_gtFine_labelTrainIds.png")


@pytest.mark.parametrize("name,reduce", [("voc21", False), ("voc20", True), ("context59", True), ("ade20k", True),
                                         ("context60", False), ("coco_stuff", False)])
def test_label_rule_by_hand(tmp_path, name, reduce):
    bench = BENCHMARKS[name]
    top = bench.num_classes if reduce else bench.num_classes - 1
    raw = np.array([[0, 1, 2, top], [255, 255, 0, 1]], dtype=np.uint8)
    path = tmp_path / "label.png"
    write_label(path, raw, palette=name.startswith("voc"))
    got = read_label(path, bench)
    if reduce:  # written out by hand: 0 -> 255, v -> v - 1, 255 stays 255
        want = [[255, 0, 1, top - 1], [255, 255, 255, 0]]
    else:  # 0 is a scored class (background for voc21 / context60)
        want = [[0, 1, 2, top], [255, 255, 0, 1]]
    np.testing.assert_array_equal(got, np.array(want, dtype=np.uint8))


def test_reduce_zero_label_on_every_value():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(ds.reduce_zero_label(values), _label_space(values, True))
    assert ds.reduce_zero_label(values)[0, 0] == 255 and ds.reduce_zero_label(values)[15, 15] == 255
    assert ds.reduce_zero_label(values)[15, 14] == 253  # 254 -> 253


def test_palette_labels_are_read_as_indices_not_colours(tmp_path):
    path = tmp_path / "voc.png"
    write_label(path, np.array([[1, 15], [0, 255]], dtype=np.uint8), palette=True)
    with Image.open(path) as image:
        assert image.mode == "P" and image.getpalette()[3:6] == [128, 0, 0] == voc_palette()[3:6]
    np.testing.assert_array_equal(read_label(path, BENCHMARKS["voc21"]), [[1, 15], [0, 255]])


def test_images_are_rgb(tmp_path):
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[:, :10] = (255, 0, 0)
    rgb[:, 10:20] = (0, 255, 0)
    rgb[:, 20:] = (0, 0, 255)
    write_image(tmp_path / "a.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)
    write_image(tmp_path / "a.jpg", rgb)
    jpeg = read_image(tmp_path / "a.jpg").astype(int)
    assert np.abs(jpeg[5, 3] - (255, 0, 0)).max() < 12 and np.abs(jpeg[5, 27] - (0, 0, 255)).max() < 12
    Image.fromarray(np.full((7, 9), 77, dtype=np.uint8)).save(tmp_path / "grey.png")
    grey = read_image(tmp_path / "grey.png")
    assert grey.shape == (7, 9, 3) and (grey == 77).all()


def test_unreadable_images_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg" * 10)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path, words in ((garbage, "corrupt"), (empty, "empty"), (tmp_path / "missing.jpg", "cannot read")):
        with pytest.raises(DatasetError, match=words) as info:
            read_image(path)
        assert str(path) in str(info.value)


def test_bad_label_files_name_the_file(tmp_path):
    bench = BENCHMARKS["voc21"]
    good = tmp_path / "good.png"
    write_label(good, np.ones((30, 40), dtype=np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(DatasetError, match="corrupt") as info:
        read_label(truncated, bench)
    assert str(truncated) in str(info.value)
    colour = tmp_path / "colour.png"
    write_image(colour, np.zeros((30, 40, 3), dtype=np.uint8))
    with pytest.raises(DatasetError, match="mode RGB") as info:
        read_label(colour, bench)
    assert str(colour) in str(info.value)
    with pytest.raises(DatasetError, match="not found"):
        read_label(tmp_path / "nope.png", bench)


def test_label_size_must_match_the_image(tmp_path):
    path = tmp_path / "label.png"
    write_label(path, np.zeros((333, 500), dtype=np.uint8))
    assert read_label(path, BENCHMARKS["voc21"], (333, 500, 3)).shape == (333, 500)
    with pytest.raises(DatasetError, match=r"333x500 \(HxW\) but its image is 375x500") as info:
        read_label(path, BENCHMARKS["voc21"], (375, 500, 3))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name,bad,fine", [("voc21", [21, 200], 20), ("voc20", [21], 20), ("ade20k", [151, 254], 150),
                                           ("cityscapes", [19, 33], 18), ("coco_object", [81], 80),
                                           ("coco_stuff", [171, 254], 170), ("context60", [60], 59)])
def test_values_outside_the_classes_are_named(tmp_path, name, bad, fine):
    bench = BENCHMARKS[name]
    path = tmp_path / "label.png"
    write_label(path, np.array([[fine, 255, *bad]], dtype=np.uint8))
    with pytest.raises(DatasetError) as info:
        read_label(path, bench)
    message = str(info.value)
    assert f"values {', '.join(map(str, bad))} outside" in message and str(path) in message
    write_label(path, np.array([[fine, 255, 0]], dtype=np.uint8))
    assert read_label(path, bench).max() == 255  # the top class and 255 are fine


def test_sixteen_bit_labels_within_range_are_accepted(tmp_path):
    path = tmp_path / "label16.png"
    Image.fromarray(np.array([[0, 5], [255, 20]], dtype=np.uint16)).save(path)
    np.testing.assert_array_equal(read_label(path, BENCHMARKS["voc21"]), [[0, 5], [255, 20]])
    Image.fromarray(np.array([[0, 300]], dtype=np.uint16)).save(path)
    with pytest.raises(DatasetError, match=r"values in \[0, 300\]"):
        read_label(path, BENCHMARKS["voc21"])


# -------------------------------------------------------------------------------- missing data


def _message(bench, root) -> str:
    with pytest.raises(DatasetError) as info:
        list_samples(bench, root)
    return str(info.value)


def test_missing_data_root_and_benchmark_folder(tmp_path):
    bench = BENCHMARKS["ade20k"]
    assert str(tmp_path / "nowhere") in _message(bench, tmp_path / "nowhere")
    message = _message(bench, tmp_path)
    assert str(tmp_path / "ade" / "ADEChallengeData2016") in message
    assert "DATA_ROOT/ade/ADEChallengeData2016/{images/validation/<id>.jpg" in message


@pytest.mark.parametrize("name,remove,expect", [
    ("voc21", "image_dir", "image folder"), ("voc20", "label_dir", "label folder"),
    ("context60", "split_file", "split file"), ("coco_stuff", "label_dir", "label folder"),
    ("cityscapes", "image_dir", "image folder")])
def test_missing_folder_or_split_names_the_expected_path(tmp_path, name, remove, expect):
    bench = BENCHMARKS[name]
    make_dataset(tmp_path, name, n=2)
    target = tmp_path / bench.folder / getattr(bench, remove)
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    message = _message(bench, tmp_path)
    assert f"{expect} {target} not found" in message and "expected DATA_ROOT/" in message


def test_image_without_label_names_the_label(tmp_path):
    for name in ("voc21", "ade20k"):
        bench = BENCHMARKS[name]
        expected = make_dataset(tmp_path / name, name, n=3)
        label = tmp_path / name / bench.folder / bench.label_dir / f"{expected[1][0]}{bench.label_suffix}"
        label.unlink()
        message = _message(bench, tmp_path / name)
        assert "1 of 3 images have no label" in message and str(label) in message


def test_split_id_without_image_and_label_without_image(tmp_path):
    bench = BENCHMARKS["voc20"]
    expected = make_dataset(tmp_path / "voc", "voc20", n=3)
    image = tmp_path / "voc" / bench.folder / bench.image_dir / f"{expected[0][0]}.jpg"
    image.unlink()
    message = _message(bench, tmp_path / "voc")
    assert "1 of 3 images are missing" in message and str(image) in message

    bench = BENCHMARKS["coco_object"]
    expected = make_dataset(tmp_path / "coco", "coco_object", n=3)
    image = tmp_path / "coco" / bench.folder / bench.image_dir / f"{expected[2][0]}.jpg"
    image.unlink()
    label = tmp_path / "coco" / bench.folder / bench.label_dir / f"{expected[2][0]}_instanceTrainIds.png"
    message = _message(bench, tmp_path / "coco")
    assert "labels have no image" in message and str(label) in message


def test_empty_image_folder_and_split(tmp_path):
    bench = BENCHMARKS["ade20k"]
    for sub in (bench.image_dir, bench.label_dir):
        (tmp_path / bench.folder / sub).mkdir(parents=True)
    assert "no *.jpg images under" in _message(bench, tmp_path)
    bench = BENCHMARKS["voc21"]
    make_dataset(tmp_path, "voc21", n=1)
    (tmp_path / bench.folder / bench.split_file).write_text("\n\n")
    assert "lists no ids" in _message(bench, tmp_path)


def test_layout_help_lists_every_path():
    for bench in BENCHMARKS.values():
        text = layout_help(bench)
        assert text.count("\n") >= 4 and bench.title in text and bench.folder in text
        assert f"{bench.label_dir}/" in text and bench.label_suffix in text
        if bench.split_file:
            assert bench.split_file in text
    assert "leftImg8bit/val/<city>/<id>_leftImg8bit.png" in layout_help(BENCHMARKS["cityscapes"])
    assert "ImageSets/SegmentationContext/val.txt" in layout_help(BENCHMARKS["context59"])


# ---------------------------------------------------------------------------------- class names


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_shipped_names_parse_and_count(name):
    bench = BENCHMARKS[name]
    lines = class_lines(bench)
    assert len(lines) == bench.num_classes
    text = ds.names_path(bench).read_text()
    assert len([line for line in text.splitlines() if line.strip()]) == bench.num_classes
    if name == "coco_object":  # as published, `bed` stands in the background line and as class 60
        with pytest.raises(ValueError, match="two classes"):
            parse_vocabulary(["; ".join(synonyms) for synonyms in lines])
    else:
        assert parse_vocabulary(["; ".join(synonyms) for synonyms in lines]).classes == tuple(lines)
    names = class_names(bench)
    assert len(names) == bench.num_classes and (names[0] == "background") == bench.has_background


def test_published_names_spot_checks():
    voc21 = class_lines(BENCHMARKS["voc21"])
    assert voc21[0][:3] == ("sky", "wall", "tree") and voc21[0][-1] == "fence" and len(voc21[0]) == 26
    assert [c[0] for c in voc21[1:5]] == ["aeroplane", "bicycle", "bird", "ship"] and voc21[20] == ("tvmonitor",)
    assert class_lines(BENCHMARKS["voc20"]) == voc21[1:]
    coco_object = class_lines(BENCHMARKS["coco_object"])
    assert coco_object[0][11] == "bed" and coco_object[60] == ("bed",) and len(coco_object[0]) == 17
    assert coco_object[10] == ("traffic light",) and coco_object[80] == ("toothbrush",)
    context60 = class_lines(BENCHMARKS["context60"])
    assert context60[0] == ("background",) and context60[1:] == class_lines(BENCHMARKS["context59"])
    assert context60[59] == ("wood",)
    stuff = class_names(BENCHMARKS["coco_stuff"])
    assert stuff[9] == "trafficlight" and stuff[80] == "banner" and stuff[170] == "wood"
    assert all(" " not in n for n in stuff + class_names(BENCHMARKS["ade20k"]) + class_names(BENCHMARKS["cityscapes"]))
    assert class_names(BENCHMARKS["cityscapes"])[6:8] == ["trafficlight", "trafficsign"]
    ade = class_names(BENCHMARKS["ade20k"])
    assert ade[:3] == ["wall", "building", "sky"] and ade[44] == "chestofdrawers" and ade[149] == "flag"
    # the background classes carry no "background" synonym in the published VOC/COCO files
    assert parse_vocabulary(["; ".join(c) for c in voc21]).background_index is None
    assert class_names(BENCHMARKS["voc21"])[0] == "background"


def test_names_file_override_and_errors(tmp_path):
    bench = BENCHMARKS["cityscapes"]
    mine = tmp_path / "mine.txt"
    mine.write_text("\n".join(["road; street"] + [f"class{i}" for i in range(1, 19)]) + "\n\n")
    lines = class_lines(bench, mine)
    assert lines[0] == ("road", "street") and len(lines) == 19
    assert class_names(bench, mine)[0] == "road"

    mine.write_text("road\nsidewalk\n")
    with pytest.raises(DatasetError, match="has 2 classes .* Cityscapes \\(19\\) has 19") as info:
        class_lines(bench, mine)
    assert str(mine) in str(info.value)
    mine.write_text("\n".join(["road, street"] + [f"class{i}" for i in range(1, 19)]))
    with pytest.raises(DatasetError, match="line 1 .* has a ','"):
        class_lines(bench, mine)
    mine.write_text("\n".join(["road; car"] + [f"class{i}" for i in range(1, 18)] + ["car"]))
    assert class_lines(bench, mine)[18] == ("car",)  # a name in two classes is kept, as published files do
    mine.write_text("\n".join(["road"] + [f"class{i}" for i in range(1, 18)] + [" ; ;"]))
    with pytest.raises(DatasetError, match="line 19 has no name") as info:
        class_lines(bench, mine)
    assert str(mine) in str(info.value)
    with pytest.raises(DatasetError, match="cannot read class-name file"):
        class_lines(bench, tmp_path / "absent.txt")
