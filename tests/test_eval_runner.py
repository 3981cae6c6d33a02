"""The evaluation harness end to end on generated datasets and the tiny model."""
import json

import numpy as np
import pytest
from PIL import Image

import fsa
from _confusion import confusion, reference_scores
from fsa.evaluation import datasets
from fsa.evaluation.records import RecordError
from fsa.evaluation.runner import Evaluator, evaluate
from tests._eval_data import FAST, SMALL_SIZES, make_dataset, run_cli, same_scores

@pytest.fixture(scope="module")
def cache():
    return fsa.ModelCache()


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    truth = make_dataset(root, "voc21", n=4, sizes=SMALL_SIZES, seed=1)
    make_dataset(root, "voc20", n=4, sizes=SMALL_SIZES, seed=1)  # the same files: voc20 reads them reduced
    return root, truth


@pytest.mark.parametrize("method", ["clearclip", "sclip", "proxyclip"])
def test_saved_predictions_rescored_give_the_reported_numbers(voc, tmp_path, cache, method):
    root, truth = voc
    res = evaluate("voc21", root, method, save_predictions=tmp_path / "pred", output=tmp_path / "out", cache=cache,
                   **FAST)
    assert res.images == 4 and res.fsa is not None
    for key, scores in (("baseline", res.baseline), ("fsa", res.fsa)):
        preds = [np.array(Image.open(tmp_path / "pred" / key / f"{i}.png")) for i, _ in truth]
        assert all(p.shape == t.shape for p, (_, t) in zip(preds, truth))  # original size, single channel
        assert scores.miou == pytest.approx(reference_scores(confusion(preds, [t for _, t in truth], 21))[0],
                                            abs=1e-9)
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["images"] == 4 and saved["baseline"]["mIoU"] == round(res.baseline.miou, 2)
    assert set(saved["fsa"]["per_class"]) == set(datasets.class_names(datasets.get_benchmark("voc21")))


def test_predictions_are_the_segmenters(voc, tmp_path, cache):
    """One pipeline: the harness labels equal `Segmenter.compare` on the same image and settings."""
    root, truth = voc
    evaluate("voc20", root, "clearclip", save_predictions=tmp_path, cache=cache, **FAST)
    names = datasets.class_lines(datasets.get_benchmark("voc20"))
    seg = fsa.Segmenter("tiny-test", cache=cache)
    sample = datasets.list_samples(datasets.get_benchmark("voc20"), root)[0]
    rgb = datasets.read_image(sample.image)
    pair = seg.compare(rgb, ["; ".join(n) for n in names],
                       fsa.SegmentSettings(method="clearclip", short_side=64, crop=448, stride=224, logit_scale=50.0))
    assert np.array_equal(np.array(Image.open(tmp_path / "baseline" / f"{sample.id}.png")), pair.baseline.labels)
    assert np.array_equal(np.array(Image.open(tmp_path / "fsa" / f"{sample.id}.png")), pair.fsa.labels)


def test_probability_threshold_only_where_there_is_a_background(voc, cache):
    root, _ = voc
    plain = evaluate("voc20", root, "clearclip", cache=cache, fsa=False, **FAST)
    thresholded = evaluate("voc20", root, "clearclip", cache=cache, fsa=False, prob_thd=0.99, **FAST)
    assert same_scores(thresholded.baseline, plain.baseline)  # voc20 has no background class
    voc21 = evaluate("voc21", root, "clearclip", cache=cache, fsa=False, prob_thd=0.99, **FAST)
    # the tiny model is never 99 % sure: every pixel becomes background (0), so only class 0 has area
    assert voc21.baseline.iou[1:] == tuple(0.0 if not np.isnan(v) else v for v in voc21.baseline.iou[1:])
    # ClearCLIP's VOC21 preset already has prob_thd=0.5 (all background with the tiny model too), so the
    # 0.99 run alone would pass with the argument ignored: with 0.0, other classes get area and score
    none = evaluate("voc21", root, "clearclip", cache=cache, fsa=False, prob_thd=0.0, **FAST)
    assert not same_scores(none.baseline, voc21.baseline)
    assert sum(v > 0 for v in none.baseline.iou[1:]) >= 2, none.baseline.iou


