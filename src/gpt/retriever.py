"""Text in, text out: prompts are encoded, continued by the model as one batch (gpt.batching), decoded as they
stream.

The context always starts with the end-of-text token, as every training document did, so an
empty prompt means "begin a new text". Each prompt has a row of its own, at its own length.
Streaming never prints half a character (a byte-level token can end inside a multi-byte UTF-8
character) and never prints the start of a stop string: such text is held back until it is settled.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

from gpt.batching import MAX_SEED, Batch, Completion, Generation, Request
from gpt.model import GPT
from gpt.predictor import Predictor
from gpt.sampling import SamplingParams
from gpt.tokenizer import EOT, encode, special_id


class TextStream:
    """Iterator over the pieces of one continuation; once it ends, finish_reason and token counts are set."""

    def __init__(self, batch: Batch, generation: Generation):
        self._batch, self._generation = batch, generation
        self.prompt_tokens = generation.text.prompt_tokens

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        while self._generation.slot >= 0:
            self._batch.step()
            if self._generation.piece:
                return self._generation.piece
        raise StopIteration

    def close(self) -> None:
        """Stop generating (a client went away)."""
        if self._generation.slot >= 0:
            self._batch.remove(self._generation)

    @property
    def finish_reason(self) -> str | None:
        return self._generation.text.finish_reason

    @property
    def completion_tokens(self) -> int:
        return self._generation.text.completion_tokens


class Retriever:
    def __init__(self, tokenizer: Tokenizer, model: GPT | Predictor):
        """`model`: a Predictor (a checkpoint's, with its memory), or a bare GPT for the network alone."""
        self.tokenizer, self.predictor = tokenizer, Predictor.of(model)
        self.eot = special_id(tokenizer, EOT)

    def count_tokens(self, prompt: str) -> int:
        """Prompt tokens as the model sees them (the leading end-of-text token included)."""
        return 1 + len(encode(self.tokenizer, prompt))

    def _start(self, prompts: Sequence[str], max_new_tokens: int, params: SamplingParams,
               stop: str | Sequence[str] | None, seed: int | None) -> tuple[Batch, list[Generation]]:
        """A batch of the prompts, row i seeded with seed + i: the same text as each alone, or as a server's
        request with that seed (gpt.serve)."""
        batch = Batch(self.predictor, self.tokenizer, len(prompts))
        requests = [Request(p, max_new_tokens, params, stop, None if seed is None else (seed + i) % MAX_SEED)
                    for i, p in enumerate(prompts)]
        return batch, [batch.add(request) for request in requests]

    def stream(self, prompt: str, max_new_tokens: int = 100, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, *, min_p: float | None = None,
               repetition_penalty: float | None = None, stop: str | Sequence[str] | None = None) -> TextStream:
        """Pieces of the continuation as they are generated; they join to the full continuation."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
        batch, generations = self._start([prompt], max_new_tokens, params, stop, seed)
        return TextStream(batch, generations[0])

    def complete(self, prompts: Sequence[str], max_new_tokens: int = 100, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None, *,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 stop: str | Sequence[str] | None = None) -> list[Completion]:
        """Continue every prompt, all in one batch."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
        batch, generations = self._start(prompts, max_new_tokens, params, stop, seed)
        while batch.active:
            batch.step()
        return [generation.text.completion() for generation in generations]

    def generate(self, text: str, temperature: float = 1.0, max_new_tokens: int = 100, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, **sampling) -> str:
        """The seed's API: the prompt followed by its continuation."""
        return text + self.complete([text], max_new_tokens, temperature, top_k, top_p, seed, **sampling)[0].text

    def generate_batch(self, prompt: str, num_samples: int, max_new_tokens: int = 100, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                       **sampling) -> list[str]:
        """`num_samples` continuations of one prompt, sampled together as a batch."""
        completions = self.complete([prompt] * num_samples, max_new_tokens, temperature, top_k, top_p, seed,
                                    **sampling)
        return [prompt + c.text for c in completions]
