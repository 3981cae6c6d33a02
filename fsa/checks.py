"""Input checks that say what is wrong: setting numbers (finite, in range) and finite tensors.

Setting checks raise ``ValueError`` naming the field, the value and the allowed range; they run
in the ``__post_init__`` of the settings dataclasses (fsa/config.py), before any model loads.
:func:`check_finite` is the last line of defence where probabilities become labels: NaN must never
turn into a mask silently (``argmax`` of an all-NaN column is class 0).

Imports nothing heavy at module level: ``fsa.config`` (and so the CLI's ``--help``) use it.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional


class NumericalError(ValueError):
    """A computed tensor holds NaN or ±inf: the result would be meaningless, so there is none."""


def _shown(value: Any) -> str:
    """A value as a message shows it: 1e+06, nan, inf, 448, 'abc'."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return repr(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return f"{float(value):g}"


def _interval(low: Optional[float], high: Optional[float], low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '≥'} {_shown(low)}"
    if low is None:
        return f"{'<' if high_open else '≤'} {_shown(high)}"
    return f"{'(' if low_open else '['}{_shown(low)}, {_shown(high)}{')' if high_open else ']'}"


def check_number(
    field: str,
    value: Any,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    why: str = "",
) -> Any:
    """``value`` as a float (or an int when ``integer``), if it is a finite number in the range.

    Else ``ValueError``: "<field> must be a finite number in [low, high], got nan" (+ ``why``).
    A float with an integral value (448.0, as JSON and web forms send it) passes as an int.
    Booleans and strings are not numbers here.
    """
    kind = "a whole number" if integer else "a finite number"
    if low is not None and high is not None:
        rule = f"{kind} in {_interval(low, high, low_open, high_open)}"
    elif (low, high) != (None, None):
        rule = f"{kind} {_interval(low, high, low_open, high_open)}"
    else:
        rule = kind
    suffix = f" ({why})" if why else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{field} must be {rule}, got {_shown(value)}{suffix}")
    number = float(value)
    ok = math.isfinite(number)
    if ok and integer:
        ok = number.is_integer()
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        raise ValueError(f"{field} must be {rule}, got {_shown(value)}{suffix}")
    return int(value) if integer else number


def check_finite(values: Any, what: str) -> Any:
    """Return ``values`` (a torch tensor or a numpy array) if every entry is finite.

    Else :class:`NumericalError` saying how many entries of ``what`` are NaN or infinite. The usual
    case costs one sum and no copy (on CUDA: one synchronisation): a NaN or infinite entry makes the
    sum NaN or infinite; only a non-finite sum (also an overflow of finite values) looks entry by entry.
    """
    import numpy as np

    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency; keep numpy usable alone
        torch = None
    if torch is not None and isinstance(values, torch.Tensor):
        if values.dtype == torch.bool or not (values.is_floating_point() or values.is_complex()):
            return values
        if bool(torch.isfinite(values.sum())):
            return values
        finite = torch.isfinite(values)
        if bool(finite.all()):
            return values
        nan = int(torch.isnan(values).sum())
        bad = int((~finite).sum())
        total = values.numel()
    else:
        arr = np.asarray(values)
        if not np.issubdtype(arr.dtype, np.inexact):
            return values
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(arr.sum()):
                return values
        finite = np.isfinite(arr)
        if bool(finite.all()):
            return values
        nan = int(np.isnan(arr).sum())
        bad = int((~finite).sum())
        total = arr.size
    raise NumericalError(
        f"{what}: {nan} NaN and {bad - nan} infinite values out of {total}, so there is no meaningful "
        "result; this is a numerical overflow, usually from an extreme setting (try the default λ, "
        "scales and logit scale) — if it happens with the defaults, please report it as a bug"
    )
