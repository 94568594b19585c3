"""Choosing the next token from logits, in one place for the CLI, the Python API and the server.

Order of the filters: repetition penalty, temperature, then top-k, top-p and min-p on the
tempered distribution (as transformers and llama.cpp do). Temperature 0 is greedy: the argmax
after the repetition penalty, whatever the other filters say.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt.config import UsageError


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None  # keep the k most likely tokens (0 or None: off)
    top_p: float | None = None  # keep the smallest set whose probability reaches p
    min_p: float | None = None  # keep tokens at least min_p times as likely as the most likely one
    repetition_penalty: float | None = None  # > 1 discourages tokens already in the context (CTRL's rule)

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise UsageError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise UsageError(f"top-k must be >= 0 (0 turns it off), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise UsageError(f"min-p must be in [0, 1] (0 turns it off), got {self.min_p}")
        if self.repetition_penalty is not None and not 0.0 < self.repetition_penalty < float("inf"):
            raise UsageError(f"repetition penalty must be > 0 (1 turns it off), got {self.repetition_penalty}")


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: a seen token's positive logit is divided by `penalty`, a negative one multiplied."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, vocab) -> next token ids (B,). `seen` (B, vocab) marks tokens already in each row's context."""
    logits = logits.float()
    if params.repetition_penalty not in (None, 1.0) and seen is not None:
        logits = penalize_repeats(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= params.top_p  # mass before it already >= p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
