"""Ablation sweeps: a grid of FSA settings, each scored against one baseline.

A sweep is a tuple of axes ``((name, values), ...)``; its grid is the Cartesian product of the axes
(the first axis outermost), each point the run's FeedbackConfig (its λ and p, the paper's defaults
otherwise) with that point's values. Each point has a key such as ``"fsa[lam=2,p=0.3]"``, the name
of its per-image records, its saved predictions and its row of the ablation table.

Axes: lam, p (numbers), similarity (kl | sym_kl | js), iterations (integer ≥ 1), blocks (1-based
block numbers joined by "+", or "last"), isolation / pruning / ensemble (on | off). The paper's
method is similarity kl, one iteration, the last block; other points are "beyond the paper".
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..config import SIMILARITIES, FeedbackConfig

#: Sweep axes, in the order `--help` lists them.
SWEEP_AXES: tuple[str, ...] = ("lam", "p", "similarity", "iterations", "blocks", "isolation", "pruning", "ensemble")
_SWITCHES = ("isolation", "pruning", "ensemble")
_ON_OFF = {"on": True, "off": False}

Sweep = tuple[tuple[str, tuple], ...]


class SweepError(ValueError):
    """A sweep axis or value that cannot be run."""


def _problem(axis: str, value: Any, need: str) -> SweepError:
    return SweepError(f"sweep {axis}: {value!r} is not {need}")


def normalize_value(axis: str, value: Any) -> Any:
    """One value of an axis as FeedbackConfig takes it; strings (the command line's) are parsed.

    lam, p → float; similarity → str; iterations → int; blocks → sorted tuple of ints or None (the
    last block: "last"); isolation/pruning/ensemble → bool ("on"/"off"). Raises SweepError.
    """
    if axis not in SWEEP_AXES:
        raise SweepError(f"unknown sweep axis {axis!r}; choose from {', '.join(SWEEP_AXES)}")
    text = value.strip() if isinstance(value, str) else None
    if axis in ("lam", "p"):
        try:
            number = float(text) if text is not None else (
                float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None)
        except ValueError:
            number = None
        if number is None or not math.isfinite(number):
            raise _problem(axis, value, "a finite number")
        if axis == "p" and not 0.0 < number <= 1.0:
            raise _problem(axis, value, "in (0, 1] (the top-p of the pruning)")
        return number
    if axis == "similarity":
        if text not in SIMILARITIES:
            raise _problem(axis, value, f"one of {', '.join(SIMILARITIES)}")
        return text
    if axis == "iterations":
        number = int(text) if text is not None and text.isdigit() else (
            int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None)
        if number is None or number < 1:
            raise _problem(axis, value, "an integer >= 1")
        return number
    if axis == "blocks":
        return _blocks(value)
    if text is not None and text.lower() in _ON_OFF:
        return _ON_OFF[text.lower()]
    if isinstance(value, bool):
        return value
    raise _problem(axis, value, "on or off")


def _blocks(value: Any) -> Optional[tuple[int, ...]]:
    need = "block numbers >= 1 joined by '+' (e.g. 11+12) or 'last'"
    if value is None or (isinstance(value, str) and value.strip().lower() == "last"):
        return None
    if isinstance(value, str):
        parts = value.strip().split("+")
        if not all(p.strip().isdigit() for p in parts):
            raise _problem("blocks", value, need)
        numbers_ = [int(p) for p in parts]
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        numbers_ = [int(value)]
    elif isinstance(value, (tuple, list)) and all(
            isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in value):
        numbers_ = [int(b) for b in value]
    else:
        raise _problem("blocks", value, need)
    if not numbers_ or min(numbers_) < 1 or len(set(numbers_)) != len(numbers_):
        raise _problem("blocks", value, need + ", each once")
    return tuple(sorted(numbers_))


def format_value(axis: str, value: Any) -> str:
    """A normalised value as the keys and the table write it (and the command line reads it)."""
    if axis in ("lam", "p"):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if axis == "blocks":
        return "last" if value is None else "+".join(str(b) for b in value)
    if axis in _SWITCHES:
        return "on" if value else "off"
    return str(value)


def normalize_sweep(sweep: Iterable[tuple[str, Iterable[Any]]]) -> Sweep:
    """Validated axes: known names, each once, each with distinct values. Raises SweepError."""
    out: list[tuple[str, tuple]] = []
    for item in sweep:
        try:
            axis, values = item
        except (TypeError, ValueError):
            raise SweepError(f"a sweep axis is a (name, values) pair, got {item!r}") from None
        if axis not in SWEEP_AXES:
            raise SweepError(f"unknown sweep axis {axis!r}; choose from {', '.join(SWEEP_AXES)}")
        if any(axis == seen for seen, _ in out):
            raise SweepError(f"sweep axis {axis} given twice; list all its values once, e.g. {axis}=A,B")
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            values = (values,)
        normalized = tuple(normalize_value(axis, v) for v in values)
        if not normalized:
            raise SweepError(f"sweep {axis} has no values")
        shown = [format_value(axis, v) for v in normalized]
        if len(set(shown)) != len(shown):
            raise SweepError(f"sweep {axis} lists a value twice ({', '.join(shown)})")
        out.append((axis, normalized))
    return tuple(out)


def parse_sweep_option(text: str) -> tuple[str, tuple]:
    """``"lam=1,2,3"`` → ("lam", (1.0, 2.0, 3.0)): one ``--sweep NAME=V1,V2,...`` option. Raises SweepError."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise SweepError(f"--sweep {text!r}: write NAME=V1,V2,... with NAME one of {', '.join(SWEEP_AXES)}")
    if name not in SWEEP_AXES:
        raise SweepError(f"unknown sweep axis {name!r}; choose from {', '.join(SWEEP_AXES)}")
    parts = values.split(",")
    if not values.strip() or any(not p.strip() for p in parts):
        raise SweepError(f"--sweep {text!r}: empty value; write {name}=V1,V2,...")
    return normalize_sweep([(name, parts)])[0]


@dataclass(frozen=True)
class SweepPoint:
    """One setting of a sweep's grid."""

    key: str  #: e.g. "fsa[lam=2,p=0.3]"
    values: tuple[tuple[str, Any], ...]  #: (axis, normalised value) of this point, in axis order
    feedback: FeedbackConfig

    def setting(self) -> dict[str, Any]:
        """JSON-ready {axis: value} (blocks as "11+12" or "last")."""
        return {axis: format_value(axis, v) if axis == "blocks" else v for axis, v in self.values}

    def label(self) -> str:
        """"lam=2, p=0.3": the table's row name."""
        return ", ".join(f"{axis}={format_value(axis, v)}" for axis, v in self.values)

    def beyond_paper(self, depth: int) -> bool:
        """True where the setting is not the paper's method: similarity ≠ kl, iterations ≠ 1, blocks ≠ last."""
        fb = self.feedback
        return fb.similarity != "kl" or fb.iterations != 1 or fb.blocks not in (None, (depth,))


def sweep_key(values: Sequence[tuple[str, Any]]) -> str:
    return "fsa[" + ",".join(f"{axis}={format_value(axis, v)}" for axis, v in values) + "]"


def sweep_grid(base: FeedbackConfig, sweep: Sweep, *, depth: Optional[int] = None,
               method: Optional[str] = None) -> list[SweepPoint]:
    """The grid's points: `base` with each combination of the axes' values (first axis outermost).

    With `depth` (blocks of the vision tower) and `method` both given, each point's blocks are checked
    as the model will check them (inside 1..depth; only the last for proxyclip). Raises SweepError.
    """
    from ..logits import resolve_feedback_blocks

    names = [axis for axis, _ in sweep]
    points = []
    for combo in itertools.product(*(values for _, values in sweep)):
        values = tuple(zip(names, combo))
        try:
            feedback = dataclasses.replace(base, **dict(values))
            if depth is not None and method is not None:
                resolve_feedback_blocks(feedback, depth, method)
        except ValueError as exc:
            raise SweepError(f"sweep setting {sweep_key(values)}: {exc}") from None
        points.append(SweepPoint(sweep_key(values), values, feedback))
    return points


def setting_label(setting: Mapping[str, Any]) -> str:
    """{axis: value} (a `SweepPoint.setting()`, e.g. read back from JSON) → "lam=2, p=0.3"."""
    return ", ".join(f"{axis}={format_value(axis, normalize_value(axis, value))}" for axis, value in setting.items())
