"""fsa.vocabulary: the class/synonym syntax and the max over synonyms."""
from __future__ import annotations

import re

import pytest
import torch

from fsa.vocabulary import Vocabulary, aggregate_synonyms, parse_vocabulary


def test_parse_classes_synonyms_and_whitespace():
    vocab = parse_vocabulary(" person; man ;woman , dog\n\nsky\r\n,, ;  , Background ")
    assert vocab.classes == (("person", "man", "woman"), ("dog",), ("sky",), ("Background",))
    assert vocab.class_names == ("person", "dog", "sky", "Background")
    assert vocab.queries == ("person", "man", "woman", "dog", "sky", "Background")
    assert vocab.query_to_class == (0, 0, 0, 1, 2, 3)
    assert vocab.background_index == 3
    assert len(vocab) == 4


def test_no_background_and_repeats_inside_one_class():
    vocab = parse_vocabulary("cat; kitten; Kitten; cat, sofa")
    assert vocab.classes == (("cat", "kitten"), ("sofa",))
    assert vocab.background_index is None


def test_list_input():
    assert parse_vocabulary(["cat; kitten", " sofa "]).classes == (("cat", "kitten"), ("sofa",))


@pytest.mark.parametrize("text", [None, "", "  ", ",, ;\n ; ,", []])
def test_empty_vocabulary(text):
    with pytest.raises(ValueError, match="the vocabulary is empty; enter class names"):
        parse_vocabulary(text)


def test_repeated_class_is_named():
    with pytest.raises(ValueError, match="class 'Cat' is listed twice"):
        parse_vocabulary("cat, dog, Cat")


def test_synonym_in_two_classes_is_named():
    expected = "name 'kitten' appears in two classes ('kitten; kitty' and 'cat; kitten')"
    with pytest.raises(ValueError, match=re.escape(expected)):
        parse_vocabulary("cat; kitten, kitten; kitty")


def test_too_many_names():
    names = ", ".join(f"class {i}" for i in range(11))
    assert len(parse_vocabulary(names, max_names=11).queries) == 11
    with pytest.raises(ValueError, match="has 11 names; at most 10"):
        parse_vocabulary(names, max_names=10)
    with pytest.raises(ValueError, match="has 3 names; at most 2"):
        parse_vocabulary("a; b; c", max_names=2)


def test_vocabulary_is_frozen():
    vocab = parse_vocabulary("cat")
    with pytest.raises(AttributeError):
        vocab.classes = ()  # type: ignore[misc]
    assert vocab == Vocabulary((("cat",),))


def test_aggregate_synonyms_max_on_any_dim():
    vocab = parse_vocabulary("person; man; woman, dog, sky; cloud")
    probs = torch.rand(2, 6, 3, 4, generator=torch.Generator().manual_seed(0))
    out = aggregate_synonyms(probs, vocab, dim=1)
    assert out.shape == (2, 3, 3, 4)
    torch.testing.assert_close(out[:, 0], probs[:, 0:3].amax(dim=1))
    torch.testing.assert_close(out[:, 1], probs[:, 3])
    torch.testing.assert_close(out[:, 2], probs[:, 4:6].amax(dim=1))
    last = aggregate_synonyms(probs.movedim(1, -1), vocab, dim=-1)
    torch.testing.assert_close(last, out.movedim(1, -1))


def test_aggregate_without_synonyms_and_wrong_size():
    vocab = parse_vocabulary("a, b")
    probs = torch.rand(2, 5)
    assert torch.equal(aggregate_synonyms(probs, vocab, dim=0), probs)
    with pytest.raises(ValueError, match="expected 2 queries on dim 1"):
        aggregate_synonyms(probs, vocab, dim=1)
