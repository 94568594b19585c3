"""Token ids on disk, the tokenized train/validation splits, and the windows the model learns from.

The split (gpt.corpus.split_documents) is by characters, before tokenizing: the first 90% of the corpus's
characters train, the last 10% validate (`val_fraction`). Each document's ids start with the end-of-text
token, so the first real token is predicted from it and every character can be scored.

Training batches are windows drawn without replacement: the stream of window starts is an endless
sequence of random permutations (one per epoch, seeded), and step s takes the next batch_size of
them. A batch is a function of (seed, step) alone, which makes resuming exact.

Held-out text is read in sliding windows instead (`windows`): every target once, each with as much context as
the window allows; scoring (gpt.evaluate) and the memory's keys (gpt.memory) both read it so.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from gpt.config import UsageError
from gpt.corpus import load_documents, split_documents
from gpt.tokenizer import EOT, MergeDropout, encode, special_id, text_chunks
from gpt.typography import typographic_variant


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode_documents(tokenizer: Tokenizer, documents: list[str], dropout: MergeDropout | None = None) -> np.ndarray:
    """[EOT] + ids of each document, concatenated; long documents are encoded piece by piece to bound memory.
    With `dropout`, the documents are segmented with BPE dropout."""
    dtype = token_dtype(tokenizer.get_vocab_size())
    eot = np.array([special_id(tokenizer, EOT)], dtype=dtype)
    pieces = []
    for doc in documents:
        pieces.append(eot)
        pieces += [np.array(encode(tokenizer, chunk) if dropout is None else dropout.encode(chunk), dtype=dtype)
                   for chunk in text_chunks(doc)]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def write_tokens(path: Path, ids: np.ndarray) -> np.ndarray:
    """Write ids atomically as a raw binary file and return it memory-mapped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    ids.tofile(temporary)
    os.replace(temporary, path)
    return np.memmap(path, dtype=ids.dtype, mode="r")


@dataclass
class TokenSplits:
    train: np.ndarray
    val: np.ndarray
    val_text: list[str]  # empty for prepared shards, which keep only the counts below
    val_chars: int = 0
    val_bytes: int = 0
    copies: int = 1  # tokenizations of the training text in `train` (BPE dropout)
    plain_tokens: int | None = None  # the plain tokenization's length, at the start of `train`; None: all of it

    @property
    def plain_train(self) -> np.ndarray:
        """The plain tokenization of the training text (what the memory stores), without the BPE-dropout copies."""
        return self.train[: self.plain_tokens]


DROPOUT_MAX_CHARS = 10_000_000  # characters segmented with BPE dropout, all copies (~0.5 s per 130k measured)


