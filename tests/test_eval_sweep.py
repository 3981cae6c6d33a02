"""Ablation sweeps: many FSA settings from one encoder pass, scored like separate evaluations.

- `compute_sweep_logits`: each output bit for bit its own `compute_patch_logits` call (several
  methods, mixed similarity / iterations / blocks / switches, GCLIP's re-run on a 12-block tower),
  the encoder run once (hooks);
- `window_cosines(feedbacks=...)`: each key equal to its own call;
- the evaluator: per-setting scores equal separate evaluations (also when FSA's preset has other
  windows and another decision), one encoder pass per window for all settings, the settings
  fingerprint (resume after a kill, with and without a sweep: test_eval_runner);
- the command line: the ablation table (.md/.csv) against the JSON, the suite's one torchrun run
  (two gloo processes = one process, every image scored once), and one-line errors before any
  model loads.
"""
from __future__ import annotations

import csv
import json
import re

import pytest
import torch
import torch.nn.functional as F

from _fixtures_ref import _single_thread  # noqa: F401  (autouse fixture)
from _fixtures_ref import deep_model, ref_inputs  # noqa: F401  (fixtures)

import fsa
import fsa.logits
from fsa.config import FeedbackConfig, MethodOptions
from fsa.evaluation import datasets, presets
from fsa.evaluation.runner import EvalConfig, Evaluator, evaluate
from fsa.evaluation.sweep import SweepError, normalize_sweep, parse_sweep_option, sweep_grid
from fsa.inference import window_cosines
from fsa.logits import compute_patch_logits, compute_sweep_logits
from tests._eval_data import FAST, SMALL_SIZES, make_dataset, run_cli, same_scores

NOT_PROXY = tuple(m for m in fsa.METHODS if m != "proxyclip")


# ---------------------------------------------------------------------------------------------
# the network: compute_sweep_logits
# ---------------------------------------------------------------------------------------------

#: 4-block tower: first re-run blocks 1 (none), 2, 3; the last block alone; switches and λ/p.
MIXED = [
    FeedbackConfig(),
    FeedbackConfig(similarity="js"),
    FeedbackConfig(iterations=2),
    FeedbackConfig(blocks=(3, 4)),
    FeedbackConfig(blocks=(2, 4), similarity="js", iterations=2),
    FeedbackConfig(blocks=(3,)),
    FeedbackConfig(lam=5.0, p=0.3, isolation=False),
    FeedbackConfig(blocks=(3, 4), ensemble=False, similarity="sym_kl"),
    FeedbackConfig(blocks=(4,), pruning=False),
]
PROXY_MIXED = [FeedbackConfig(), FeedbackConfig(similarity="js"), FeedbackConfig(iterations=2),
               FeedbackConfig(blocks=(4,), isolation=False), FeedbackConfig(lam=1.0, p=1.0, pruning=False)]


class _Calls:
    """Forward calls (and images) of the patch embedding (the encoder's entry) and of block 1."""

    def __init__(self, model):
        self.embed = self.block1 = self.images = 0
        visual = model.visual
        self._hooks = [visual.conv1.register_forward_hook(self._on_embed),
                       visual.transformer.resblocks[0].register_forward_hook(self._on_block1)]

    def _on_embed(self, module, args, out):
        self.embed += 1
        self.images += args[0].shape[0]

    def _on_block1(self, module, args, out):
        self.block1 += 1

    def close(self):
        for hook in self._hooks:
            hook.remove()


