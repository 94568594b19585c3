"""A memory of the training text: the network's next-token distribution mixed with its nearest neighbours.

kNN-LM (Khandelwal et al., 2020). At the end of training, every position of the (plainly tokenized) training
split is stored as a key, the network's final hidden state there, and a value, the token that came next. To
predict, the hidden state h of the current context weighs every stored position by softmax(-|h - key|^2 / T)
and adds the weights up per value token: a distribution over what followed similar contexts in the training
text. The model's prediction is the mixture

    p(token) = (1 - w) * p_network(token) + w * p_memory(token)

with w = model.memory_weight and T = model.memory_temperature. The memory also keeps the training tokens
themselves and, with model.memory_ngram_weight = v > 0, counts them into a Kneser-Ney n-gram model (gpt.ngram)
that takes a share of its own:

    p(token) = (1 - w - v) * p_network(token) + w * p_memory(token) + v * p_ngram(token | last tokens)

All parts are normalized distributions, so the mixture is one too, and scoring held-out text with it is as valid
as scoring the network alone; the memory holds only the training split. On a small text the network, trained
for many passes, is sure of what it memorised; the neighbours spread that knowledge over similar contexts, and
the counts know exactly which words followed which (docs/training.md, rounds 9 and 10). A network and its
memory together are a gpt.predictor.Predictor, what samples and scores with the mixture.

The keys are the hidden states' top model.memory_dim principal components (their mean subtracted), and every
query is projected the same way: a sample reads an eighth of the keys' bytes at 64 of 512 dimensions, and the
neighbours are no worse for it (docs/training.md, round 24). How sharply the neighbours are weighed depends on
how far training has pulled the states apart, so a run picks the temperature on its validation split
(`tune_temperature`), as it picks the weights it keeps.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gpt.config import ModelConfig
from gpt.dataset import checked_stride, window_batches
from gpt.decoding import blocked_linear
from gpt.model import GPT
from gpt.ngram import NGram, token_contexts

MEMORY_MAX_BYTES = 256 * 2**20  # fp16 keys; beyond this a text is long enough that the network alone suffices
QUERY_CHUNK = 256  # queries scored at once: QUERY_CHUNK x keys floats of scratch memory
SCAN_BLOCKS = 64  # the key rows divide into 2 blocks per thread for up to 32 threads (decoding.row_blocks_of)
TEMPERATURE_STEPS = tuple(2 ** (k / 3) for k in range(-6, 4))  # x 1/4 ... x 2 the configured temperature
KEY_CHUNK = 65536  # keys projected at once
TUNED_EVERY = 8  # every eighth validation target chooses the temperature: each one costs a softmax over the keys


class Memory:
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, text: torch.Tensor, config: ModelConfig,
                 device="cpu", axes: tuple[torch.Tensor, torch.Tensor] | None = None):
        """keys (N, D): hidden states (D = E), or with `axes` = (center (E,), directions (E, D)) their projections."""
        self.axes = None if axes is None else tuple(a.float().to(device) for a in axes)
        # the keys as decoding's row blocks, each block's keys contiguous as columns: rows padded to a multiple of
        # SCAN_BLOCKS, each padding key infinitely far from every query (weight 0), so that one query's distances
        # run on every thread (2.3 ms against 4.0 for the strided blocks of the key rows, 40K keys, docs/benchmarks.md)
        pad = -len(keys) % SCAN_BLOCKS
        rows, threads = len(keys) + pad, torch.get_num_threads()
        blocks = next((b for b in (2 * threads, threads) if rows % b == 0), 1)
        self.scanned = torch.zeros(blocks, keys.size(1), rows // blocks, device=device)  # (blocks, E, N' / blocks)
        for block, part in enumerate(keys.split(rows // blocks)):
            self.scanned[block, :, : len(part)] = part.T
        norms = torch.cat([(part.float().to(device) ** 2).sum(-1) for part in keys.split(rows // blocks)])
        self.key_norms = torch.cat([norms, torch.full((pad,), math.inf, device=device)])  # (N + pad,)
        self.values = values.to(device, torch.int64)  # (N,)
        self.scanned_values = torch.cat([self.values, self.values.new_zeros(pad)])  # (N + pad,)
        self.text = text.to(torch.int64)  # the plain training tokens the keys were read from
        self.weight = config.memory_weight  # in (0, 1): load_memory and the trainer build none at 0
        self.temperature = config.memory_temperature
        self.vocab_size = config.vocab_size
        self.ngram_weight, self.ngram = config.memory_ngram_weight, None
        if self.ngram_weight > 0:
            self.ngram = NGram(self.text.numpy(), config.memory_ngram_order, config.vocab_size)

    def __len__(self) -> int:
        return len(self.values)

    @property
    def keys(self) -> torch.Tensor:
        """(N, D) the stored keys (hidden states, or their projections), in the order of the values (a copy)."""
        return self.scanned.transpose(1, 2).reshape(-1, self.scanned.size(1))[: len(self.values)]

    def query(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, E) final hidden states -> (n, D) as the keys are stored."""
        hidden = hidden.float().to(self.scanned.device)
        return hidden if self.axes is None else (hidden - self.axes[0]) @ self.axes[1]

    def distances(self, queries: torch.Tensor) -> torch.Tensor:
        """(n, D) projected queries -> (n, N + pad) squared distances to every key (padding: infinite)."""
        return (queries**2).sum(-1, keepdim=True) - 2 * blocked_linear(queries, self.scanned, None) + self.key_norms

    def probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, E) final hidden states -> (n, vocab) the memory's next-token distribution."""
        chunks = []
        for part in self.query(hidden).split(QUERY_CHUNK):
            weights = torch.softmax(-self.distances(part) / self.temperature, dim=-1)
            by_token = torch.zeros(self.vocab_size, len(part), device=part.device)
            chunks.append(by_token.index_add_(0, self.scanned_values, weights.T).T)  # (n, vocab): summed per value
        return torch.cat(chunks)

    def contexts(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) tokens -> (B, T, order - 1) what the n-gram part reads at each position (-1: nothing)."""
        return token_contexts(tokens, self.ngram.order - 1 if self.ngram else 0, pad_mask)

    def last_contexts(self, windows: list[list[int]], device=None) -> torch.Tensor:
        """contexts() at the last position of each of n windows of any lengths -> (n, order - 1)."""
        length = self.ngram.order - 1 if self.ngram else 0
        rows = [([-1] * length + list(window[-length:]))[-length:] if length else [] for window in windows]
        return torch.tensor(rows, dtype=torch.long, device=device).view(len(windows), length)

    def mix(self, hidden: torch.Tensor, logits: torch.Tensor, contexts: torch.Tensor | None = None) -> torch.Tensor:
        """(n, E) hidden states, (n, vocab) network logits and, for the n-gram part, (n, order - 1) contexts
        (`contexts()`) -> (n, vocab) log-probabilities of the mixture."""
        network = torch.log_softmax(logits.float(), dim=-1) + math.log1p(-self.weight - self.ngram_weight)
        mixture = torch.logaddexp(network, self.probs(hidden).log() + math.log(self.weight))
        if self.ngram is None:
            return mixture
        if contexts is None:
            raise ValueError("this memory has an n-gram part: pass the contexts (Memory.contexts) to mix()")
        counted = self.ngram.probs(contexts).to(mixture.device).log() + math.log(self.ngram_weight)
        return torch.logaddexp(mixture, counted)


def principal_axes(keys: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) keys -> their mean (E,) and their `dim` directions of most variance (E, dim)."""
    total, products = torch.zeros(keys.size(1), dtype=torch.float64), 0
    for part in keys.split(KEY_CHUNK):
        part = part.double()
        total, products = total + part.sum(0), products + part.T @ part
    center = total / len(keys)
    covariance = products / len(keys) - torch.outer(center, center)  # (E, E)
    directions = torch.linalg.eigh(covariance).eigenvectors[:, -dim:].flip(1)  # eigh sorts ascending
    return center.float(), directions.float().contiguous()


