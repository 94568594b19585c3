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


class Memory:
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, text: torch.Tensor, config: ModelConfig,
                 device="cpu"):
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
        """(N, E) the stored hidden states, in the order of the values (a copy)."""
        return self.scanned.transpose(1, 2).reshape(-1, self.scanned.size(1))[: len(self.values)]

    def probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, E) final hidden states -> (n, vocab) the memory's next-token distribution."""
        hidden = hidden.float().to(self.scanned.device)
        chunks = []
        for part in hidden.split(QUERY_CHUNK):
            distances = (part**2).sum(-1, keepdim=True) - 2 * blocked_linear(part, self.scanned, None) + self.key_norms
            weights = torch.softmax(-distances / self.temperature, dim=-1)
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
    return Memory(torch.cat(keys), torch.cat(values), torch.from_numpy(np.asarray(ids).astype(np.int64)),
                  model.config, device)


def fits(num_tokens: int, config: ModelConfig) -> bool:
    return config.memory_weight > 0 and num_tokens * config.embed_dim * 2 <= MEMORY_MAX_BYTES
