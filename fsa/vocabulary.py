"""Vocabulary syntax (docs/method.md §1, our rule): ``person; man; woman, dog, sky``.

Classes are separated by commas or new lines, synonyms of one class by ``;``. Every synonym is a
separate text query; a class's probability is the maximum over its synonyms.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

BACKGROUND = "background"

#: Characters that draw nothing although their Unicode category is a letter, mark or symbol:
#: Hangul fillers, Khmer inherent vowels, Mongolian variation selectors, the combining grapheme
#: joiner, variation selectors (Unicode's Default_Ignorable_Code_Point property,
#: DerivedCoreProperties.txt) and the blank Braille pattern U+2800.
_BLANK_CHARACTERS = frozenset(
    "\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180e\u180f\u2800\u3164\uffa0"
    + "".join(map(chr, range(0xFE00, 0xFE10))) + "".join(map(chr, range(0xE0100, 0xE01F0)))
)


def is_invisible(ch: str) -> bool:
    """True for a character that shows nothing: white space, control and format characters (zero-width
    space/joiners, BOM, bidi marks), separators, and :data:`_BLANK_CHARACTERS`."""
    return ch.isspace() or ch in _BLANK_CHARACTERS or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp")


def _strip_invisible(name: str) -> str:
    """``name`` without invisible characters at either end (inner ones, e.g. an emoji's joiner, stay)."""
    start, end = 0, len(name)
    while start < end and is_invisible(name[start]):
        start += 1
    while end > start and is_invisible(name[end - 1]):
        end -= 1
    return name[start:end]


def _describe_invisible(name: str) -> str:
    """'U+200B ZERO WIDTH SPACE, U+2060 WORD JOINER' for the distinct characters of ``name``."""
    seen = list(dict.fromkeys(name))
    shown = [f"U+{ord(ch):04X} {unicodedata.name(ch, '')}".rstrip() for ch in seen[:3]]
    return ", ".join(shown) + (", ..." if len(seen) > 3 else "")


@dataclass(frozen=True)
class Vocabulary:
    """A parsed vocabulary: ``classes[c]`` are the synonyms of class ``c`` (at least one each)."""

    classes: tuple[tuple[str, ...], ...]

    @property
    def class_names(self) -> tuple[str, ...]:
        """First synonym of each class, (C,)."""
        return tuple(synonyms[0] for synonyms in self.classes)

    @property
    def queries(self) -> tuple[str, ...]:
        """All synonyms in order, (Q,): the names that get text features."""
        return tuple(name for synonyms in self.classes for name in synonyms)

    @property
    def query_to_class(self) -> tuple[int, ...]:
        """Class index of each query, (Q,)."""
        return tuple(c for c, synonyms in enumerate(self.classes) for _ in synonyms)

    @property
    def background_index(self) -> Optional[int]:
        """Index of the class with a synonym named ``background`` (any case), if any."""
        for c, synonyms in enumerate(self.classes):
            if any(name.lower() == BACKGROUND for name in synonyms):
                return c
        return None

    def __len__(self) -> int:
        return len(self.classes)


def parse_vocabulary(text: Union[str, Sequence[str], "Vocabulary", None], *, max_names: int = 500) -> Vocabulary:
    """Parse ``"cat; kitten, sofa\\nsky"`` into a :class:`Vocabulary`.

    ``text`` may also be a list of class strings (each may hold ``;`` synonyms). White space and
    zero-width characters around names are stripped and empty pieces dropped; a synonym repeated
    inside one class is kept once. ``ValueError`` for: a name with no visible character (only
    zero-width, format or control characters), no names, a class listed twice, a name in two classes
    (case-insensitive), more than ``max_names`` names. A :class:`Vocabulary` (parsed already) is returned
    as it is, once its size is checked.
    """
    if isinstance(text, Vocabulary):
        _check_total(sum(len(synonyms) for synonyms in text.classes), max_names)
        return text
    if text is None:
        pieces: list[str] = []
    elif isinstance(text, str):
        pieces = re.split(r"[,\n\r]", text)
    else:
        pieces = [str(item) for item in text]

    classes: list[tuple[str, ...]] = []
    owner: dict[str, int] = {}  # lower-cased name -> class index
    for piece in pieces:
        kept: dict[str, str] = {}  # lower-cased -> first spelling: "cat; Cat" is one synonym
        for raw in piece.split(";"):
            name = _strip_invisible(raw)
            if not name and raw.strip():  # something was typed, but nothing that shows
                raise ValueError(_invisible_name_message(raw.strip(), len(classes), tuple(kept.values()), classes))
            if name:
                kept.setdefault(name.lower(), name)
        synonyms = tuple(kept.values())
        if not synonyms:
            continue
        here = len(classes)
        for name in synonyms:
            other = owner.get(name.lower())
            if other is not None:
                first = "; ".join(classes[other])
                if len(synonyms) == 1 and len(classes[other]) == 1:
                    raise ValueError(f"class {name!r} is listed twice; remove one of them")
                raise ValueError(
                    f"name {name!r} appears in two classes ({'; '.join(synonyms)!r} and {first!r}); "
                    "a name may belong to one class only"
                )
            owner[name.lower()] = here
        classes.append(synonyms)

    if not classes:
        raise ValueError("the vocabulary is empty; enter class names separated by commas, e.g. 'cat, dog, sky'")
    _check_total(sum(len(synonyms) for synonyms in classes), max_names)
    return Vocabulary(tuple(classes))


def _check_total(total: int, max_names: int) -> None:
    if total > max_names:
        raise ValueError(f"the vocabulary has {total} names; at most {max_names} are allowed, remove some")


def _invisible_name_message(raw: str, index: int, synonyms: tuple[str, ...],
                            classes: list[tuple[str, ...]]) -> str:
    """Which name (class ``index``, 0-based, after ``synonyms`` of the same class) shows nothing."""
    if synonyms:
        where = f"synonym {len(synonyms) + 1} of class {index + 1} ({'; '.join(synonyms)!r})"
    else:
        where = f"class {index + 1}" + (f" (after {'; '.join(classes[-1])!r})" if classes else " (the first)")
    return (f"{where} of the vocabulary is {raw!r}, which has no visible character ({_describe_invisible(raw)}); "
            "type a name there or remove it")


def aggregate_synonyms(probs: torch.Tensor, vocab: Vocabulary, dim: int) -> torch.Tensor:
    """Max over each class's synonyms: ``probs`` with Q queries on ``dim`` -> C classes on ``dim``."""
    dim = dim % probs.ndim
    q = len(vocab.queries)
    if probs.shape[dim] != q:
        raise ValueError(f"expected {q} queries on dim {dim}, got shape {tuple(probs.shape)}")
    if q == len(vocab.classes):
        return probs  # no synonyms: nothing to merge
    index_shape = [1] * probs.ndim
    index_shape[dim] = q
    index = torch.tensor(vocab.query_to_class, device=probs.device).view(index_shape).expand_as(probs)
    out_shape = list(probs.shape)
    out_shape[dim] = len(vocab.classes)
    out = torch.empty(out_shape, dtype=probs.dtype, device=probs.device)
    return out.scatter_reduce(dim, index, probs, reduce="amax", include_self=False)
