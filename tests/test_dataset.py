"""The character split, token files, and the windows the model learns from."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt.config import UsageError
from gpt.corpus import load_documents, split_documents
from gpt.dataset import (
    TokenSplits,
    WindowDataset,
    WindowSampler,
    build_dataset,
    check_lengths,
    encode_documents,
    prepare_splits,
    token_dtype,
    write_tokens,
)
from gpt.tokenizer import EOT, decode, encode, special_id, train_tokenizer


@pytest.fixture(scope="module")
def book() -> str:
    return load_documents("alice")[0]


@pytest.fixture(scope="module")
def tokenizer(book):
    return train_tokenizer(split_documents([book], 0.1)[0], vocab_size=320)


# --------------------------------------------------------------------------------------------- splitting


@settings(max_examples=200, deadline=None)
@given(documents=st.lists(st.text(max_size=60), min_size=1, max_size=8))
def test_split_cuts_at_ninety_percent(documents):
    train, val = split_documents(documents, 0.1)
    total = sum(len(d) for d in documents)
    assert "".join(train) + "".join(val) == "".join(documents)
    assert sum(len(t) for t in train) == int(0.9 * total)
    assert all(train) and all(val)  # no empty pieces
    assert len(train) + len(val) <= len([d for d in documents if d]) + 1  # only one document is cut


@settings(max_examples=100, deadline=None)
@given(
    documents=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=6),
    val_fraction=st.floats(min_value=0.01, max_value=0.99),
)
def test_split_any_fraction(documents, val_fraction):
    train, val = split_documents(documents, val_fraction)
    total = sum(len(d) for d in documents)
    assert "".join(train) + "".join(val) == "".join(documents)
    assert sum(len(t) for t in train) == int((1.0 - val_fraction) * total)


def test_split_keeps_document_boundaries():
    documents = ["aaaa", "bbbb", "cccc", "dddd", "eeeeeeeeeeeeeeeeeeeeeeee"]  # 40 characters, cut at 36
    train, val = split_documents(documents, 0.1)
    assert train == ["aaaa", "bbbb", "cccc", "dddd", "eeeeeeeeeeeeeeeeeeee"]
    assert val == ["eeee"]
    train, val = split_documents(["a" * 9, "b"], 0.1)  # cut exactly at a document boundary
    assert train == ["a" * 9]
    assert val == ["b"]


def test_alice_val_split_is_the_last_tenth(book):
    assert len(book) == 144_600
    train, val = split_documents([book], 0.1)
    assert val == [book[-14_460:]]
    assert train == [book[:-14_460]]
    assert len(train[0]) == 130_140


# -------------------------------------------------------------------------------------------- token ids


def test_token_dtype():
    assert token_dtype(320) == np.uint16
    assert token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.uint32


def test_encode_documents_prefixes_eot(tokenizer):
    documents = ["Alice was beginning", "to get very tired 😀", "x"]
    ids = encode_documents(tokenizer, documents)
    eot = special_id(tokenizer, EOT)
    expected = []
    for doc in documents:
        expected += [eot] + encode(tokenizer, doc)
    assert ids.tolist() == expected
    assert ids.dtype == np.uint16
    assert int((ids == eot).sum()) == len(documents)
    pieces = np.split(ids, np.flatnonzero(ids == eot))[1:]
    assert [decode(tokenizer, p[1:].tolist()) for p in pieces] == documents


def test_encode_no_documents(tokenizer):
    ids = encode_documents(tokenizer, [])
    assert len(ids) == 0


def test_write_tokens_memmap(tmp_path, tokenizer, book):
    ids = encode_documents(tokenizer, [book[:3000]])
    path = tmp_path / "deep" / "train.bin"
    mapped = write_tokens(path, ids)
    assert isinstance(mapped, np.memmap)
    assert mapped.dtype == ids.dtype
    np.testing.assert_array_equal(mapped, ids)
    assert path.stat().st_size == ids.nbytes
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.bin"]  # no temporary left
    np.testing.assert_array_equal(np.fromfile(path, dtype=ids.dtype), ids)


def test_prepare_splits_with_and_without_folder(tmp_path, tokenizer, book):
    documents = [book[:2000], book[2000:4000]]
    in_memory = prepare_splits(documents, tokenizer, 0.1)
    on_disk = prepare_splits(documents, tokenizer, 0.1, tmp_path)
    np.testing.assert_array_equal(in_memory.train, on_disk.train)
    np.testing.assert_array_equal(in_memory.val, on_disk.val)
    assert (tmp_path / "train.bin").is_file() and (tmp_path / "val.bin").is_file()
    assert in_memory.val_text == split_documents(documents, 0.1)[1]
    eot = special_id(tokenizer, EOT)
    assert in_memory.train[0] == eot and in_memory.val[0] == eot


def test_bpe_dropout_copies_follow_the_plain_training_tokens(tokenizer, book, monkeypatch):
    documents = [book[:3000], book[3000:6000]]
    plain = prepare_splits(documents, tokenizer, 0.1)
    noisy = prepare_splits(documents, tokenizer, 0.1, bpe_dropout=0.1, copies=4, seed=5)
    n = len(plain.train)
    np.testing.assert_array_equal(noisy.train[:n], plain.train)  # the plain tokenization comes first
    np.testing.assert_array_equal(noisy.val, plain.val)  # validation is never perturbed
    eot, text = special_id(tokenizer, EOT), "".join(split_documents(documents, 0.1)[0])
    starts = np.flatnonzero(noisy.train == eot)
    copies = np.split(noisy.train, starts[::2][1:])  # two training documents per copy
    assert len(copies) == noisy.copies == 4 and plain.copies == 1
    assert all(decode(tokenizer, c.tolist()) == text for c in copies)
    assert len({c.tobytes() for c in copies}) == 4 and min(map(len, copies[1:])) > n
    again = prepare_splits(documents, tokenizer, 0.1, bpe_dropout=0.1, copies=4, seed=5)
    np.testing.assert_array_equal(again.train, noisy.train)
    monkeypatch.setattr("gpt.dataset.DROPOUT_MAX_CHARS", 2 * len(text))  # a long text gets fewer copies
    assert len(np.flatnonzero(prepare_splits(documents, tokenizer, 0.1, bpe_dropout=0.1, copies=4).train == eot)) == 6


# ------------------------------------------------------------------------------------------ check_lengths


def test_check_lengths_too_short_training_text():
    splits = TokenSplits(train=np.arange(9, dtype=np.uint16), val=np.arange(5, dtype=np.uint16), val_text=["x"])
    with pytest.raises(UsageError, match="sequence_len"):
        check_lengths(splits, sequence_len=8)
    check_lengths(TokenSplits(np.arange(10, dtype=np.uint16), splits.val, ["x"]), sequence_len=8)


def test_check_lengths_empty_validation():
    splits = TokenSplits(train=np.arange(100, dtype=np.uint16), val=np.arange(1, dtype=np.uint16), val_text=[])
    with pytest.raises(UsageError, match="validation"):
        check_lengths(splits, sequence_len=8)


def test_check_lengths_on_short_real_text(tokenizer):
    splits = prepare_splits(["A very short text."], tokenizer, 0.1)
    with pytest.raises(UsageError, match="fewer than one window"):
        check_lengths(splits, sequence_len=128)


def test_one_character_text_is_a_usage_error(tokenizer, tmp_path):
    """As gpt train does it: prepare the splits into a folder, then check them. A one-character text
    has an empty training split; that must end as a UsageError, not a crash while writing the files."""
    with pytest.raises(UsageError):
        splits = prepare_splits(["a"], tokenizer, 0.1, tmp_path)
        check_lengths(splits, sequence_len=8)


# ------------------------------------------------------------------------------------------- the sampler


def _starts_of(sampler: WindowSampler, steps: int) -> np.ndarray:
    """Window starts read off the batches: the ids are 0, 1, 2, ... so a window's first input is its start."""
    return np.concatenate([sampler.batch(step)[0][:, 0].numpy() for step in range(steps)])


