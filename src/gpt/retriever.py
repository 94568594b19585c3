"""Text in, text out: the prompt is encoded, continued by the model and decoded as it streams.

The context always starts with the end-of-text token, as every training document did, so an
empty prompt means "begin a new text". Streaming never prints half a character: a byte-level
token can end inside a multi-byte UTF-8 character, and such text is held back until complete.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tokenizers import Tokenizer

from gpt.model import GPT
from gpt.sampling import SamplingParams
from gpt.tokenizer import EOT, decode, encode, special_id


class IncrementalDecoder:
    """Turns ids into text piece by piece, holding back a character until its last byte arrives."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = decode(self.tokenizer, self.ids)
        if text.endswith("\ufffd") or len(text) <= len(self.shown):
            return ""
        piece, self.shown = text[len(self.shown) :], text
        return piece

    def flush(self) -> str:
        """Whatever the full decode shows beyond what was returned (a character that never completed)."""
        text = decode(self.tokenizer, self.ids)
        piece, self.shown = text[len(self.shown) :], text
        return piece


class Retriever:
    def __init__(self, tokenizer: Tokenizer, model: GPT):
        self.tokenizer, self.model = tokenizer, model
        self.eot = special_id(tokenizer, EOT)

    def _context(self, prompt: str, rows: int) -> torch.Tensor:
        ids = [self.eot] + encode(self.tokenizer, prompt)
        device = self.model.token_embed.weight.device
        return torch.tensor([ids] * rows, dtype=torch.long, device=device)  # (rows, T)

    def _tokens(self, prompt: str, rows: int, max_new_tokens: int, params: SamplingParams,
                seed: int | None) -> Iterator[torch.Tensor]:
        params.validate()
        generator = torch.Generator(device=self.model.token_embed.weight.device)
        generator.manual_seed(seed) if seed is not None else generator.seed()
        context = self._context(prompt, rows)
        finished = torch.zeros(rows, dtype=torch.bool, device=context.device)
        for token in self.model.stream(context, max_new_tokens, params, generator=generator):
            token = token.masked_fill(finished, self.eot)  # (rows,)
            finished |= token == self.eot
            yield token
            if bool(finished.all()):
                return

    def stream(self, prompt: str, max_new_tokens: int = 100, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None) -> Iterator[str]:
        """Yield pieces of the continuation as they are generated; they join to the full continuation."""
        params = SamplingParams(temperature, top_k, top_p)
        decoder = IncrementalDecoder(self.tokenizer)
        for token in self._tokens(prompt, 1, max_new_tokens, params, seed):
            if int(token[0]) == self.eot:
                break
            piece = decoder.push(int(token[0]))
            if piece:
                yield piece
        rest = decoder.flush()
        if rest:
            yield rest

    def generate(self, text: str, temperature: float = 1.0, max_new_tokens: int = 100, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None) -> str:
        """The seed's API: the prompt followed by its continuation."""
        return text + "".join(self.stream(text, max_new_tokens, temperature, top_k, top_p, seed))

    def generate_batch(self, prompt: str, num_samples: int, max_new_tokens: int = 100, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None,
                       seed: int | None = None) -> list[str]:
        """`num_samples` continuations of one prompt, sampled together as a batch."""
        params = SamplingParams(temperature, top_k, top_p)
        steps = list(self._tokens(prompt, num_samples, max_new_tokens, params, seed))
        rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(num_samples)]
        texts = []
        for row in rows:
            ids = row[: row.index(self.eot)] if self.eot in row else row
            texts.append(prompt + decode(self.tokenizer, ids))
        return texts
