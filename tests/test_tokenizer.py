"""Byte-level BPE: exact round trips, special tokens, vocabulary size, saving and loading."""

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from gpt.config import UsageError
from gpt.corpus import load_documents, split_documents
from gpt.tokenizer import (
    EOT,
    PAD,
    MergeDropout,
    build_tokenizer,
    decode,
    encode,
    load_tokenizer,
    save_tokenizer,
    special_id,
    tokenizer_info,
    train_tokenizer,
)

VOCAB = 512


@pytest.fixture(scope="module")
def book() -> str:
    return load_documents("alice")[0]


@pytest.fixture(scope="module")
def tokenizer(book) -> Tokenizer:
    train, _ = split_documents([book], val_fraction=0.1)
    return train_tokenizer(train, vocab_size=VOCAB)


def test_vocab_size_is_the_requested_size(tokenizer):
    assert tokenizer.get_vocab_size() == VOCAB


def test_special_tokens_exist(tokenizer):
    pad, eot = tokenizer.token_to_id(PAD), tokenizer.token_to_id(EOT)
    assert pad is not None and eot is not None
    assert pad != eot
    assert special_id(tokenizer, PAD) == pad
    assert special_id(tokenizer, EOT) == eot
    assert 0 <= pad < VOCAB and 0 <= eot < VOCAB


def test_special_id_missing_token(tokenizer):
    with pytest.raises(UsageError, match="<nope>"):
        special_id(tokenizer, "<nope>")


def test_round_trip_whole_book(tokenizer, book):
    ids = encode(tokenizer, book)
    assert decode(tokenizer, ids) == book
    assert all(0 <= i < VOCAB for i in ids)
    # BPE learned merges: far fewer tokens than UTF-8 bytes
    assert len(ids) < 0.6 * len(book.encode("utf-8"))


def test_encode_adds_no_special_tokens(tokenizer):
    ids = encode(tokenizer, "Alice was beginning")
    assert special_id(tokenizer, PAD) not in ids
    assert special_id(tokenizer, EOT) not in ids
    assert encode(tokenizer, "") == []
    assert decode(tokenizer, []) == ""


def test_decode_skips_special_ids(tokenizer):
    ids = encode(tokenizer, "Alice")
    eot, pad = special_id(tokenizer, EOT), special_id(tokenizer, PAD)
    assert decode(tokenizer, [eot] + ids + [pad, pad]) == "Alice"


def test_train_tokenizer_only_learns_from_given_text():
    small = train_tokenizer(["aaaa bbbb aaaa bbbb"] * 20, vocab_size=300)
    # 256 bytes + 2 specials + a few merges at most: the text cannot support 300 ids
    assert 258 <= small.get_vocab_size() <= 300
    assert decode(small, encode(small, "zebra 🦓")) == "zebra 🦓"


EXAMPLES = [
    "",
    " ",
    "   leading and trailing spaces   ",
    "two  spaces\tand a tab\n\nand blank lines\n",
    "\n",
    "\r\n windows line end\r",
    "“Curly quotes” and ‘single’ ones — dashes…",
    "emoji 😀🦓👩‍👩‍👧 flags 🇫🇷",
    "中文字符 日本語のテキスト 한국어",
    "combining: e\u0301 a\u0308 n\u0303 \u0301 at start",
    "zero width\u200bjoiner\u200d and bom \ufeff",
    "\x00 control \x07 chars \x1b[0m",
    "Ω≈ç√∫˜µ≤≥÷ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "[Illustration]\n\n\n\n\nAlice’s Adventures",
]


@pytest.mark.parametrize("text", EXAMPLES)
def test_round_trip_examples(tokenizer, text):
    assert decode(tokenizer, encode(tokenizer, text)) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text())
@example(text=" \t\n “x” 😀 中 e\u0301")
def test_round_trip_property(tokenizer, text):
    assert decode(tokenizer, encode(tokenizer, text)) == text


