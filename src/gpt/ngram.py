"""A Kneser-Ney n-gram model of token ids: the counting half of the training text's memory (gpt.memory).

Interpolated Kneser-Ney (Chen & Goodman, 1998) with one discount D. For a context c of n tokens,

    p(w | c) = max(count(c, w) - D, 0) / count(c) + D * types(c) / count(c) * p(w | c minus its first token)

down to a uniform distribution over the vocabulary. The longest contexts count occurrences; shorter ones count
how many different tokens came before (continuation counts), which is what makes Kneser-Ney better than plain
backoff on small texts. Contexts never seen fall through to the longest one that was. Every distribution sums
to one, so mixed with the network's it scores held-out text as validly as the network alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DISCOUNT = 0.5  # mixed with the network and the neighbours, 0.4-0.6 scored within 0.001 (docs/training.md)


@dataclass
class Level:
    """The counts after contexts of one length: entries grouped by context, contexts sorted."""

    rows: dict[tuple[int, ...], int]  # context -> its row
    starts: np.ndarray  # (contexts + 1,) where each row's entries begin
    tokens: np.ndarray  # (entries,) the token that followed
    counts: np.ndarray  # (entries,) how often (longest contexts) or after how many different tokens (shorter)
    totals: np.ndarray  # (contexts,) counts summed per row


def count_level(grams: np.ndarray, counts: np.ndarray) -> Level:
    """(K, n + 1) distinct n+1-grams in sorted order and their counts -> the level of n-token contexts."""
    n = grams.shape[1] - 1
    new_row = np.zeros(len(grams), dtype=bool)
    new_row[:1] = True
    new_row[1:] = (grams[1:, :n] != grams[:-1, :n]).any(axis=1)  # all False for n = 0: one row
    first = np.flatnonzero(new_row)
    rows = {tuple(context): row for row, context in enumerate(grams[first, :n].tolist())}
    return Level(rows, np.append(first, len(grams)), grams[:, n], counts, np.add.reduceat(counts, first))


def ngrams(ids: np.ndarray, n: int) -> np.ndarray:
    """(len - n + 1, n) every run of n consecutive tokens."""
    return np.lib.stride_tricks.sliding_window_view(ids, n) if len(ids) >= n else ids[:0, None].repeat(n, 1)


class NGram:
    def __init__(self, ids: np.ndarray, order: int, vocab_size: int, discount: float = DISCOUNT):
        ids = np.asarray(ids, dtype=np.int64)
        self.order, self.vocab_size, self.discount = order, vocab_size, discount
        self.levels = []  # by context length: 0, 1, ..., order - 1
        for length in range(order):
            if length == order - 1:  # the longest contexts count occurrences
                grams, counts = np.unique(ngrams(ids, order), axis=0, return_counts=True)
            else:  # shorter ones count the distinct tokens seen before each (length + 1)-gram
                grams, counts = np.unique(np.unique(ngrams(ids, length + 2), axis=0)[:, 1:], axis=0,
                                          return_counts=True)
            self.levels.append(count_level(grams, counts))
        self.unigram = self._interpolate(torch.full((1, vocab_size), 1.0 / vocab_size), 0, np.zeros(1, np.int64))[0]

    def _interpolate(self, lower: torch.Tensor, length: int, rows: np.ndarray) -> torch.Tensor:
        """(m, vocab) distributions one token shorter, (m,) rows of the level -> (m, vocab) at this level."""
        level, D = self.levels[length], self.discount
        sizes = np.diff(level.starts)[rows]
        totals = torch.from_numpy(level.totals[rows]).float()
        out = lower * (D * torch.from_numpy(sizes).float() / totals)[:, None]
        entries = np.repeat(level.starts[rows] - np.cumsum(sizes) + sizes, sizes) + np.arange(int(sizes.sum()))
        where = torch.from_numpy(np.repeat(np.arange(len(rows)), sizes)), torch.from_numpy(level.tokens[entries])
        share = (torch.from_numpy(level.counts[entries]).float() - D) / totals[where[0]]
        return out.index_put_(where, share, accumulate=True)

    def probs(self, contexts: torch.Tensor) -> torch.Tensor:
        """(n, order - 1) the tokens before each prediction, oldest first, -1 where there is none -> (n, vocab)."""
        contexts = contexts.cpu().numpy()
        out = self.unigram.expand(len(contexts), -1).clone()
        for length in range(1, self.order):
            rows = self.levels[length].rows
            found = np.array([rows.get(tuple(c), -1) for c in contexts[:, self.order - 1 - length:].tolist()],
                             dtype=np.int64).reshape(-1)
            seen = np.flatnonzero(found >= 0)
            if not len(seen):
                break
            out[seen] = self._interpolate(out[seen], length, found[seen])
        return out


def token_contexts(tokens: torch.Tensor, length: int, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) tokens -> (B, T, length): at each position the last `length` tokens up to it, -1 before the start
    and at padding."""
    if pad_mask is not None:
        tokens = tokens.masked_fill(pad_mask, -1)
    padded = torch.nn.functional.pad(tokens, (length - 1, 0), value=-1) if length > 1 else tokens
    return padded.unfold(1, length, 1) if length else tokens[..., None][..., :0]
