"""What predicts the next token: the network (gpt.model) and, where it has one, the memory of its training text
(gpt.memory), which reshapes the network's distribution. Sampling, serving and scoring ask this object, so the
network stays the plain module that training builds, and whatever is later combined with it (another network,
say) joins here rather than inside it.

Generation decodes with a KV cache, one token a step through gpt.decoding's flat step; the `Decoder` slides
the context when it outgrows the window.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gpt.config import ModelConfig
from gpt.decoding import DecodePlan, decode_hidden, matvec, step_weights
from gpt.memory import Memory
from gpt.model import GPT, KVCache
from gpt.sampling import SamplingParams, sample_next


class Predictor:
    """A network with its memory of the training text, or with None: the network alone."""

    def __init__(self, network: GPT, memory: Memory | None = None):
        self.network, self.memory = network, memory

    @classmethod
    def of(cls, model: GPT | Predictor) -> Predictor:
        """A Predictor as it is; a bare network (the seed's API passes one) as a Predictor without a memory."""
        return model if isinstance(model, Predictor) else cls(model)

    @property
    def config(self) -> ModelConfig:
        return self.network.config

    @property
    def device(self) -> torch.device:
        return self.network.token_embed.weight.device

    def last_scores(self, hidden: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor,
                    pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The next token's scores after (B, T) tokens, from the (B, E) final states and (B, vocab) network
        logits at their last position: the logits, or with a memory the mixture's log-probabilities."""
        if self.memory is None:
            return logits
        return self.memory.mix(hidden, logits, self.memory.contexts(tokens, pad_mask)[:, -1])

    def scores_after(self, hidden: torch.Tensor, logits: torch.Tensor, windows: list[list[int]]) -> torch.Tensor:
        """last_scores for rows of different lengths (gpt.batching): (n, E) final states and (n, vocab) logits
        after each row's window of tokens."""
        if self.memory is None:
            return logits
        return self.memory.mix(hidden, logits, self.memory.last_contexts(windows, hidden.device))

    @torch.no_grad()
    def stream(
        self, idx: torch.Tensor, max_new_tokens: int, params: SamplingParams | None = None,
        pad_mask: torch.Tensor | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token ids (B,) one step at a time. pad_mask (B, T) is True at (left) padding."""
        for token in self._decode(idx, max_new_tokens, params, pad_mask, generator, use_cache):
            yield token.clone()  # made outside inference mode: a tensor autograd accepts, should it meet one

    @torch.inference_mode()  # no autograd bookkeeping per op: cached steps ran 4-17% faster than in no_grad
    def _decode(
        self, idx: torch.Tensor, max_new_tokens: int, params: SamplingParams | None,
        pad_mask: torch.Tensor | None, generator: torch.Generator | None, use_cache: bool,
    ) -> Iterator[torch.Tensor]:
        params = params or SamplingParams()
        was_training = self.network.training
        self.network.eval()
        try:
            decoder = Decoder(self, idx, pad_mask, use_cache) if max_new_tokens > 0 else None
            seen = None
            if params.repetition_penalty not in (None, 1.0):  # every real token of the context, per row
                seen = torch.zeros(idx.size(0), self.config.vocab_size, dtype=torch.bool, device=idx.device)
                real = torch.ones_like(idx, dtype=torch.bool) if pad_mask is None else ~pad_mask
                seen[torch.arange(idx.size(0), device=idx.device)[:, None].expand_as(idx)[real], idx[real]] = True
            for step in range(max_new_tokens):
                next_token = sample_next(decoder.scores, params, generator, seen)  # (B,)
                yield next_token
                if seen is not None:
                    seen[torch.arange(idx.size(0), device=idx.device), next_token] = True
                if step + 1 < max_new_tokens:
                    decoder.append(next_token)
        finally:
            self.network.train(was_training)

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
        top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """idx (B, T) -> (B, T + max_new_tokens): the context with its continuation appended."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        params.validate()
        new = list(self.stream(idx, max_new_tokens, params, generator=generator, use_cache=use_cache))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1) if new else idx


class Decoder:
    """Incremental decoding with a KV cache whose window slides when it is full.

    The context starts as the last sequence_len tokens. When a new token would overflow the
    window, the context restarts from the last half of it and is prefilled again: one prefill
    per sequence_len / 2 tokens, and positions stay the ones the model was trained on. Without
    the cache, every step is a full forward over the same context: the reference it must match.
    """

    def __init__(self, predictor: Predictor, idx: torch.Tensor, pad_mask: torch.Tensor | None = None,
                 use_cache: bool = True):
        self.predictor, self.network, self.use_cache = predictor, predictor.network, use_cache
        self.window = predictor.config.sequence_len
        self.keep = max(1, self.window // 2)
        self.tokens = idx[:, -self.window :]  # (B, <= window): the context the next scores see
        self.pad = None if pad_mask is None else pad_mask[:, -self.window :]
        self.plan = DecodePlan(self.network, idx.size(0)) if use_cache else None
        # the output layer as the one-token step reads it (decoding's row blocks), with or without the cache
        self.head = self.plan.head if self.plan else step_weights(self.network.token_embed.weight, None, idx.size(0))
        self.scores = self._prefill()  # (B, vocab): scores for the next token

    def _prefill(self) -> torch.Tensor:
        self.cache = KVCache(self.predictor.config, self.tokens.size(0), self.tokens.device,
                             self.network.token_embed.weight.dtype) if self.use_cache else None
        return self._scores(self.network.hidden(self.tokens, self.pad, self.cache)[:, -1])

    def _scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, E) -> (B, vocab) the predictor's scores for the token after the context."""
        return self.predictor.last_scores(hidden, matvec(hidden, *self.head), self.tokens, self.pad)

    def append(self, token: torch.Tensor) -> torch.Tensor:
        """Add one token per row (B,); return the scores for the token after it."""
        step = token[:, None]  # (B, 1)
        step_pad = None if self.pad is None else torch.zeros_like(step, dtype=torch.bool)
        self.tokens = torch.cat([self.tokens, step], dim=1)
        if self.pad is not None:
            self.pad = torch.cat([self.pad, step_pad], dim=1)
        if self.tokens.size(1) > self.window:  # slide: keep the last half, prefill it again
            self.tokens = self.tokens[:, -self.keep :]
            self.pad = None if self.pad is None else self.pad[:, -self.keep :]
            self.scores = self._prefill()
        elif self.cache is None:
            self.scores = self._prefill()
        else:
            self.scores = self._scores(decode_hidden(self.network, token, self.cache, self.plan))
        return self.scores