def test_batch_shapes_and_shift():
    ids = np.arange(200, dtype=np.uint16)
    sampler = WindowSampler(ids, sequence_len=16, batch_size=4, seed=0)
    x, y = sampler.batch(3)
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # consecutive ids: the target is the next token
    np.testing.assert_array_equal(x[:, 0].numpy(), sampler.starts(3))


def test_batch_is_shifted_on_real_tokens(tokenizer, book):
    ids = encode_documents(tokenizer, [book[:5000]])
    sampler = WindowSampler(ids, sequence_len=32, batch_size=8, seed=5)
    for step in (0, 7):
        x, y = sampler.batch(step)
        for row, start in enumerate(sampler.starts(step)):
            assert x[row].tolist() == ids[start : start + 32].tolist()
            assert y[row].tolist() == ids[start + 1 : start + 33].tolist()


def test_batch_is_a_function_of_seed_and_step():
    ids = np.random.default_rng(0).integers(0, 300, 500).astype(np.uint16)
    first = WindowSampler(ids, sequence_len=8, batch_size=5, seed=42)
    second = WindowSampler(ids, sequence_len=8, batch_size=5, seed=42)
    later = [second.batch(step) for step in (400, 250, 3)]  # visit far epochs first, in another order
    for (x, y), step in zip(later, (400, 250, 3)):
        fx, fy = first.batch(step)
        assert torch.equal(x, fx) and torch.equal(y, fy)
    for step in range(10):
        a, b = first.batch(step), second.batch(step)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(first.batch(0)[0], first.batch(0)[0])


