"""Scoring held-out text: loss, perplexity, bits per character and per byte.

Every token of the text is scored exactly once, with as much context as the window allows:
windows of sequence_len tokens advance by `stride` (default sequence_len // 2), and each window
scores only the tokens the previous one did not, so every scored token past the first window
sees at least sequence_len - stride tokens of context. Each document starts with the end-of-text
token, which serves as context for its first token and is never scored itself. Because the
tokenizer is lossless and every character is covered once, bits per character is comparable
across tokenizers: total nats / (characters * ln 2).

What is scored is a Predictor (gpt.predictor): a network with a memory of its training text (gpt.memory) is
scored with it, since the mixture is the model's prediction; a bare GPT is the network alone.

`adapt_lr` turns on dynamic evaluation (Krause et al., 2018): the same windows, in order, and after each one a
copy of the network (without the memory) takes a gradient step on the tokens it has just scored. Every token is
still predicted before the model learns from it, so this is the code length an adaptive compressor such as PPMd
reports: a different number from the plain score, and labelled as such wherever it is printed.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from gpt.config import UsageError
from gpt.dataset import checked_stride, encode_documents, window_batches, windows
from gpt.model import GPT
from gpt.predictor import Predictor
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


@torch.no_grad()
def total_nats(
    model: GPT | Predictor, ids: np.ndarray, ignore_id: int, stride: int | None = None, batch_size: int = 32,
    autocast_dtype: torch.dtype | None = None, adapt_lr: float | None = None,
) -> tuple[float, int]:
    """Sum of -log p over every target token except `ignore_id`, and how many were scored."""
    predictor = Predictor.of(model)
    if adapt_lr is not None:
        return adaptive_nats(predictor.network, ids, ignore_id, stride, adapt_lr)
    network, memory, device = predictor.network, predictor.memory, predictor.device
    T = network.config.sequence_len
    was_training = network.training
    network.eval()
    nats, count = torch.zeros((), dtype=torch.float64), 0
    for x, y, scored in window_batches(ids, T, checked_stride(stride, T), ignore_id, batch_size):
        x, y, scored = x.to(device), y.to(device), scored.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if memory is None:  # forward() itself: under FSDP its hooks gather the sharded parameters
                logits = network(x)[scored]  # (n, vocab): the scored positions
            else:
                hidden = network.hidden(x)[scored]  # (n, E)
                logits = network.head(hidden)
        if memory is None:
            losses = F.cross_entropy(logits.float(), y[scored], reduction="none")
        else:  # the mixture in float32, outside autocast
            contexts = memory.contexts(x)[scored]  # (n, order - 1) for the n-gram part
            losses = -memory.mix(hidden.float(), logits, contexts).gather(1, y[scored][:, None])
        nats += losses.double().sum().cpu()
        count += int(scored.sum())
    network.train(was_training)
    return float(nats), count


@torch.enable_grad()
def adaptive_nats(model: GPT, ids: np.ndarray, ignore_id: int, stride: int | None, lr: float) -> tuple[float, int]:
    """total_nats with dynamic evaluation: score a window's new tokens, then one SGD step on their mean loss.
    The network alone (a memory does not learn); the steps change a copy, and `model` is left as it was."""
    if not lr > 0:
        raise UsageError(f"the adaptation learning rate must be positive, got {lr}")
    T = model.config.sequence_len
    stride = checked_stride(stride, T)
    reader = copy.deepcopy(model).eval()  # eval: no dropout, gradients still flow
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
    model: GPT | Predictor, tokenizer: Tokenizer, documents: list[str], stride: int | None = None,
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
