"""Top-p pruning of FSA's similarity rows (docs/method.md §3 step 4), exact without a full sort.

The rule: sort each row of Ŝ descending (stable: ties in column order), w = softmax(sorted), keep
the entries while cumsum(w) ≤ p, the first always. `prune_top_p_sorted` is that rule as written
(the published form; the reference of the tests and of `python -m fsa bench`). `prune_top_p` gives
the same mask on every entry without sorting the rows:

1. w = softmax(row) from the same kernel as the reference, so every entry has the same exp(s − max).
2. Bins: a sample of the row (64 entries spread over it, sorted) estimates where the kept mass ends and
   sets a band around it, cut into N/16 bins (64..1024); the entries above and below the band fall
   into two end bins. An entry's bin never decreases as its value falls (rounding is monotone), so
   every entry of a bin comes before every entry of a later bin in the sorted order. The band only
   decides the speed: any band gives the same result.
3. The bins' masses (float64) locate the one bin where the running sum crosses p; only its entries
   ("candidates", a few per row) are sorted, with the stable sort's tie order. A bin holding one
   value many times (a run of ties, common for confident class distributions) is counted instead of
   listed: its j-th entry has the running sum (mass above) + j·w. A row whose bin holds many distinct
   values is binned again with that bin's range as its band (two more rounds at most, then the reference).
4. Certified rounding: the reference's running sums differ from ours only by rounding (its softmax
   sums the row in sorted order, ours in column order). Every decision is taken only when it holds for
   every value a bound of those differences allows (`_margin`); a row where an entry is too close to p
   to decide is redone by the reference: about 1 % of the rows at N = 1764, a few % at N = 4096.
   The kept set is then every entry above the cut's value, and the entries equal to it up to a column.

Rows made of long runs of ties (the similarities of near one-hot class distributions: most of a row's
sample repeats) are cheaper to sort: a block where most rows look so goes to the reference whole.
O(N²) memory, worked on blocks of rows that stay in cache; the result does not depend on the blocks.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

#: Elements of a block of rows worked on at once (4 MiB of float32 per temporary, reused from block to block
#: through a `Workspace`): larger blocks pay the ~60 small operations of a block less often; smaller ones
#: measured slower (1764 × 1764, this CPU: 2^19 → 2^20 took top-p from 48 to 43 ms).
CHUNK_ELEMENTS = 1 << 20
#: Bins across each row's band (N / 16 of them, within these bounds), and entries of each row's sample.
BINS, MIN_BINS = 1024, 64
#: A row with more candidates than max(HEAVY, N / HEAVY_SHARE) is not listed: candidates all equal (a run of ties)
#: are counted; distinct ones are binned again over their own range, up to ROUNDS rounds in all.
HEAVY, HEAVY_SHARE = 32, 8
#: A block of rows goes to the sorted reference when more than this share of its rows repeat values in a quarter
#: or more of their sample (the similarities of near one-hot class distributions: runs of ties everywhere).
TIED_SHARE = 0.5
#: Binning rounds per row: a row whose boundary bin holds many entries is binned again over that bin's range.
ROUNDS = 3
#: The band reaches ±S / REACH sample entries around the sample's estimate of the cut.
REACH = 8
SAMPLE = 64
#: Rows shorter than this go to the reference: its sort is as cheap as the bins there.
MIN_FAST_LENGTH = 256


def prune_top_p_sorted(sim: Tensor, p: float) -> Tensor:
    """Kept mask of the confidence-based pruning (step 4), by a full sort: the reference.

    sim: (..., N) → bool (..., N). Each row is sorted descending; w = softmax(sorted); entries
    are kept while cumsum(w) ≤ p, the first always.
    """
    values, order = torch.sort(sim, dim=-1, descending=True, stable=True)
    # A cumulative probability is at most 1; rounding can push it a hair above, which would prune
    # entries at p = 1.
    keep_sorted = values.softmax(dim=-1).cumsum_(dim=-1).clamp_(max=1.0) <= p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def _float32_threshold(p: float, dtype: torch.dtype) -> float:
    """The largest value x of `dtype` with `tensor(x) <= p` true, as torch compares (p in the dtype)."""
    x = torch.tensor(p, dtype=dtype)
    if not bool(x.view(1) <= p):
        x = torch.nextafter(x, torch.tensor(-math.inf, dtype=dtype))
    return float(x)


def _margin(n: int, dtype: torch.dtype, device: torch.device) -> Optional[float]:
    """Relative bound κ of |reference's running sum − ours / our row total| for rows of n entries, or None.

    The reference's running sums are sums of fl(ê·fl(1/S_ref)) in sorted order, ê = exp(s − max) from the
    same softmax kernel as ours; ours are sums of our weights fl(ê·r) divided by their total, which cancels r.
    - S_ref, the kernel's sum of the row in sorted order, is within γ·S of the exact sum: ATen's CPU softmax
      adds L-lane vectors then the lanes pairwise (L = 16 with AVX-512, ≥ 8 otherwise for float32, ≥ 4 for
      float64), CUDA's gives each row ≥ 32 threads: γ = (⌈n/L⌉ + log₂L + 2)·u. Then w_ref = (ê/S)(1 + ε),
      |ε| ≤ 1.01γ + 2.01u, and ours w/total = (ê/S)(1 ± 2u ± n·2⁻⁵³).
    - The reference's cumulative sum: float64 on the CPU, the dtype itself on CUDA: (n+1)·u_acc.
    - Ours: float64 sums of the weights, (2n + BINS + 8)·2⁻⁵³.
    """
    if device.type not in ("cpu", "cuda") or dtype not in (torch.float32, torch.float64):
        return None
    u = torch.finfo(dtype).eps / 2
    lanes = 8 if dtype == torch.float32 else 4
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.cpu.get_cpu_capability() == "AVX512":
        lanes = 16
    gamma = (math.ceil(n / lanes) + math.log2(lanes) + 2) * u
    if gamma > 1e-3:
        return None
    u_acc = 2.0 ** -53 if device.type == "cpu" else u
    return 1.01 * gamma + 4.1 * u + 1.05 * (n + 1) * u_acc + 1.05 * (2 * n + BINS + 8) * 2.0 ** -53


class Workspace:
    """Buffers reused by the blocks of one call, each as large as its largest request: a fresh multi-MiB
    temporary per block pays its page faults again on every block."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
        """A tensor of `shape` (uninitialised) in the buffer `name`, grown when too small."""
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != torch.device(device):
            buf = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


