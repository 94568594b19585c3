"""Scoring held-out text: loss, perplexity, bits per character and per byte.

Every token of the text is scored exactly once, with as much context as the window allows:
windows of sequence_len tokens advance by `stride` (default sequence_len // 2), and each window
scores only the tokens the previous one did not, so every scored token past the first window
sees at least sequence_len - stride tokens of context. Each document starts with the end-of-text
token, which serves as context for its first token and is never scored itself. Because the
tokenizer is lossless and every character is covered once, bits per character is comparable
across tokenizers: total nats / (characters * ln 2).

A model with a memory of its training text (gpt.memory) is scored with it: the mixture is the model's
prediction.

`adapt_lr` turns on dynamic evaluation (Krause et al., 2018): the same windows, in order, and after each one a
copy of the network (without the memory) takes a gradient step on the tokens it has just scored. Every token is
still predicted before the model learns from it, so this is the code length an adaptive compressor such as PPMd
reports: a different number from the plain score, and labelled as such wherever it is printed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
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


@torch.no_grad()
def total_nats(
    model: GPT, ids: np.ndarray, ignore_id: int, stride: int | None = None, batch_size: int = 32,
    autocast_dtype: torch.dtype | None = None, adapt_lr: float | None = None,
) -> tuple[float, int]:
    """Sum of -log p over every target token except `ignore_id`, and how many were scored."""
    if adapt_lr is not None:
        return adaptive_nats(model, ids, ignore_id, stride, adapt_lr)
    T = model.config.sequence_len
    device = model.token_embed.weight.device
    was_training = model.training
    model.eval()
    nats, count = torch.zeros((), dtype=torch.float64), 0
    for x, y, scored in window_batches(ids, T, checked_stride(stride, T), ignore_id, batch_size):
        x, y, scored = x.to(device), y.to(device), scored.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if model.memory is None:  # forward() itself: under FSDP its hooks gather the sharded parameters
                logits = model(x)[scored]  # (n, vocab): the scored positions
            else:
                hidden = model.hidden(x)[scored]  # (n, E)
                logits = model.head(hidden)
        if model.memory is None:
            losses = F.cross_entropy(logits.float(), y[scored], reduction="none")
        else:  # the mixture in float32, outside autocast
            contexts = model.memory.contexts(x)[scored]  # (n, order - 1) for the n-gram part
            losses = -model.memory.mix(hidden.float(), logits, contexts).gather(1, y[scored][:, None])
        nats += losses.double().sum().cpu()
        count += int(scored.sum())
    model.train(was_training)
    return float(nats), count


@torch.enable_grad()
def adaptive_nats(model: GPT, ids: np.ndarray, ignore_id: int, stride: int | None, lr: float) -> tuple[float, int]:
    """total_nats with dynamic evaluation: score a window's new tokens, then one SGD step on their mean loss.
    The steps change a copy; `model` is left as it was."""
    if not lr > 0:
        raise UsageError(f"the adaptation learning rate must be positive, got {lr}")
    T = model.config.sequence_len
    stride = checked_stride(stride, T)
    memory, model.memory = model.memory, None  # the network alone: the memory does not learn
    try:
        reader = copy.deepcopy(model).eval()  # eval: no dropout, gradients still flow
    finally:
        model.memory = memory
    optimizer = torch.optim.SGD(reader.parameters(), lr=lr)
    device = reader.token_embed.weight.device
    ids_t = torch.from_numpy(np.asarray(ids).astype(np.int64)).to(device)
    nats, count = torch.zeros((), dtype=torch.float64), 0
    for begin, end, new in windows(len(ids_t), T, stride):
        targets = ids_t[begin + 1 : end + 1][-new:]
        losses = F.cross_entropy(reader(ids_t[None, begin:end])[0, -new:].float(), targets, reduction="none")
        losses = losses[targets != ignore_id]
        if losses.numel() == 0:
            continue
        nats += losses.detach().double().sum().cpu()
        count += losses.numel()
        optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        optimizer.step()
    return float(nats), count


def evaluate_documents(
    model: GPT, tokenizer: Tokenizer, documents: list[str], stride: int | None = None,
    autocast_dtype: torch.dtype | None = None, adapt_lr: float | None = None,
) -> Score:
    ids = encode_documents(tokenizer, documents)
    nats, tokens = total_nats(model, ids, special_id(tokenizer, EOT), stride, autocast_dtype=autocast_dtype,
                              adapt_lr=adapt_lr)
    return make_score(nats, tokens, documents)


def unigram_score(train_ids: np.ndarray, val_ids: np.ndarray, val_documents: list[str], eot: int,
                  vocab_size: int) -> Score:
    """A reference point: token frequencies of the training split (add-one smoothed), no context."""
    counts = np.bincount(train_ids[train_ids != eot], minlength=vocab_size) + 1.0
    log_probs = np.log(counts / counts.sum())
    targets = val_ids[1:][val_ids[1:] != eot]
    return make_score(float(-log_probs[targets].sum()), len(targets), val_documents)
