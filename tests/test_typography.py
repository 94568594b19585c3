"""Typographies: the same words with other quotes, dashes, emphasis marks and line breaks."""

import random
import re

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt.corpus import split_documents
from gpt.dataset import prepare_splits
from gpt.tokenizer import EOT, decode, special_id, train_tokenizer
from gpt.typography import ASCII, Typography, ascii_typography, retype, rewrap, typographic_variant

# Written for these tests, in the typography of a Project Gutenberg book.
SAMPLE = (
    "CHAPTER I.\nA Walk in the Rain\n\n\n"
    "It was a grey morning, and the road ran down to the river—past the mill, past the\n"
    "church—until it met the bridge. “Shall we cross?” asked Tom. “It’s _very_ late,” said\n"
    "his sister, “and the water is high.”\n\n"
    "      ‘A rhyme,’ she said,\n      ‘on two short lines.’\n\n"
    "They crossed all the same, and nobody said a word about the _water_ or the _long\n"
    "walk home_ until they were dry again and sitting by the fire with their tea.\n"
)


def words(text: str) -> list[str]:
    """The words of a text, whatever its typography."""
    return re.findall(r"[A-Za-z]+", text)


def test_ascii_typography_keeps_the_words_and_changes_the_marks():
    ascii_text = ascii_typography(SAMPLE)
    assert words(ascii_text) == words(SAMPLE)
    assert ascii_text.isascii() and "_" not in ascii_text
    flat = " ".join(ascii_text.split())
    assert '"Shall we cross?" asked Tom.' in flat and "It's very late" in flat and "river--past" in flat
    prose = ascii_text.split("\n\n\n")[1].split("\n\n")[0]
    assert max(len(line) for line in prose.split("\n")) <= 66 < max(len(line) for line in SAMPLE.split("\n"))
    assert "CHAPTER I.\nA Walk in the Rain" in ascii_text  # a heading is not run together
    assert "      'A rhyme,' she said,\n      'on two short lines.'" in ascii_text  # nor is indented verse
    assert "the long walk home until" in flat and ascii_text.endswith("tea.\n")  # emphasis over a line break


def test_retype_with_the_book_style_changes_nothing():
    assert retype(SAMPLE, Typography()) == SAMPLE
    assert rewrap("one line only", 5) == "one line only"


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), text=st.text(alphabet="ab “”‘’—\n-", max_size=200))
def test_a_variant_keeps_the_words_of_any_text(seed, text):
    variant = typographic_variant(text, random.Random(seed))
    assert words(variant) == words(text)
    assert variant == typographic_variant(text, random.Random(seed))  # the seed decides it


def test_variants_differ_from_copy_to_copy():
    variants = {typographic_variant(SAMPLE, random.Random(seed)) for seed in range(20)}
    assert len(variants) >= 10 and ascii_typography(SAMPLE) != SAMPLE
    assert any(v.isascii() for v in variants) and any("—" in v for v in variants)
    assert ASCII.wrap == 66


def test_retyped_copies_are_the_last_training_copies():
    documents = [SAMPLE * 20]
    tokenizer = train_tokenizer(split_documents(documents, 0.1)[0], vocab_size=300)
    eot = special_id(tokenizer, EOT)
    train_text = split_documents(documents, 0.1)[0][0]

    def copies(retyped: float) -> list[str]:
        splits = prepare_splits(documents, tokenizer, 0.1, bpe_dropout=0.1, copies=5, seed=3, retyped=retyped)
        return [decode(tokenizer, c.tolist()) for c in np.split(splits.train, np.flatnonzero(splits.train == eot)[1:])]

    plain, half = copies(0.0), copies(0.5)
    assert plain == [train_text] * 5
    assert half[:3] == [train_text] * 3  # the plain tokenization and two BPE-dropout copies
    assert all(copy != train_text and words(copy) == words(train_text) for copy in half[3:])
    assert half == copies(0.5)  # and the run's seed decides them