def prepare_splits(
    documents: list[str], tokenizer: Tokenizer, val_fraction: float, folder: Path | None = None,
    bpe_dropout: float = 0.0, copies: int = 1, seed: int = 0, retyped: float = 0.0,
) -> TokenSplits:
    """Tokenize both splits; with a folder, keep them there as memory-mapped files.

    With BPE dropout the training split holds `copies` tokenizations of the training text: the plain one,
    then the rest with dropout, each from its own seed (a small text's regulariser: fewer copies when the
    text is long, none beyond DROPOUT_MAX_CHARS). A `retyped` share of those copies is first rewritten in a
    typography drawn for the copy (gpt.typography), so that other quotes, dashes and line lengths are the same
    text to the model. Validation is always tokenized plainly, as it is.
    """
    train_docs, val_docs = split_documents(documents, val_fraction)
    if not train_docs or not val_docs:
        characters = sum(len(d) for d in documents)
        raise UsageError(f"the text has {characters} characters, too few to split into training and validation "
                         "parts; use a longer text")
    train_ids = encode_documents(tokenizer, train_docs)
    plain_tokens = len(train_ids)
    extra = min(copies - 1, DROPOUT_MAX_CHARS // max(1, sum(map(len, train_docs)))) if bpe_dropout else 0
    if extra > 0:
        variants = [encode_documents(tokenizer, training_copy(train_docs, copy, extra, retyped, seed),
                                     MergeDropout(tokenizer, bpe_dropout, (seed << 20) + copy))
                    for copy in range(1, extra + 1)]
        train_ids = np.concatenate([train_ids, *variants])
    val_ids = encode_documents(tokenizer, val_docs)
    if folder is not None:
        train_ids = write_tokens(Path(folder) / "train.bin", train_ids)
        val_ids = write_tokens(Path(folder) / "val.bin", val_ids)
    return TokenSplits(train_ids, val_ids, val_docs, sum(map(len, val_docs)),
                       sum(len(d.encode("utf-8")) for d in val_docs), copies=1 + max(0, extra),
                       plain_tokens=plain_tokens)


def training_copy(documents: list[str], copy: int, copies: int, retyped: float, seed: int) -> list[str]:
    """Copy `copy` (1 .. copies) of the training documents: the last round(retyped * copies) in another
    typography, drawn from the run's seed and the copy's number."""
    if copy <= copies - round(retyped * copies):
        return documents
    rng = random.Random((seed << 20) + copy)
    return [typographic_variant(doc, rng) for doc in documents]


def check_lengths(splits: TokenSplits, sequence_len: int) -> None:
    if len(splits.train) < sequence_len + 2:
        raise UsageError(
            f"the training text has {len(splits.train)} tokens, fewer than one window of {sequence_len + 1}; "
            "use more text or a preset with a shorter sequence_len"
        )
    if len(splits.val) < 2:
        raise UsageError("the validation split is empty; use a longer text")


def windows(num_tokens: int, sequence_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, new): inputs ids[begin:end] predict ids[begin+1:end+1]; the last `new` are scored."""
    spans, scored_up_to, begin = [], 0, 0
    last_target = num_tokens - 1
    while scored_up_to < last_target:
        end = min(begin + sequence_len, last_target)
        spans.append((begin, end, end - scored_up_to))
        scored_up_to, begin = end, begin + stride
    return spans


def checked_stride(stride: int | None, T: int) -> int:
    stride = max(1, T // 2) if stride is None else stride
    if not 0 < stride <= T:
        raise UsageError(f"the stride must be between 1 and the context length {T}, got {stride}")
    return stride


def window_batches(
    ids: np.ndarray, sequence_len: int, stride: int, ignore_id: int, batch_size: int = 32,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The windows of `windows` in batches of equal length: inputs x, targets y (B, T) and `scored` (B, T),
    True where a target is scored (new in its window and not `ignore_id`)."""
    ids_t = torch.from_numpy(np.asarray(ids).astype(np.int64))
    spans = windows(len(ids_t), sequence_len, stride)
    for length in sorted({end - begin for begin, end, _ in spans}):
        group = [s for s in spans if s[1] - s[0] == length]
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            x = torch.stack([ids_t[b:e] for b, e, _ in chunk])
            y = torch.stack([ids_t[b + 1 : e + 1] for b, e, _ in chunk])
            scored = torch.zeros_like(y, dtype=torch.bool)
            for row, (_, _, new) in enumerate(chunk):
                scored[row, length - new :] = True
            yield x, y, scored & (y != ignore_id)


EXACT_SHUFFLE_LIMIT = 1 << 24  # windows; beyond this an explicit permutation would take > 128 MB


class AffinePermutation:
    """i -> (a * i + b) mod n with a coprime to n: a seeded shuffle of a huge range that needs no memory."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n = n
        self.a = int(rng.integers(1, max(n, 2)))
        while math.gcd(self.a, n) != 1:
            self.a = int(rng.integers(1, max(n, 2)))
        self.b = int(rng.integers(0, n))

    def __getitem__(self, i: int) -> int:
        return (self.a * int(i) + self.b) % self.n


class WindowSampler:
    """Batches of (input, target) windows: without replacement within an epoch, a function of the step."""

    def __init__(self, ids: np.ndarray, sequence_len: int, batch_size: int, seed: int):
        self.ids, self.sequence_len, self.batch_size, self.seed = ids, sequence_len, batch_size, seed
        self.num_windows = len(ids) - sequence_len  # a window needs sequence_len + 1 tokens
        self._offsets = np.arange(sequence_len + 1)
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if self.num_windows > EXACT_SHUFFLE_LIMIT:
            return AffinePermutation(self.num_windows, np.random.default_rng([self.seed, epoch]))
        if epoch not in self._permutations:
            self._permutations = {e: p for e, p in self._permutations.items() if e >= epoch - 1}
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations[epoch] = rng.permutation(self.num_windows)
        return self._permutations[epoch]

    def starts_at(self, first: int, count: int) -> np.ndarray:
        """Window starts number first .. first + count - 1 of the endless stream of permutations."""
        epochs, within = np.divmod(np.arange(first, first + count), self.num_windows)
        return np.array([self._permutation(int(e))[i] for e, i in zip(epochs, within)])

    def starts(self, step: int) -> np.ndarray:
        return self.starts_at(step * self.batch_size, self.batch_size)

    def windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        windows = self.ids[starts[:, None] + self._offsets]  # (B, T+1)
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1], windows[:, 1:]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows(self.starts(step))


class WindowDataset(Dataset):
    """Every (input, target) window of a token array, one start position apart (the seed's Dataset)."""

    def __init__(self, ids: np.ndarray, sequence_len: int):
        if len(ids) < sequence_len + 1:
            raise UsageError(f"text has {len(ids)} tokens, fewer than one window of {sequence_len + 1}")
        self.ids, self.sequence_len = ids, sequence_len

    def __len__(self) -> int:
        return len(self.ids) - self.sequence_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.from_numpy(self.ids[index : index + self.sequence_len + 1].astype(np.int64))
        return window[:-1], window[1:]


def build_dataset(
    tokenizer: Tokenizer,
    sequence_len: int = 128,
    documents: list[str] | None = None,
    split: str = "train",
    val_fraction: float = 0.1,
) -> WindowDataset:
    """The seed's entry point: windows of Alice's (or `documents`') training or validation split."""
    if split not in ("train", "val"):
        raise UsageError(f"split must be 'train' or 'val', got {split!r}")
    if documents is None:
        documents = load_documents()
    splits = prepare_splits(documents, tokenizer, val_fraction)
    return WindowDataset(splits.train if split == "train" else splits.val, sequence_len)