def _check_sweep(model, inp, method, feedbacks, proxy=None):
    calls = _Calls(model)
    try:
        got = compute_sweep_logits(model, inp.pixels, inp.text, method, feedbacks, proxy_features=proxy)
    finally:
        calls.close()
    assert (calls.embed, calls.block1) == (1, 1), "the encoder (and block 1) must run once for every setting"
    assert len(got.fsa) == len(feedbacks)
    plain = compute_patch_logits(model, inp.pixels, inp.text, method, proxy_features=proxy)
    assert torch.equal(got.baseline, plain.baseline) and got.grid == plain.grid
    for cfg, fsa_map in zip(feedbacks, got.fsa):
        alone = compute_patch_logits(model, inp.pixels, inp.text, method, feedback=cfg, proxy_features=proxy)
        assert torch.equal(fsa_map, alone.fsa), cfg
        assert torch.equal(got.baseline, alone.baseline)
    # non-vacuity: the settings give different maps
    assert len({tuple(m.flatten()[:50].tolist()) for m in got.fsa}) == len(feedbacks)
    return got


@pytest.mark.parametrize("method", NOT_PROXY)
def test_sweep_equals_each_setting_alone(golden_model, ref_inputs, method):
    _check_sweep(golden_model, ref_inputs["batch2"], method, MIXED)


def test_sweep_proxyclip(golden_model, ref_inputs):
    inp = ref_inputs["nonsquare"]
    _check_sweep(golden_model, inp, "proxyclip", PROXY_MIXED, proxy=inp.proxy)


def test_sweep_gclip_on_a_deep_tower(deep_model, ref_inputs):
    """12 blocks: the cuts (6, 7, 10 before blocks 7, 8, 11) fall around GCLIP's fusion blocks 7, 8."""
    feedbacks = [FeedbackConfig(), FeedbackConfig(blocks=(11, 12)), FeedbackConfig(blocks=(8, 12)),
                 FeedbackConfig(blocks=(7, 10)), FeedbackConfig(blocks=(11, 12), iterations=2, similarity="js")]
    _check_sweep(deep_model, ref_inputs["batch2"], "gclip", feedbacks)


def test_the_hooks_count_separate_runs(golden_model, ref_inputs):
    """Sanity of the counter: separate calls run the encoder once each."""
    inp = ref_inputs["batch2"]
    calls = _Calls(golden_model)
    try:
        for cfg in MIXED[:3]:
            compute_patch_logits(golden_model, inp.pixels, inp.text, "clearclip", feedback=cfg)
    finally:
        calls.close()
    assert (calls.embed, calls.block1, calls.images) == (3, 3, 6)


def test_sweep_checks_every_setting_before_any_work(golden_model, ref_inputs):
    inp = ref_inputs["nonsquare"]
    calls = _Calls(golden_model)
    try:
        with pytest.raises(ValueError, match="outside 1..4"):
            compute_sweep_logits(golden_model, inp.pixels, inp.text, "clearclip",
                                 [FeedbackConfig(), FeedbackConfig(blocks=(3, 5))])
        with pytest.raises(ValueError, match="proxyclip.*last block"):
            compute_sweep_logits(golden_model, inp.pixels, inp.text, "proxyclip",
                                 [FeedbackConfig(), FeedbackConfig(blocks=(3, 4))], proxy_features=inp.proxy)
    finally:
        calls.close()
    assert calls.embed == 0
    empty = compute_sweep_logits(golden_model, inp.pixels, inp.text, "naclip", [])
    assert empty.fsa == [] and torch.equal(
        empty.baseline, compute_patch_logits(golden_model, inp.pixels, inp.text, "naclip").baseline)


# ---------------------------------------------------------------------------------------------
# windows: window_cosines(feedbacks=...)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip():
    return fsa.Segmenter("tiny-test", device="cpu").load()


