"""Scoring held-out text: loss, perplexity, bits per character and per byte.

Every token of the text is scored exactly once, with as much context as the window allows:
windows of sequence_len tokens advance by `stride` (default sequence_len // 2), and each window
scores only the tokens the previous one did not, so every scored token past the first window
sees at least sequence_len - stride tokens of context. Each document starts with the end-of-text
token, which serves as context for its first token and is never scored itself. Because the
tokenizer is lossless and every character is covered once, bits per character is comparable
across tokenizers: total nats / (characters * ln 2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from gpt.config import UsageError
from gpt.dataset import encode_documents
from gpt.model import GPT
from gpt.tokenizer import EOT, special_id


@dataclass
class Score:
    loss: float  # mean nats per scored token
    perplexity: float
    bits_per_char: float
    bits_per_byte: float
    tokens: int
    chars: int

    def as_dict(self) -> dict:
        return asdict(self)


def make_score(total_nats: float, tokens: int, documents: list[str]) -> Score:
    return score_from_counts(total_nats, tokens, sum(len(d) for d in documents),
                             sum(len(d.encode("utf-8")) for d in documents))


def score_from_counts(total_nats: float, tokens: int, chars: int, utf8_bytes: int) -> Score:
    loss = total_nats / max(tokens, 1)
    return Score(loss, math.exp(min(loss, 700.0)), total_nats / (chars * math.log(2)),
                 total_nats / (utf8_bytes * math.log(2)), tokens, chars)


def windows(num_tokens: int, sequence_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, new): inputs ids[begin:end] predict ids[begin+1:end+1]; the last `new` are scored."""
    spans, scored_up_to, begin = [], 0, 0
    last_target = num_tokens - 1
    while scored_up_to < last_target:
        end = min(begin + sequence_len, last_target)
        spans.append((begin, end, end - scored_up_to))
        scored_up_to, begin = end, begin + stride
    return spans


@torch.no_grad()
def total_nats(
    model: GPT, ids: np.ndarray, ignore_id: int, stride: int | None = None, batch_size: int = 32,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[float, int]:
    """Sum of -log p over every target token except `ignore_id`, and how many were scored."""
    T = model.config.sequence_len
    stride = max(1, T // 2) if stride is None else stride
    if not 0 < stride <= T:
        raise UsageError(f"the stride must be between 1 and the context length {T}, got {stride}")
    device = model.token_embed.weight.device
    was_training = model.training
    model.eval()
    ids_t = torch.from_numpy(np.asarray(ids).astype(np.int64))
    spans = windows(len(ids_t), T, stride)
    nats, count = torch.zeros((), dtype=torch.float64), 0
    for length in sorted({end - begin for begin, end, _ in spans}):
        group = [s for s in spans if s[1] - s[0] == length]
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            x = torch.stack([ids_t[b:e] for b, e, _ in chunk]).to(device)
            y = torch.stack([ids_t[b + 1 : e + 1] for b, e, _ in chunk]).to(device)
            scored = torch.zeros_like(y, dtype=torch.bool)
            for row, (_, _, new) in enumerate(chunk):
                scored[row, length - new :] = True
            scored &= y != ignore_id
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(x)
            losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
            nats += losses[scored.flatten()].double().sum().cpu()
            count += int(scored.sum())
    model.train(was_training)
    return float(nats), count


def evaluate_documents(
    model: GPT, tokenizer: Tokenizer, documents: list[str], stride: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Score:
    ids = encode_documents(tokenizer, documents)
    nats, tokens = total_nats(model, ids, special_id(tokenizer, EOT), stride, autocast_dtype=autocast_dtype)
    return make_score(nats, tokens, documents)


def unigram_score(train_ids: np.ndarray, val_ids: np.ndarray, val_documents: list[str], eot: int,
                  vocab_size: int) -> Score:
    """A reference point: token frequencies of the training split (add-one smoothed), no context."""
    counts = np.bincount(train_ids[train_ids != eot], minlength=vocab_size) + 1.0
    log_probs = np.log(counts / counts.sum())
    targets = val_ids[1:][val_ids[1:] != eot]
    return make_score(float(-log_probs[targets].sum()), len(targets), val_documents)