@settings(max_examples=50, deadline=None)
@given(parts=st.lists(st.sampled_from(EXAMPLES + ["Alice", " the", "\n\n", "?!"]), max_size=12))
def test_round_trip_of_concatenations(tokenizer, parts):
    text = "".join(parts)
    assert decode(tokenizer, encode(tokenizer, text)) == text


@pytest.mark.parametrize("text", ["the word <|endoftext|> in a text", "a literal [PAD] marker"])
def test_round_trip_text_that_spells_a_special_token(tokenizer, text):
    """The module promises every string maps to ids and back exactly, so this must hold too."""
    assert decode(tokenizer, encode(tokenizer, text)) == text


def test_save_and_load_round_trip(tokenizer, tmp_path, book):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tokenizer, path)
    loaded = load_tokenizer(path)
    sample = book[:5000] + " 😀 中文 e\u0301"
    assert encode(loaded, sample) == encode(tokenizer, sample)
    assert loaded.get_vocab_size() == VOCAB
    assert special_id(loaded, EOT) == special_id(tokenizer, EOT)
    assert special_id(loaded, PAD) == special_id(tokenizer, PAD)
    assert tokenizer_info(loaded) == tokenizer_info(tokenizer)
    assert decode(loaded, encode(loaded, sample)) == sample


def test_tokenizer_info(tokenizer):
    info = tokenizer_info(tokenizer)
    assert info["vocab_size"] == VOCAB
    assert info["pad_id"] == tokenizer.token_to_id(PAD)
    assert info["eot_id"] == tokenizer.token_to_id(EOT)
    assert len(info["sha256_of_json"]) == 64


def test_load_missing_tokenizer(tmp_path):
    with pytest.raises(UsageError) as info:
        load_tokenizer(tmp_path / "tokenizer.json")
    assert "not found" in str(info.value)


@pytest.mark.parametrize("content", ["this is not json", "{}", '{"model": 3}', ""])
def test_load_garbage_tokenizer(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError) as info:
        load_tokenizer(path)
    assert "tokenizer.json" in str(info.value)


def test_load_binary_garbage_tokenizer(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(b"\x00\xff\xfe garbage \x80")
    with pytest.raises(UsageError):
        load_tokenizer(path)


def test_build_tokenizer_without_arguments():
    tokenizer = build_tokenizer()
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.get_vocab_size() == 1024
    assert tokenizer.token_to_id(EOT) is not None
    assert decode(tokenizer, encode(tokenizer, "Alice’s Adventures")) == "Alice’s Adventures"


def test_build_tokenizer_with_texts():
    tokenizer = build_tokenizer(["hello world " * 30], vocab_size=300)
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.get_vocab_size() <= 300
    assert decode(tokenizer, encode(tokenizer, "hello world")) == "hello world"


def test_merge_dropout_at_zero_is_the_plain_tokenizer(tokenizer, book):
    """The merges are applied in the library's order: without dropout, the same ids as tokenizers' own BPE."""
    plain = MergeDropout(tokenizer, 0.0, seed=1)
    assert plain.encode(book[:20_000]) == encode(tokenizer, book[:20_000])
    for text in EXAMPLES:
        assert plain.encode(text) == encode(tokenizer, text), text


@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_merge_dropout_is_lossless_and_finer(tokenizer, text):
    ids = MergeDropout(tokenizer, 0.3, seed=2).encode(text)
    assert decode(tokenizer, ids) == text
    assert len(ids) >= len(encode(tokenizer, text))


def test_merge_dropout_repeats_from_its_seed(tokenizer, book):
    text = book[:5_000]
    first, again, other = (MergeDropout(tokenizer, 0.1, seed).encode(text) for seed in (7, 7, 8))
    assert first == again and first != other
    assert 1.1 < len(first) / len(encode(tokenizer, text)) < 1.4  # p = 0.1: about a quarter more tokens


def test_merge_dropout_refuses_tokenizers_it_cannot_reproduce():
    odd = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")], ignore_merges=True))
    odd.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    with pytest.raises(UsageError, match="bpe_dropout = 0"):
        MergeDropout(odd, 0.1, seed=0)