def test_window_cosines_with_several_settings(clip):
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 40, 72)
    text = F.normalize(torch.randn(5, clip.model.visual.output_dim), dim=-1)
    common = dict(options=MethodOptions(), crop=48, stride=32, pad_multiple=16, window_batch=1)
    settings = {"paper": FeedbackConfig(), "js2": FeedbackConfig(similarity="js", iterations=2),
                "rerun": FeedbackConfig(blocks=(3, 4), lam=5.0)}
    got = window_cosines(clip.model, pixels, text, "clearclip", feedbacks=settings, **common)
    assert list(got.maps) == ["baseline", "paper", "js2", "rerun"] and len(got.windows) == 2
    for key, cfg in settings.items():
        alone = window_cosines(clip.model, pixels, text, "clearclip", feedback=cfg, **common)
        assert torch.equal(got.maps[key], alone.maps["fsa"]), key
        assert torch.equal(got.maps["baseline"], alone.maps["baseline"])
    one = window_cosines(clip.model, pixels, text, "clearclip", feedbacks={"fsa": FeedbackConfig()}, **common)
    old = window_cosines(clip.model, pixels, text, "clearclip", feedback=FeedbackConfig(), **common)
    assert one.maps.keys() == old.maps.keys() and all(torch.equal(one.maps[k], old.maps[k]) for k in one.maps)
    none = window_cosines(clip.model, pixels, text, "clearclip", feedbacks={}, **common)
    assert list(none.maps) == ["baseline"] and torch.equal(none.maps["baseline"], old.maps["baseline"])


def test_window_cosines_setting_errors(clip):
    pixels = torch.zeros(1, 3, 32, 32)
    text = F.normalize(torch.ones(2, clip.model.visual.output_dim), dim=-1)
    common = dict(options=MethodOptions(), crop=0, stride=1, pad_multiple=16)
    with pytest.raises(ValueError, match="not both"):
        window_cosines(clip.model, pixels, text, "clearclip", feedback=FeedbackConfig(),
                       feedbacks={"a": FeedbackConfig()}, **common)
    with pytest.raises(ValueError, match='"baseline" is the key'):
        window_cosines(clip.model, pixels, text, "clearclip", feedbacks={"baseline": FeedbackConfig()}, **common)
    with pytest.raises(ValueError, match="keep_details needs one FSA setting"):
        window_cosines(clip.model, pixels, text, "clearclip", keep_details=True,
                       feedbacks={"a": FeedbackConfig(), "b": FeedbackConfig(lam=1.0)}, **common)


# ---------------------------------------------------------------------------------------------
# sweep axes and grid
# ---------------------------------------------------------------------------------------------

def test_grid_is_the_cartesian_product_on_the_runs_settings():
    sweep = normalize_sweep([("lam", ["1", 2.5]), ("blocks", ["last", "11+12", 12]), ("isolation", ["off"])])
    points = sweep_grid(FeedbackConfig(lam=3.0, p=0.3), sweep, depth=12, method="clearclip")
    assert [p.key for p in points] == [
        "fsa[lam=1,blocks=last,isolation=off]", "fsa[lam=1,blocks=11+12,isolation=off]",
        "fsa[lam=1,blocks=12,isolation=off]", "fsa[lam=2.5,blocks=last,isolation=off]",
        "fsa[lam=2.5,blocks=11+12,isolation=off]", "fsa[lam=2.5,blocks=12,isolation=off]"]
    assert points[1].feedback == FeedbackConfig(lam=1.0, p=0.3, blocks=(11, 12), isolation=False)
    assert [p.beyond_paper(12) for p in points[:3]] == [False, True, False]
    assert points[1].setting() == {"lam": 1.0, "blocks": "11+12", "isolation": False}
    assert parse_sweep_option("similarity=kl, js") == ("similarity", ("kl", "js"))
    assert parse_sweep_option("iterations=1,3") == ("iterations", (1, 3))
    assert FeedbackConfig(similarity="js").similarity == sweep_grid(
        FeedbackConfig(), normalize_sweep([("similarity", ["js"])]))[0].feedback.similarity


