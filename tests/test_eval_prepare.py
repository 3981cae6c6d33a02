"""fsa.evaluation.prepare: the raw -> train-id tables against hand-written mappings, and the converter runs."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from _eval_data import COCO_RAW_VALUES, make_raw_cityscapes, make_raw_coco, write_label
from fsa.evaluation import prepare
from fsa.evaluation.datasets import BENCHMARKS, DatasetError, class_names, list_samples, read_label

# COCO-Stuff: raw value = COCO category id - 1. Train ids in the order of mmseg's coco_stuff164k.py
# clsID_to_trID, written from its annotated raw ids (COCO_RAW_VALUES lists them, from COCO's 1-based ids).
STUFF_TRAIN_ID = {raw: train for train, raw in enumerate(COCO_RAW_VALUES[:-1])} | {255: 255}
# COCO-Object (GroupViT's cvt_coco_object.py): things (raw <= 90) -> train id + 1, the rest -> 0.
OBJECT_ID = {raw: (train + 1 if raw <= 90 else 0) for raw, train in STUFF_TRAIN_ID.items()} | {255: 0}
# Cityscapes labels.py: (id, trainId) of the 19 evaluated classes; every other id 0..33 -> 255.
CITYSCAPES_EVAL = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                   26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_TRAIN_ID = {i: CITYSCAPES_EVAL.get(i, 255) for i in range(34)}


def _lookup(raw: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    return np.vectorize(mapping.__getitem__, otypes=[np.uint8])(raw)


def test_coco_stuff_table_by_hand():
    table = prepare.COCO_STUFF_TABLE
    # (raw, train id) read off mmseg's clsID_to_trID: gaps at the unannotated COCO ids.
    for raw, train in ((0, 0), (10, 10), (12, 11), (24, 23), (26, 24), (27, 25), (30, 26), (43, 39), (45, 40),
                       (66, 60), (69, 61), (71, 62), (81, 72), (83, 73), (89, 79), (91, 80), (92, 81), (181, 170),
                       (255, 255)):
        assert table.lut[raw] == train and table.valid[raw]
    for raw in (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90, 182, 200, 254):
        assert not table.valid[raw]
    assert table.valid.sum() == 172
    for raw, train in STUFF_TRAIN_ID.items():
        assert table.lut[raw] == train
    # names line up: COCO id 10 'traffic light' (raw 9), 13 'stop sign', 90 'toothbrush', 92 'banner', 182 'wood'
    names = class_names(BENCHMARKS["coco_stuff"])
    assert [names[table.lut[i - 1]] for i in (10, 13, 90, 92, 182)] == [
        "trafficlight", "stopsign", "toothbrush", "banner", "wood"]


def test_coco_object_table_by_hand():
    table = prepare.COCO_OBJECT_TABLE
    for raw, value in ((0, 1), (2, 3), (12, 12), (89, 80), (91, 0), (150, 0), (181, 0), (255, 0)):
        assert table.lut[raw] == value
    for raw, value in OBJECT_ID.items():
        assert table.lut[raw] == value
    assert np.array_equal(table.valid, prepare.COCO_STUFF_TABLE.valid)
    names = class_names(BENCHMARKS["coco_object"])
    assert [names[table.lut[i - 1]] for i in (1, 10, 13, 90, 92)] == [
        "person", "traffic light", "stop sign", "toothbrush", "background"]


def test_cityscapes_table_by_hand():
    table = prepare.CITYSCAPES_TABLE
    for raw, train in ((0, 255), (6, 255), (7, 0), (9, 255), (18, 255), (24, 11), (26, 13), (29, 255), (33, 18)):
        assert table.lut[raw] == train
    assert [int(table.lut[i]) for i in range(34)] == [CITYSCAPES_TRAIN_ID[i] for i in range(34)]
    assert sorted(int(table.lut[i]) for i in CITYSCAPES_EVAL) == list(range(19))
    assert table.valid[:34].all() and not table.valid[34:].any()
    names = class_names(BENCHMARKS["cityscapes"])
    assert [names[table.lut[i]] for i in (7, 19, 26, 33)] == ["road", "trafficlight", "car", "bicycle"]


def test_tables_are_read_only():
    with pytest.raises(ValueError):
        prepare.COCO_STUFF_TABLE.lut[0] = 3
    with pytest.raises(TypeError):
        prepare.TABLES["x"] = prepare.COCO_STUFF_TABLE


def test_apply_table_names_unexpected_values(tmp_path):
    raw = np.array([[0, 11, 255], [182, 1, 11]], dtype=np.uint8)
    with pytest.raises(DatasetError, match=r"unexpected values 11, 182 in .*x\.png .*stuffthingmaps"):
        prepare.apply_table(raw, prepare.COCO_STUFF_TABLE, tmp_path / "x.png")
    with pytest.raises(DatasetError, match=r"unexpected values 34, 255 .*_gtFine_labelIds"):
        prepare.apply_table(np.array([[34, 255, 7]], dtype=np.uint8), prepare.CITYSCAPES_TABLE)


@pytest.mark.parametrize("name,mapping", [("coco_stuff", STUFF_TRAIN_ID), ("coco_object", OBJECT_ID)])
def test_coco_conversion_end_to_end(tmp_path, capsys, name, mapping):
    src, dst = tmp_path / "raw", tmp_path / "data"
    raws = make_raw_coco(src, n=3)
    assert prepare.main([name, str(src), str(dst)]) == 0
    assert "3/3 (3 written, 0 already done)" in capsys.readouterr().err
    bench = BENCHMARKS[name]
    samples = list_samples(bench, dst)
    assert [s.id for s in samples] == [sample_id for sample_id, _ in raws]
    for sample, (sample_id, raw) in zip(samples, raws):
        assert sample.label.name == f"{sample_id}{bench.label_suffix}"
        with Image.open(sample.label) as image:
            assert image.mode == "L"
        np.testing.assert_array_equal(read_label(sample.label, bench, raw.shape), _lookup(raw, mapping))
        original = src / "images" / "val2017" / f"{sample_id}.jpg"
        assert sample.image.read_bytes() == original.read_bytes()
        assert os.path.samefile(sample.image, original)  # hard link on one file system
    leftovers = [p for p in dst.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_rerun_skips_and_resumes(tmp_path, capsys):
    src, dst = tmp_path / "raw", tmp_path / "data"
    make_raw_coco(src, n=3)
    assert prepare.main(["coco_stuff", str(src), str(dst)]) == 0
    labels = sorted((dst / "coco_stuff164k" / "annotations" / "val2017").iterdir())
    stamps = [p.stat().st_mtime_ns for p in labels]
    labels[1].unlink()
    capsys.readouterr()
    assert prepare.main(["coco_stuff", str(src), str(dst), "--copy"]) == 0
    assert "3/3 (1 written, 2 already done)" in capsys.readouterr().err
    assert labels[0].stat().st_mtime_ns == stamps[0] and labels[2].stat().st_mtime_ns == stamps[2]
    assert labels[1].exists()


def test_limit_converts_a_consistent_subset(tmp_path):
    src, dst = tmp_path / "raw", tmp_path / "data"
    raws = make_raw_coco(src, n=4)
    assert prepare.main(["coco_object", str(src), str(dst), "--limit", "2"]) == 0
    assert [s.id for s in list_samples(BENCHMARKS["coco_object"], dst)] == [i for i, _ in raws[:2]]


def test_copy_mode_copies(tmp_path):
    src, dst = tmp_path / "raw", tmp_path / "data"
    raws = make_raw_coco(src, n=1)
    assert prepare.main(["coco_stuff", str(src), str(dst), "--copy"]) == 0
    image = dst / "coco_stuff164k" / "images" / "val2017" / f"{raws[0][0]}.jpg"
    assert not os.path.samefile(image, src / "images" / "val2017" / f"{raws[0][0]}.jpg")


def test_cityscapes_conversion_end_to_end_and_in_place(tmp_path):
    src, dst = tmp_path / "cityscapes_raw", tmp_path / "data"
    raws = make_raw_cityscapes(src, n=4)
    assert prepare.main(["cityscapes", str(src), str(dst)]) == 0
    bench = BENCHMARKS["cityscapes"]
    samples = list_samples(bench, dst)
    assert [s.id for s in samples] == [sample_id for sample_id, _ in raws]
    for sample, (sample_id, raw) in zip(samples, raws):
        city = sample_id.split("_")[0]
        assert sample.label == dst / "cityscapes" / "gtFine" / "val" / city / f"{sample_id}_gtFine_labelTrainIds.png"
        np.testing.assert_array_equal(read_label(sample.label, bench, raw.shape), _lookup(raw, CITYSCAPES_TRAIN_ID))

    # in place: SRC is DATA_ROOT/cityscapes, train-id maps land beside the labelIds, images stay
    in_place = tmp_path / "root"
    raws = make_raw_cityscapes(in_place / "cityscapes", n=2, seed=1)
    assert prepare.main(["cityscapes", str(in_place / "cityscapes"), str(in_place)]) == 0
    samples = list_samples(bench, in_place)
    assert len(samples) == 2
    np.testing.assert_array_equal(read_label(samples[1].label, bench), _lookup(raws[1][1], CITYSCAPES_TRAIN_ID))
    assert len(list((in_place / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))) == 2


def test_wrong_src_errors(tmp_path, capsys):
    assert prepare.main(["coco_stuff", str(tmp_path / "absent"), str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fsa prepare: error:" in err and str(tmp_path / "absent") in err

    (tmp_path / "empty").mkdir()
    assert prepare.main(["coco_stuff", str(tmp_path / "empty"), str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert "raw val2017 label maps not found" in err and str(tmp_path / "empty" / "annotations" / "val2017") in err

    assert prepare.main(["cityscapes", str(tmp_path / "empty"), str(tmp_path / "data")]) == 1
    assert str(tmp_path / "empty" / "gtFine" / "val") in capsys.readouterr().err

    # raw maps present but no images for them
    src = tmp_path / "noimages"
    raws = make_raw_coco(src, n=2)
    for image in (src / "images" / "val2017").iterdir():
        image.unlink()
    assert prepare.main(["coco_stuff", str(src), str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert "2 of 2 raw label maps have no image" in err and f"{raws[0][0]}.jpg" in err


def test_already_converted_input_is_refused(tmp_path, capsys):
    src, dst = tmp_path / "raw", tmp_path / "data"
    raws = make_raw_coco(src, n=1)
    write_label(src / "annotations" / "val2017" / f"{raws[0][0]}.png", np.array([[11, 25, 3]], dtype=np.uint8))
    assert prepare.main(["coco_stuff", str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert "unexpected values 11, 25" in err and f"{raws[0][0]}.png" in err
    assert not list((dst / "coco_stuff164k" / "annotations").rglob("*.png"))  # nothing half-written


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    raw = tmp_path / "raw.png"
    write_label(raw, np.array([[0, 1]], dtype=np.uint8))
    out = tmp_path / "out" / "x_labelTrainIds.png"

    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        prepare.convert_label(raw, out, prepare.COCO_STUFF_TABLE)
    assert list(out.parent.iterdir()) == []


def test_usage_errors_and_help(capsys):
    with pytest.raises(SystemExit) as info:
        prepare.main(["--help"])
    assert info.value.code == 0 and "stuffthingmaps_trainval2017" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        prepare.main(["ade20k", "a", "b"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        prepare.main(["coco_stuff", "a", "b", "--limit", "0"])
    assert info.value.code == 2 and "--limit must be a positive" in capsys.readouterr().err