#: A sweep of four FSA settings, for the runs that score a grid instead of one setting.
SWEEP = (("lam", (1, 5)), ("similarity", ("kl", "js")))


@pytest.mark.parametrize("sweep", [(), SWEEP], ids=["one_setting", "sweep"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(voc, tmp_path, cache, monkeypatch, sweep):
    root, _ = voc

    def run(**kw):
        return evaluate("voc21", root, "naclip", cache=cache, **{"sweep": sweep, **FAST, **kw})

    full = run()

    def stop_after_two(done, total, image_id):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(output=tmp_path, on_image=stop_after_two)
    part = next((tmp_path / "records").glob("*.jsonl"))
    lines = [json.loads(line) for line in part.read_text().splitlines()]
    assert len(lines) == 2 and all(set(r) == {"id", "baseline", *(full.sweep or ["fsa"])} for r in lines), lines
    with open(part, "a") as handle:
        handle.write('{"id": "torn by a kill", "baseline": [[1, 2')  # a write cut short
    computed = []
    real = Evaluator.predict

    def counting(self, rgb, *args):
        computed.append(rgb.shape)
        return real(self, rgb, *args)

    monkeypatch.setattr(Evaluator, "predict", counting)
    resumed = run(output=tmp_path, resume=True)
    assert len(computed) == 2  # only the two images the killed run had not scored
    assert resumed.images == 4 and same_scores(resumed.baseline, full.baseline)
    if not sweep:
        assert same_scores(resumed.fsa, full.fsa)
        with pytest.raises(RecordError, match="other settings"):
            run(output=tmp_path, resume=True, p=0.3)
        return
    assert resumed.sweep.keys() == full.sweep.keys() and all(same_scores(resumed.sweep[k], full.sweep[k])
                                                             for k in full.sweep)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert [row["key"] for row in saved["sweep"]] == list(full.sweep)
    for other in ((("lam", (1, 5)),), (("lam", (1, 5)), ("similarity", ("kl", "sym_kl"))), ()):
        with pytest.raises(RecordError, match="sweep"):
            run(output=tmp_path, resume=True, sweep=other)


def test_bad_data_stops_with_the_file_name_or_is_skipped(tmp_path, cache):
    truth = make_dataset(tmp_path, "voc21", n=4, sizes=SMALL_SIZES, seed=2)
    bench = datasets.get_benchmark("voc21")
    samples = datasets.list_samples(bench, tmp_path)
    samples[1].image.write_bytes(b"not a jpeg at all")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(samples[2].label)  # another size than its image
    with pytest.raises(datasets.DatasetError, match=samples[1].image.name):
        evaluate("voc21", tmp_path, "clearclip", cache=cache, **FAST)
    res = evaluate("voc21", tmp_path, "clearclip", cache=cache, skip_bad=True, output=tmp_path / "out", **FAST)
    assert res.images == 2
    assert [i for i, _ in res.skipped] == sorted([samples[1].id, samples[2].id])
    assert "skipped" in json.loads((tmp_path / "out" / "result.json").read_text())


def test_missing_data_names_the_expected_path(tmp_path):
    with pytest.raises(datasets.DatasetError, match="VOC2012"):
        evaluate("voc21", tmp_path, "clearclip", **FAST)


def test_cli_errors_are_one_line(tmp_path):
    out = run_cli(["evaluate", "voc21", "--data-root", str(tmp_path), "--method", "clearclip"])
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "VOC2012" in out.stderr
    out = run_cli(["evaluate", "--all", "--data-root", str(tmp_path)])
    assert out.returncode == 1 and "missing" in out.stderr and "ade" in out.stderr.lower()
    out = run_cli(["evaluate", "voc21", "--data-root", str(tmp_path), "--lam", "nan"])
    assert out.returncode == 1
    out = run_cli(["evaluate", "--data-root", str(tmp_path)])
    assert out.returncode == 2 and "BENCHMARK" in out.stderr
