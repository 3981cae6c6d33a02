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


# --------------------------------------------------------------------------- invisible names
ZWSP, ZWJ, BOM, WORD_JOINER = "\u200b", "\u200d", "\ufeff", "\u2060"


def test_zero_width_characters_around_names_are_stripped():
    vocab = parse_vocabulary(f"{BOM}cat{ZWSP}, {ZWSP} dog{WORD_JOINER}; {ZWSP}puppy\n\u3000sky\u00a0")
    assert vocab.classes == (("cat",), ("dog", "puppy"), ("sky",))
    # "cat" and "cat" + zero-width space are one class, so repeating it is still caught
    with pytest.raises(ValueError, match="class 'cat' is listed twice"):
        parse_vocabulary(f"cat, cat{ZWSP}")


def test_characters_inside_names_are_kept():
    vocab = parse_vocabulary("👩\u200d💻, café, cafe\u0301, 猫, ﾈｺ")
    assert vocab.class_names == ("👩\u200d💻", "café", "cafe\u0301", "猫", "ﾈｺ")


@pytest.mark.parametrize(
    "text, where, shown, described",
    [
        (f"cat, {ZWSP}", "class 2 (after 'cat')", r"'\u200b'", "U+200B ZERO WIDTH SPACE"),
        (f"{ZWSP}, cat", "class 1 (the first)", r"'\u200b'", "U+200B ZERO WIDTH SPACE"),
        (f"cat; kitten; {ZWJ}{ZWSP}, dog", "synonym 3 of class 1 ('cat; kitten')", r"'\u200d\u200b'",
         "U+200D ZERO WIDTH JOINER, U+200B ZERO WIDTH SPACE"),
        ("cat, dog, \u3164", "class 3 (after 'dog')", "'\u3164'", "U+3164 HANGUL FILLER"),
        ("cat, \u2800", "class 2 (after 'cat')", "'\u2800'", "U+2800 BRAILLE PATTERN BLANK"),
        ("cat, \u202e\u200e", "class 2 (after 'cat')", r"'\u202e\u200e'",
         "U+202E RIGHT-TO-LEFT OVERRIDE, U+200E LEFT-TO-RIGHT MARK"),
        ("cat, \x00\x07", "class 2 (after 'cat')", r"'\x00\x07'", "U+0000, U+0007"),
        (["cat", "\ufe0f"], "class 2 (after 'cat')", "'\ufe0f'", "U+FE0F VARIATION SELECTOR-16"),
    ],
)
def test_names_with_no_visible_character_are_rejected(text, where, shown, described):
    expected = (f"{where} of the vocabulary is {shown}, which has no visible character ({described}); "
                "type a name there or remove it")
    with pytest.raises(ValueError, match=re.escape(expected)):
        parse_vocabulary(text)


def test_white_space_alone_is_still_an_empty_piece():
    assert parse_vocabulary("cat, \t , \u3000,\u00a0, dog").class_names == ("cat", "dog")