@pytest.mark.parametrize("text,match", [
    ("lam", "NAME=V1,V2"), ("foo=1", "unknown sweep axis 'foo'"), ("lam=x", "finite number"),
    ("lam=inf", "finite number"), ("p=0", r"in \(0, 1\]"), ("p=1.5", r"in \(0, 1\]"),
    ("iterations=0", "integer >= 1"), ("iterations=1.5", "integer >= 1"), ("similarity=cos", "one of kl"),
    ("blocks=0", "block numbers"), ("blocks=11+11", "each once"), ("blocks=a", "block numbers"),
    ("isolation=yes", "on or off"), ("lam=1,1.0", "twice"), ("lam=1,,2", "empty value"), ("lam=", "empty value"),
])
def test_bad_sweep_options(text, match):
    with pytest.raises(SweepError, match=match):
        parse_sweep_option(text)


def test_sweep_config_errors(tmp_path):
    with pytest.raises(ValueError, match="needs FSA on"):
        EvalConfig("voc21", tmp_path, sweep=(("lam", (1,)),), fsa=False)
    with pytest.raises(ValueError, match="given twice"):
        EvalConfig("voc21", tmp_path, sweep=(("lam", (1,)), ("lam", (2,))))
    with pytest.raises(ValueError, match="unknown sweep axis"):
        EvalConfig("voc21", tmp_path, sweep=(("gamma", (1,)),))
    assert EvalConfig("voc21", tmp_path, sweep=[("p", [0.3])]).sweep == (("p", (0.3,)),)


# ---------------------------------------------------------------------------------------------
# the evaluator
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache():
    return fsa.ModelCache()


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, "voc21", n=4, sizes=SMALL_SIZES, seed=1)
    return root


@pytest.fixture
def encoder_images(monkeypatch):
    """Images through the patch embedding, across every forward pass of the evaluations."""
    seen = []
    real = fsa.logits.embed_tokens

    def counting(visual, pixels):
        seen.append(pixels.shape[0])
        return real(visual, pixels)

    monkeypatch.setattr(fsa.logits, "embed_tokens", counting)
    return seen


def test_sweep_scores_equal_separate_evaluations(voc, cache, encoder_images, tmp_path):
    grid = evaluate("voc21", voc, "clearclip", cache=cache, sweep=(("lam", (1, 5)), ("p", (0.3, 1.0))),
                    save_predictions=tmp_path / "pred", **FAST)
    n_sweep = sum(encoder_images)
    assert grid.fsa is None and list(grid.sweep) == [
        "fsa[lam=1,p=0.3]", "fsa[lam=1,p=1]", "fsa[lam=5,p=0.3]", "fsa[lam=5,p=1]"]
    encoder_images.clear()
    for lam in (1, 5):
        for p in (0.3, 1.0):
            alone = evaluate("voc21", voc, "clearclip", cache=cache, lam=lam, p=p, **FAST)
            assert same_scores(grid.sweep[f"fsa[lam={lam},p={p:g}]"], alone.fsa), (lam, p)
            assert same_scores(grid.baseline, alone.baseline)
            if (lam, p) == (1, 0.3):
                n_single = sum(encoder_images)
    assert n_sweep == n_single > 0, "one encoder pass per window serves the baseline and every setting"
    assert len({grid.sweep[k].miou for k in grid.sweep}) > 1  # the settings differ
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["baseline", *sorted(grid.sweep)]
    data = grid.to_json()
    assert [row["key"] for row in data["sweep"]] == list(grid.sweep)
    assert data["sweep"][1]["setting"] == {"lam": 1.0, "p": 1.0} and data["fsa"] is None
    assert data["sweep"][1]["mIoU_delta"] == round(grid.sweep["fsa[lam=1,p=1]"].miou - grid.baseline.miou, 2)
    assert [s["key"] for s in grid.settings["sweep"]] == list(grid.sweep)
    assert grid.settings["sweep"][2]["feedback"] == {**grid.settings["feedback"], "lam": 5.0, "p": 0.3}