def test_different_seeds_differ():
    ids = np.arange(1000, dtype=np.uint16)
    a = WindowSampler(ids, sequence_len=8, batch_size=8, seed=1)
    b = WindowSampler(ids, sequence_len=8, batch_size=8, seed=2)
    assert not np.array_equal(_starts_of(a, 4), _starts_of(b, 4))


def test_consecutive_steps_differ():
    ids = np.arange(1000, dtype=np.uint16)
    sampler = WindowSampler(ids, sequence_len=8, batch_size=8, seed=1)
    assert not np.array_equal(sampler.starts(0), sampler.starts(1))


def test_one_epoch_visits_every_window_once_divisible():
    sequence_len, batch_size, num_windows = 10, 6, 24
    ids = np.arange(num_windows + sequence_len, dtype=np.uint16)
    sampler = WindowSampler(ids, sequence_len, batch_size, seed=3)
    assert sampler.num_windows == num_windows
    starts = _starts_of(sampler, num_windows // batch_size)
    assert sorted(starts.tolist()) == list(range(num_windows))
    assert starts.tolist() != list(range(num_windows))  # shuffled, not in order


@settings(max_examples=40, deadline=None)
@given(
    num_windows=st.integers(1, 60),
    sequence_len=st.integers(1, 12),
    batch_size=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
)
def test_epochs_are_permutations(num_windows, sequence_len, batch_size, seed):
    ids = np.arange(num_windows + sequence_len, dtype=np.uint16)
    sampler = WindowSampler(ids, sequence_len, batch_size, seed)
    steps = math.ceil(2 * num_windows / batch_size)
    starts = _starts_of(sampler, steps)
    assert len(starts) == steps * batch_size
    first, second = starts[:num_windows], starts[num_windows : 2 * num_windows]
    assert sorted(first.tolist()) == list(range(num_windows))  # without replacement within an epoch
    assert sorted(second.tolist()) == list(range(num_windows))
    assert starts.max() + sequence_len < len(ids)  # every window fits, its target included


# ----------------------------------------------------------------------------------- the seed's Dataset


def test_window_dataset_pairs():
    ids = np.arange(50, dtype=np.uint16) * 3
    dataset = WindowDataset(ids, sequence_len=8)
    assert len(dataset) == 42
    for index in (0, 17, len(dataset) - 1):
        x, y = dataset[index]
        assert x.shape == y.shape == (8,)
        assert x.tolist() == ids[index : index + 8].tolist()
        assert y.tolist() == ids[index + 1 : index + 9].tolist()


def test_window_dataset_too_short():
    with pytest.raises(UsageError, match="fewer than one window"):
        WindowDataset(np.arange(8, dtype=np.uint16), sequence_len=8)
    assert len(WindowDataset(np.arange(9, dtype=np.uint16), sequence_len=8)) == 1


def test_build_dataset_on_documents(tokenizer, book):
    documents = [book[:4000]]
    train = build_dataset(tokenizer, sequence_len=24, documents=documents)
    val = build_dataset(tokenizer, sequence_len=24, documents=documents, split="val")
    splits = prepare_splits(documents, tokenizer, 0.1)
    assert len(train) == len(splits.train) - 24
    assert len(val) == len(splits.val) - 24
    for dataset in (train, val):
        for index in (0, len(dataset) // 2, len(dataset) - 1):
            x, y = dataset[index]
            assert len(x) == len(y) == 24
            assert torch.equal(x[1:], y[:-1])
    x, _ = val[0]
    assert x[0].item() == special_id(tokenizer, EOT)
    assert decode(tokenizer, val[len(val) - 1][1].tolist()) == decode(tokenizer, splits.val[-24:].tolist())


def test_build_dataset_default_is_alice(tokenizer, book):
    dataset = build_dataset(tokenizer, sequence_len=64)
    ids = encode_documents(tokenizer, split_documents([book], 0.1)[0])
    assert len(dataset) == len(ids) - 64
    x, y = dataset[100]
    assert x.tolist() == ids[100:164].tolist()
    assert y.tolist() == ids[101:165].tolist()


def test_build_dataset_bad_split(tokenizer):
    with pytest.raises(UsageError, match="split"):
        build_dataset(tokenizer, sequence_len=8, documents=["some text"], split="test")