@torch.no_grad()
def build_memory(model: GPT, ids: np.ndarray, ignore_id: int, stride: int | None = None,
                 autocast_dtype: torch.dtype | None = None) -> Memory:
    """Keys and values for every target of `ids` except `ignore_id`, read with the windows validation uses."""
    T = model.config.sequence_len
    device = model.token_embed.weight.device
    was_training = model.training
    model.eval()
    keys, values = [], []
    for x, y, scored in window_batches(ids, T, checked_stride(stride, T), ignore_id):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            hidden = model.hidden(x.to(device))[scored.to(device)]  # (n, E)
        keys.append(hidden.half().cpu())
        values.append(y[scored])
    model.train(was_training)
    keys, axes, dim = torch.cat(keys), None, model.config.memory_dim
    if 0 < dim < keys.size(1) <= len(keys):
        axes = principal_axes(keys, dim)
        keys = torch.cat([((part.float() - axes[0]) @ axes[1]).half() for part in keys.split(KEY_CHUNK)])
    return Memory(keys, torch.cat(values), torch.from_numpy(np.asarray(ids).astype(np.int64)), model.config,
                  device, axes)


@torch.no_grad()
def tune_temperature(memory: Memory, model: GPT, ids: np.ndarray, ignore_id: int, stride: int | None = None,
                     autocast_dtype: torch.dtype | None = None) -> float:
    """Set the memory's temperature to the one of TEMPERATURE_STEPS x model.memory_temperature under which the
    mixture scores every TUNED_EVERY-th target of `ids` (the validation split) best, and return it. The distances
    are computed once; each temperature costs a softmax over them; the network and n-gram parts stay the same."""
    T, device = model.config.sequence_len, model.token_embed.weight.device
    temperatures = [model.config.memory_temperature * step for step in TEMPERATURE_STEPS]
    was_training = model.training
    model.eval()
    nats = torch.zeros(len(temperatures), dtype=torch.float64)
    for x, y, scored in window_batches(ids, T, checked_stride(stride, T), ignore_id):
        x, y, scored = x.to(device), y.to(device), scored.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            hidden = model.hidden(x)[scored][::TUNED_EVERY]  # (n, E): the sampled targets' states
            logits = model.head(hidden)
        target = y[scored][::TUNED_EVERY, None]
        network = torch.log_softmax(logits.float(), -1).gather(1, target)
        fixed = network + math.log1p(-memory.weight - memory.ngram_weight)  # (n, 1) all but the neighbours
        if memory.ngram is not None:
            counted = memory.ngram.probs(memory.contexts(x)[scored][::TUNED_EVERY]).to(device).gather(1, target)
            fixed = torch.logaddexp(fixed, counted.log() + math.log(memory.ngram_weight))
        queries = memory.query(hidden)
        for part, rest, tokens in zip(queries.split(QUERY_CHUNK), fixed.split(QUERY_CHUNK), target.split(QUERY_CHUNK)):
            distances, same = memory.distances(part), memory.scanned_values[None, :] == tokens  # (n, N + pad)
            for i, temperature in enumerate(temperatures):
                recalled = (torch.softmax(-distances / temperature, dim=-1) * same).sum(-1, keepdim=True)
                nats[i] -= torch.logaddexp(rest, recalled.log() + math.log(memory.weight)).double().sum().cpu()
    model.train(was_training)
    memory.temperature = temperatures[int(nats.argmin())]
    return memory.temperature


def fits(num_tokens: int, config: ModelConfig) -> bool:
    return config.memory_weight > 0 and num_tokens * config.embed_dim * 2 <= MEMORY_MAX_BYTES