def test_switches_in_a_sweep_equal_one_setting_sweeps(voc, cache):
    """similarity / iterations / blocks have no single-evaluation option: a one-point sweep runs them
    through the single-setting path (compute_patch_logits), the grid through compute_sweep_logits."""
    sweep = (("similarity", ("kl", "js")), ("iterations", (1, 2)), ("blocks", ("last", "3+4")))
    grid = evaluate("voc21", voc, "clearclip", cache=cache, sweep=sweep, limit=2, **FAST)
    assert len(grid.sweep) == 8
    assert grid.beyond_paper == tuple(k for k in grid.sweep if k != "fsa[similarity=kl,iterations=1,blocks=last]")
    for key in ("fsa[similarity=js,iterations=1,blocks=last]", "fsa[similarity=kl,iterations=2,blocks=3+4]"):
        values = dict(item.split("=") for item in key[4:-1].split(","))
        one = evaluate("voc21", voc, "clearclip", cache=cache, limit=2,
                       sweep=tuple((axis, (value,)) for axis, value in values.items()), **FAST)
        assert same_scores(one.sweep[key], grid.sweep[key]) and same_scores(one.baseline, grid.baseline)
    paper = evaluate("voc21", voc, "clearclip", cache=cache, limit=2, **FAST)
    assert same_scores(grid.sweep["fsa[similarity=kl,iterations=1,blocks=last]"], paper.fsa)


def test_fsa_preset_with_other_windows_and_decision(voc, cache, encoder_images, monkeypatch):
    """Where FSA's published preset differs from the baseline's (windows and decision), every sweep
    setting uses FSA's: baseline pass + one pass for all settings."""
    monkeypatch.setitem(presets.FSA_CHANGES, ("clearclip", "voc21"),
                        dict(crop=48, stride=32, logit_scale=20.0, prob_thd=0.2, source="test"))
    grid = evaluate("voc21", voc, "clearclip", cache=cache, sweep=(("lam", (1, 5)), ("pruning", ("on", "off"))),
                    **FAST)
    n_sweep = sum(encoder_images)
    encoder_images.clear()
    base = evaluate("voc21", voc, "clearclip", cache=cache, fsa=False, **FAST)
    n_base = sum(encoder_images)
    encoder_images.clear()
    alone = evaluate("voc21", voc, "clearclip", cache=cache, lam=5, **FAST)
    assert n_sweep == sum(encoder_images) > n_base > 0
    assert same_scores(grid.sweep["fsa[lam=5,pruning=on]"], alone.fsa) and same_scores(grid.baseline, base.baseline)
    assert same_scores(grid.baseline, alone.baseline)
    monkeypatch.delitem(presets.FSA_CHANGES, ("clearclip", "voc21"))
    plain = evaluate("voc21", voc, "clearclip", cache=cache, lam=5, **FAST)
    assert not same_scores(plain.fsa, alone.fsa), "the FSA preset must matter in this test"


def test_blocks_outside_the_tower_fail_before_any_model_loads(voc):
    fresh = fsa.ModelCache()
    with pytest.raises(SweepError, match=r"fsa\[blocks=5\].*outside 1..4"):
        evaluate("voc21", voc, "clearclip", cache=fresh, sweep=(("blocks", ("last", 5)),), **FAST)
    with pytest.raises(SweepError, match="proxyclip"):
        evaluate("voc21", voc, "proxyclip", cache=fresh, sweep=(("blocks", ("3+4",)),), **FAST)
    assert fresh.keys() == []


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------

