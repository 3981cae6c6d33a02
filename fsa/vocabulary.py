"""Vocabulary syntax (method.md §1, our rule): ``person; man; woman, dog, sky``.

Classes are separated by commas or new lines, synonyms of one class by ``;``. Every synonym is a
separate text query; a class's probability is the maximum over its synonyms.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

BACKGROUND = "background"


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


def parse_vocabulary(text: Union[str, Sequence[str], None], *, max_names: int = 500) -> Vocabulary:
    """Parse ``"cat; kitten, sofa\\nsky"`` into a :class:`Vocabulary`.

    ``text`` may also be a list of class strings (each may hold ``;`` synonyms). Whitespace is
    stripped and empty pieces dropped; a synonym repeated inside one class is kept once.
    ``ValueError`` for: no names, a class listed twice, a name in two classes (case-insensitive),
    more than ``max_names`` names.
    """
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
        for name in (n.strip() for n in piece.split(";")):
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
    total = sum(len(synonyms) for synonyms in classes)
    if total > max_names:
        raise ValueError(f"the vocabulary has {total} names; at most {max_names} are allowed, remove some")
    return Vocabulary(tuple(classes))


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
