"""`fsa.top_p.prune_top_p` (no full sort) equals the sorted reference `prune_top_p_sorted` on every entry.

The rows cover what the fast path must get right: similarities of peaked and of near-uniform class
distributions (long runs of equal values, plateaus of neighbouring floats), ties everywhere, constant,
NaN/inf and negative rows, p at and near 1, float32 and float64, batches, and blocks of rows of any size.
A further test checks that the fast path decides most rows itself (the reference is only its fallback).
"""
from __future__ import annotations

import pytest
import torch

import fsa.top_p as top_p
from fsa.feedback import output_similarity
from fsa.top_p import prune_top_p, prune_top_p_sorted


def _sim(kind: str, n: int, seed: int, dtype=torch.float32, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "peaked":  # near one-hot Π: runs of equal Ŝ (the KL saturates at log(1/ε))
        pi = torch.softmax(20 * torch.randn(batch, n, 40, generator=g, dtype=torch.float64), -1)
    elif kind == "uniform":  # near-uniform Π (a random-weights model): Ŝ within 1e-3 of 1, all distinct
        pi = torch.softmax(0.5 * torch.randn(batch, n, 40, generator=g, dtype=torch.float64), -1)
    elif kind == "clustered":
        centres = torch.randn(6, 40, generator=g, dtype=torch.float64)
        pick = torch.randint(0, 6, (batch, n), generator=g)
        pi = torch.softmax(3 * (centres[pick] + 0.5 * torch.randn(batch, n, 40, generator=g, dtype=torch.float64)), -1)
    elif kind == "ties":
        return ((torch.rand(batch, n, n, generator=g, dtype=torch.float64) * 6).round() / 6 + 0.1).to(dtype)
    elif kind == "wide":
        return (40 * torch.randn(batch, n, n, generator=g, dtype=torch.float64)).to(dtype)
    else:
        raise ValueError(kind)
    return output_similarity(pi.to(dtype))


def _check(sim: torch.Tensor, p: float) -> None:
    got, want = prune_top_p(sim, p), prune_top_p_sorted(sim, p)
    assert got.dtype == torch.bool and got.shape == sim.shape
    assert torch.equal(got, want), f"{int((got != want).sum())} of {want.numel()} entries differ"


@pytest.fixture(params=["dispatch", "bins only"])
def dispatch(request, monkeypatch):
    """Rows full of ties go to the sorted reference as a block (TIED_SHARE); "bins only" sends them through the
    bins (runs of ties counted) so that those paths are checked too."""
    if request.param == "bins only":
        monkeypatch.setattr(top_p, "TIED_SHARE", 2.0)
    return request.param


@pytest.mark.parametrize("kind", ["peaked", "uniform", "clustered", "ties", "wide"])
@pytest.mark.parametrize("p", [0.05, 0.45, 0.9])
def test_equals_the_sorted_reference(kind, p, dispatch):
    _check(_sim(kind, 600, seed=len(kind), batch=2), p)


@pytest.mark.parametrize("kind", ["peaked", "uniform"])
def test_equals_the_reference_at_proxy_sizes(kind, dispatch):
    _check(_sim(kind, 1764, seed=3), 0.45)


@pytest.mark.parametrize("kind", ["peaked", "clustered"])
def test_float64(kind, dispatch):
    _check(_sim(kind, 500, seed=4, dtype=torch.float64), 0.45)
    _check(_sim(kind, 500, seed=4, dtype=torch.float64), 0.3)


@pytest.mark.parametrize("p", [1.0, 0.9999999, 1e-6])
def test_extreme_p(p):
    _check(_sim("clustered", 400, seed=5), p)


def test_special_rows(dispatch):
    sim = _sim("uniform", 300, seed=6).clone()
    sim[0, 0] = 0.5  # constant row
    sim[0, 0, :] = 0.5
    sim[0, 1, 7] = float("nan")
    sim[0, 2, 3] = float("inf")
    sim[0, 3, 9] = float("-inf")
    sim[0, 4] = -sim[0, 4]  # negative values
    sim[0, 5, ::2] = sim[0, 5, 0]  # a long run of one value, the row maximum among them
    sim[0, 6, :150] = 2.0  # a run at the top of the row
    _check(sim, 0.45)


def test_short_rows_go_to_the_reference():
    _check(_sim("ties", 40, seed=7), 0.45)
    _check(torch.rand(3, 5, 1), 0.45)


@pytest.mark.parametrize("chunk", [1, 300, 1 << 19])
def test_any_block_of_rows(monkeypatch, chunk, dispatch):
    """The rows are worked on in blocks of CHUNK_ELEMENTS entries: the result does not depend on them."""
    monkeypatch.setattr(top_p, "CHUNK_ELEMENTS", chunk)
    _check(_sim("peaked", 300, seed=8, batch=2), 0.45)


@pytest.mark.parametrize("kind,share", [("uniform", 0.15), ("clustered", 0.15), ("peaked", 1.0)])
def test_the_fast_path_decides_most_rows(monkeypatch, kind, share):
    """Rows the bins leave to the sorted reference (too close to p to certify) are few; near one-hot class
    distributions (runs of ties everywhere) go to the reference whole."""
    seen = []
    real = top_p.prune_top_p_sorted

    def counting(sim, p):
        seen.append(sim.reshape(-1, sim.shape[-1]).shape[0])
        return real(sim, p)

    monkeypatch.setattr(top_p, "prune_top_p_sorted", counting)
    sim = _sim(kind, 1764, seed=9)
    assert torch.equal(top_p.prune_top_p(sim, 0.45), real(sim, 0.45))
    if share < 1:
        assert sum(seen) < share * 1764, f"{sum(seen)} of 1764 rows went to the reference"
    else:
        assert sum(seen) == 1764


def test_margin_refuses_what_it_cannot_bound():
    assert top_p._margin(1000, torch.float16, torch.device("cpu")) is None
    assert top_p._margin(1000, torch.float32, torch.device("meta")) is None
    kappa = top_p._margin(1764, torch.float32, torch.device("cpu"))
    assert 0 < kappa < 1e-4


def test_bins_decide_rows_of_ties_in_further_rounds(monkeypatch):
    """Near one-hot Π through the bins: the boundary bin often holds a stretch of neighbouring floats around a
    long run of ties; binning that bin again decides the row (the reference only takes a few), equal on every
    entry. With one round only, 317 of these 1764 rows went to the reference (30 with three)."""
    monkeypatch.setattr(top_p, "TIED_SHARE", 2.0)
    seen, rounds = [], []
    real, real_bins = top_p.prune_top_p_sorted, top_p._bin_keep

    def counting(sim, p):
        seen.append(sim.reshape(-1, sim.shape[-1]).shape[0])
        return real(sim, p)

    def bins(rows, *args):
        rounds.append(rows.shape[0])
        return real_bins(rows, *args)

    monkeypatch.setattr(top_p, "prune_top_p_sorted", counting)
    monkeypatch.setattr(top_p, "_bin_keep", bins)
    sim = _sim("peaked", 1764, seed=2)
    assert torch.equal(top_p.prune_top_p(sim, 0.45), real(sim, 0.45))
    blocks = -(-1764 // (top_p.CHUNK_ELEMENTS // 1764))
    assert len(rounds) > blocks, "no row was binned a second time"
    assert sum(seen) < 0.1 * 1764, f"{sum(seen)} of 1764 rows went to the reference"


def test_a_workspace_shared_by_calls_of_any_shape():
    """Buffers reused across calls (as `feedback_attention` does over its row blocks) change nothing."""
    ws = top_p.Workspace()
    for kind, n, dtype in [("uniform", 900, torch.float32), ("peaked", 300, torch.float32),
                           ("clustered", 1200, torch.float64), ("uniform", 700, torch.float32)]:
        sim = _sim(kind, n, seed=n, dtype=dtype)
        assert torch.equal(prune_top_p(sim, 0.45, ws), prune_top_p_sorted(sim, 0.45))


def test_candidates_ordered_as_the_stable_sort():
    """One sort of an int64 key (row, value descending) orders float32 candidates as sorting by value (stable,
    descending) then by row (stable): ties in column order, −0.0 with +0.0, negatives, infinities."""
    g = torch.Generator().manual_seed(5)
    cr = torch.randint(0, 7, (400,), generator=g).sort().values
    pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, float("inf"), float("-inf"), 1e-40, -1e-40, 3e38])
    cv = torch.where(torch.rand(400, generator=g) < 0.5, pool[torch.randint(0, len(pool), (400,), generator=g)],
                     torch.randn(400, generator=g))
    by_value = torch.sort(cv, descending=True, stable=True).indices
    want = by_value[torch.sort(cr[by_value], stable=True).indices]
    assert torch.equal(top_p._row_value_order(cr, cv), want)
    assert torch.equal(top_p._row_value_order(cr, cv.double()), want)