def test_cli_writes_the_ablation_table_and_torchrun_agrees(voc, tmp_path):
    common = ["evaluate", "voc21", "--data-root", str(voc), "--method", "clearclip", "--short-side", "64",
              "--no-progress", "--sweep", "lam=1,5", "--sweep", "blocks=last,3+4"]
    one = run_cli(common + ["--json", str(tmp_path / "one.json"), "--output", str(tmp_path / "o1")])
    assert one.returncode == 0, one.stderr
    assert "mIoU" in one.stdout and "random weights" in one.stdout
    data = json.loads((tmp_path / "one.json").read_text())
    keys = ["fsa[lam=1,blocks=last]", "fsa[lam=1,blocks=3+4]", "fsa[lam=5,blocks=last]", "fsa[lam=5,blocks=3+4]"]
    assert [row["key"] for row in data["sweep"]] == keys
    assert [row["beyond_paper"] for row in data["sweep"]] == [False, True, False, True]

    table = (tmp_path / "o1" / "ablation.md").read_text()
    assert table.strip() in one.stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| setting")]
    assert len(rows) == 5 and rows[0].startswith("| ClearCLIP (baseline) | ")
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert cells[0][1] == f"{data['baseline']['mIoU']:.2f}" and cells[0][4] == ""
    for cell, row in zip(cells[1:], data["sweep"]):
        assert cell[0].startswith("+ FSA lam=") and cell[0].endswith("(beyond the paper)") == row["beyond_paper"]
        assert cell[1] == f"{row['scores']['mIoU']:.2f}" and cell[2] == f"{row['scores']['aAcc']:.2f}"

    with open(tmp_path / "o1" / "ablation.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert [r["key"] for r in records] == ["baseline", *keys]
    assert [r["lam"] for r in records] == ["", "1.0", "1.0", "5.0", "5.0"]
    assert [r["blocks"] for r in records] == ["", "last", "3+4", "last", "3+4"]
    base = float(records[0]["mIoU"])
    for record, row in zip(records[1:], data["sweep"]):
        assert round(float(record["mIoU"]), 2) == row["scores"]["mIoU"]
        assert float(record["delta_mIoU"]) == pytest.approx(float(record["mIoU"]) - base, abs=1e-12)
        assert record["beyond_paper"] == str(row["beyond_paper"])

    two = run_cli(common + ["--json", str(tmp_path / "two.json"), "--output", str(tmp_path / "o2")], torchrun=2)
    assert two.returncode == 0, two.stderr
    assert json.loads((tmp_path / "two.json").read_text()) == data
    assert (tmp_path / "o2" / "ablation.md").read_text() == table
    parts = sorted(p.name for p in (tmp_path / "o2" / "records").glob("*.jsonl"))
    assert parts == ["part-0-of-2.jsonl", "part-1-of-2.jsonl"]  # each rank scored its own shard
    ids = [json.loads(line)["id"] for p in parts for line in (tmp_path / "o2" / "records" / p).read_text().splitlines()]
    assert sorted(ids) == sorted(s.id for s in datasets.list_samples(datasets.get_benchmark("voc21"), voc))


@pytest.mark.parametrize("args,match", [
    (["--sweep", "lam=abc"], "finite number"),
    (["--sweep", "gamma=1"], "unknown sweep axis"),
    (["--sweep", "p=0"], r"in \(0, 1\]"),
    (["--sweep", "iterations=0"], "integer >= 1"),
    (["--sweep", "similarity=cos"], "one of kl"),
    (["--sweep", "isolation=maybe"], "on or off"),
    (["--sweep", "blocks=5"], r"outside 1..4"),
    (["--sweep", "lam=1", "--sweep", "lam=2"], "given twice"),
    (["--sweep", "lam=1", "--no-fsa"], "drop --no-fsa"),
    (["--sweep", "blocks=3+4", "--method", "proxyclip"], "proxyclip"),
])
def test_cli_sweep_errors_are_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch, args, match):
    from fsa.cli import EXIT_USAGE, main

    def no_run(self):
        raise AssertionError("the evaluation started")

    monkeypatch.setattr(Evaluator, "run", no_run)
    # the data root does not exist either: the sweep is checked first
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "voc21", "--data-root", str(tmp_path / "missing"), *args])
    assert exit_info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err, err
    assert re.search(match, err), err


def test_cli_sweep_error_in_a_real_process(tmp_path):
    out = run_cli(["evaluate", "voc21", "--data-root", str(tmp_path), "--sweep", "iterations=two"])
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "iterations" in out.stderr, out.stderr