def prune_top_p(sim: Tensor, p: float, workspace: Optional[Workspace] = None) -> Tensor:
    """Kept mask of the confidence-based pruning (step 4): equal to `prune_top_p_sorted`, without its sort.

    sim: (..., N) → bool (..., N). Each row is sorted descending; w = softmax(sorted); entries
    are kept while cumsum(w) ≤ p, the first always (see the module docstring for how).
    workspace: buffers to reuse (a caller working on blocks of rows passes the same one to every block).
    """
    n = sim.shape[-1]
    kappa = _margin(n, sim.dtype, sim.device)
    if n < MIN_FAST_LENGTH or kappa is None or sim.numel() == 0:
        return prune_top_p_sorted(sim, p)
    rows = sim.reshape(-1, n)
    keep = torch.empty(rows.shape, dtype=torch.bool, device=sim.device)
    p_th = _float32_threshold(p, sim.dtype)
    step = max(1, CHUNK_ELEMENTS // n)
    ws = Workspace() if workspace is None else workspace
    for r0 in range(0, rows.shape[0], step):
        _keep_block(rows[r0:r0 + step], p, p_th, kappa, keep[r0:r0 + step], ws)
    return keep.view(sim.shape)


def _keep_block(rows: Tensor, p: float, p_th: float, kappa: float, out: Tensor, ws: Workspace) -> None:
    """The kept mask of a block of rows (R, N), written into out (R, N) bool."""
    if p_th >= 1.0:  # every cumulative sum is clamped to ≤ 1: nothing is pruned
        out.fill_(True)
        bad = torch.nonzero(~torch.isfinite(rows).all(dim=-1))[:, 0]
        if bad.numel():
            out[bad] = prune_top_p_sorted(rows[bad], p)
        return
    columns = _sample_columns(rows.shape[1], rows.device)
    values, order = rows.index_select(1, columns).sort(dim=-1, descending=True)  # a sample of each row
    repeats = (values[:, 1:] == values[:, :-1]).sum(dim=1)
    if float((repeats >= values.shape[1] // 4).float().mean()) > TIED_SHARE:
        out.copy_(prune_top_p_sorted(rows, p))  # rows made of runs of ties: sorting them beats the bins
        return
    w = torch.ops.aten._softmax.out(rows, -1, False, out=ws.take("w", rows.shape, rows.dtype, rows.device))
    top, bottom = _sample_band(values, w.index_select(1, columns).gather(1, order), p)
    failed, retry, top, bottom = _bin_keep(rows, w, top, bottom, p_th, kappa, out, ws)
    failed = [failed]
    for _ in range(ROUNDS - 1):  # rows whose boundary bin held many entries: again, the band being that bin
        if not retry.numel():
            break
        sub_out = torch.empty((retry.numel(), rows.shape[1]), dtype=torch.bool, device=rows.device)
        again, next_retry, top, bottom = _bin_keep(rows.index_select(0, retry), w.index_select(0, retry), top, bottom,
                                                   p_th, kappa, sub_out, ws)
        out.index_copy_(0, retry, sub_out)
        failed.append(retry[again])
        retry = retry[next_retry]
    failed = torch.cat(failed + [retry])
    if failed.numel():
        out.index_copy_(0, failed, prune_top_p_sorted(rows.index_select(0, failed), p))


def _sample_columns(n: int, device) -> Tensor:
    """SAMPLE columns spread over the row by a golden-ratio stride (k·P mod n, P coprime with n): a plain
    stride of n / SAMPLE can fall on one column of the patch grid (64 on a 64×64 grid) and see a biased sample."""
    stride = int(n * 0.6180339887) | 1
    while math.gcd(stride, n) != 1:
        stride += 2
    return (torch.arange(min(SAMPLE, n), device=device) * stride) % n


def _sample_band(values: Tensor, weights: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(top, bottom) of each row's band from its sample (R, S) sorted descending and the weights w of those
    entries: around where the sample's share of the mass passes p (any band gives the same result: entries
    above and below it fall into the end bins)."""
    ns = values.shape[1]
    mass = weights.double().cumsum_(dim=1)
    cut = (mass <= p * mass[:, -1:]).sum(dim=1)
    reach = max(2, ns // REACH)
    top = values.gather(1, (cut - reach).clamp(0, ns - 1)[:, None])[:, 0]
    bottom = values.gather(1, (cut + reach).clamp(0, ns - 1)[:, None])[:, 0]
    return top, bottom


def _bin_keep(rows: Tensor, w: Tensor, top: Tensor, bottom: Tensor, p_th: float, kappa: float,
              out: Tensor, ws: Workspace) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bins over each row's band [bottom, top] (module docstring): bin = trunc(x) with
    x = clamp((top − s)·scale + 1, 0, bins + 1), so bin 0 holds the entries above the band and bin bins + 1
    those below. Writes the kept masks of the rows it decides into out; → (the rows for the reference, the rows
    to bin again, and the (top, bottom) of their boundary bin's entries)."""
    r_count, n = rows.shape
    device = rows.device
    u = torch.finfo(rows.dtype).eps / 2
    bins = min(BINS, max(MIN_BINS, n // 16))
    # a band of one value (a sample all equal): the few representable values around it, one per bin
    flat = top <= bottom
    if bool(flat.any()):
        half = top.abs() * (bins * torch.finfo(rows.dtype).eps / 8)
        top, bottom = torch.where(flat, top + half, top), torch.where(flat, bottom - half, bottom)
    # bottom maps to bins + 0.5: the band's lowest value (often a long run of ties at the cut) is a bin of its own
    scale = (bins - 0.5) / (top - bottom)
    usable = torch.isfinite(top * scale) & (scale > 0)  # else the reference (zero or non-finite samples)
    top = torch.where(usable, top, 0.0)
    scale = torch.where(usable, scale, 0.0)
    x = torch.addcmul((top * scale + 1.0)[:, None], rows, -scale[:, None],
                      out=ws.take("x", rows.shape, rows.dtype, device))
    if not bool(usable.all()):
        x.masked_fill_(~usable[:, None], 0.0)
    x.clamp_(0.0, bins + 1.0).nan_to_num_(nan=0.0)  # NaN in a row: its masses are NaN, it goes to the reference
    b = ws.take("bins", rows.shape, torch.int64, device).copy_(x)
    masses = torch.zeros(r_count, bins + 2, dtype=torch.float64, device=device)
    masses.scatter_add_(1, b, ws.take("w64", rows.shape, torch.float64, device).copy_(w))
    through = masses.cumsum_(dim=1)  # through[:, b]: the mass of bins 0..b
    # running sums relative to the row's total: the reference's are sums of ê/S, ours of ê·r (our softmax's 1/S)
    limit = p_th * through[:, -1]
    p_keep = (limit / (1.0 + kappa))[:, None]  # a running sum ≤ p_keep: the reference keeps the entry
    p_prune = limit * (1.0 + u) / (1.0 - kappa)  # > p_prune: the reference prunes it
    first = (through <= p_keep).sum(dim=1).clamp_(max=bins + 1)  # bins before it: kept, certainly
    # the last entry of bin `first` has the running sum through[first]: kept or pruned for certain, or the
    # row is the reference's
    usable &= torch.isfinite(through[:, -1])  # NaN or +inf in the row
    usable &= through.gather(1, first[:, None])[:, 0] > p_prune
    above = torch.where(first > 0, through.gather(1, (first - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    del through, masses

    # the candidates: the entries of bin `first`
    cand = torch.eq(b, torch.where(usable, first, -1)[:, None], out=ws.take("cand", rows.shape, torch.bool, device))
    counts = cand.view(torch.uint8).sum(dim=1, dtype=torch.int32).long()  # twice as fast as count_nonzero
    failed = ~usable | (counts == 0)
    heavy = counts > max(HEAVY, n // HEAVY_SHARE)
    # too many candidates to list: a bin of equal entries (a run of ties) is counted; a bin of many distinct
    # values (a band that missed, a dense stretch) is binned again over its own range
    many = torch.nonzero(heavy & ~failed)[:, 0]
    # each tried as a run (equal to one of its candidates); on most of the block, the block itself (no row copies):
    # then run_mask has a row for every row of the block, else one for each run
    whole = 2 * many.numel() > r_count
    run = retry = many[:0]
    retry_top = retry_bottom = rows.new_empty(0)
    if many.numel():
        sub, c, w_sub = (rows, cand, w) if whole else (t.index_select(0, many) for t in (rows, cand, w))
        at = c.view(torch.uint8).argmax(dim=1, keepdim=True)  # an entry of the bin
        pick = (lambda t: t) if whole else (lambda t: t[many])  # noqa: E731
        done, is_run, run_mask = _run_keep(sub, sub.gather(1, at)[:, 0], w_sub.gather(1, at)[:, 0].double(),
                                           pick(counts), pick(above), pick(limit), kappa)
        del sub, c, w_sub
        if whole:
            done, is_run = done[many], is_run[many]
        else:
            run_mask = run_mask[is_run]
        run, retry = many[is_run], many[~is_run]
        failed[run] = ~done[is_run]  # a run whose cut is too close to p to decide
        if retry.numel():
            sub, c = rows.index_select(0, retry), cand.index_select(0, retry)
            retry_top = torch.where(c, sub, -math.inf).amax(dim=1)
            retry_bottom = torch.where(c, sub, math.inf).amin(dim=1)
            del sub, c
    unlisted = torch.nonzero(failed | heavy)[:, 0]  # heavy: runs too
    if unlisted.numel():
        cand[unlisted] = False
    cr, cc = cand.nonzero(as_tuple=True)  # row by row, columns ascending
    if cr.numel():
        failed |= _list_keep(rows, w, cr, cc, above, limit, kappa, out)  # writes every row of out
    if run.numel() and whole:
        is_run_row = torch.zeros(r_count, dtype=torch.bool, device=device).index_fill_(0, run, True)
        torch.where(is_run_row[:, None], run_mask, out, out=out)
    elif run.numel():
        out.index_copy_(0, run, run_mask)
    return torch.nonzero(failed)[:, 0], retry, retry_top, retry_bottom


def _run_keep(rows: Tensor, value: Tensor, weight: Tensor, count: Tensor, above: Tensor, p_th: Tensor,
              kappa: float) -> tuple[Tensor, Tensor, Tensor]:
    """Rows (R', N) whose `count` candidates may all equal `value`, an entry of theirs (weight: its w, float64),
    after a mass `above` of entries kept for certain.

    In the sorted order such a run comes in column order, each entry with the same weight (equal values,
    equal weights), so its j-th entry has the running sum above + j·weight (exact in float64) and the
    number kept follows without listing the run. → (decided (R',) bool, is a run (R',) bool: the candidates
    are all equal to `value`, kept mask (R', N)).
    """
    u = torch.finfo(rows.dtype).eps / 2
    equal = rows == value[:, None]
    j = torch.floor((p_th / (1.0 + kappa) - above) / weight).clamp_(min=0)
    j = torch.minimum(torch.nan_to_num(j, nan=0.0), count.double())
    for _ in range(4):  # floor's rounding: step back while the j-th is not certainly kept
        j = torch.where((j > 0) & ((above + j * weight) * (1.0 + kappa) > p_th), j - 1, j)
    lead = above == 0  # nothing above (the row maximum has weight > 0): the run's first entry is kept
    j = torch.where(lead, j.clamp(min=1), j)
    sure_in = (j == 0) | ((above + j * weight) * (1.0 + kappa) <= p_th) | (lead & (j == 1))
    sure_out = (j >= count) | ((above + (j + 1) * weight) * (1.0 - kappa) > p_th * (1.0 + u))
    # equal entries share a bin, so the bin is a run exactly when it holds `count` entries equal to `value`
    is_run = equal.view(torch.uint8).sum(dim=1, dtype=torch.int32) == count
    done = sure_in & sure_out & (weight > 0) & is_run
    kept = equal.cumsum(dim=1, dtype=torch.int32) <= j.to(torch.int32)[:, None]
    return done, is_run, kept.logical_and_(equal).logical_or_(rows > value[:, None])


def _list_keep(rows: Tensor, w: Tensor, cr: Tensor, cc: Tensor, above: Tensor, limit: Tensor, kappa: float,
               out: Tensor) -> Tensor:
    """Rows with a few candidates (cr, cc: row by row, columns ascending), after a mass `above` kept for
    certain: sorts them as the reference does and writes the kept masks of their rows into out.
    → bool (R',): the rows where some candidate is too close to p to decide."""
    r_count = rows.shape[0]
    device = rows.device
    u = torch.finfo(rows.dtype).eps / 2
    n = rows.shape[1]
    cv = rows.reshape(-1).index_select(0, cr * n + cc)
    order = _row_value_order(cr, cv)
    cr, cc, cv = cr[order], cc[order], cv[order]
    flat = cr * n + cc
    cw = w.reshape(-1).index_select(0, flat).double()
    counts = torch.bincount(cr, minlength=r_count)
    starts = counts.cumsum(0) - counts
    running = cw.cumsum(0)
    slack = 1.05 * running.numel() * 2.0 ** -53 * float(running[-1])  # a flat cumsum minus its row start
    row_start = (running - cw)[starts.clamp(max=cw.numel() - 1)]
    c_sum = above[cr] + (running - row_start[cr])  # the running sum through each candidate
    p_th = limit[cr]
    kept = (c_sum + slack) * (1.0 + kappa) <= p_th
    gone = (c_sum - slack) * (1.0 - kappa) > p_th * (1.0 + u)
    # the row's first entry is always kept: the first candidate when nothing is above (the row maximum
    # has weight 1/S > 0, so a mass of 0 above means no entry above)
    lead = (torch.arange(cr.numel(), device=device) == starts[cr]) & (above[cr] == 0)
    kept |= lead
    gone &= ~lead
    failed = torch.zeros(r_count, dtype=torch.bool, device=device)
    failed[cr[~(kept | gone)]] = True
    # kept: every entry above the last kept candidate, and the candidates up to it
    kept_count = torch.bincount(cr, weights=kept.to(torch.float64), minlength=r_count).long()
    at = (starts + (kept_count - 1).clamp_(min=0)).clamp_(max=cv.numel() - 1)
    value = torch.where(counts > 0, cv[at], math.inf)  # rows without candidates: decided elsewhere
    torch.gt(rows, value[:, None], out=out)
    tied = kept & (cv == cv[at][cr])  # the kept entries equal to the cut's value
    out.view(-1).index_fill_(0, flat[tied], True)
    return failed


def _row_value_order(cr: Tensor, cv: Tensor) -> Tensor:
    """The order of the candidates (cr, cv: row by row, columns ascending) by row, then by value descending, ties
    in column order: the reference's stable sort within each row. One sort of an int64 key for float32 values."""
    if cv.dtype != torch.float32:
        by_value = torch.sort(cv, descending=True, stable=True).indices
        return by_value[torch.sort(cr[by_value], stable=True).indices]
    bits = (cv + 0.0).view(torch.int32).long()  # + 0.0: −0.0 becomes +0.0, as equal as the sort finds them
    monotone = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order of the floats' values
    key = cr * (1 << 32) + (0x7FFFFFFF - monotone)  # row, then value descending (0 ≤ second part < 2³²)
    return torch.sort(key, stable=True).indices
