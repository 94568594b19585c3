"""Text in, text out: prompts are encoded, continued by the model as one batch, decoded as they stream.

The context always starts with the end-of-text token, as every training document did, so an
empty prompt means "begin a new text". Prompts of different lengths are left-padded and masked.
Streaming never prints half a character (a byte-level token can end inside a multi-byte UTF-8
character) and never prints the start of a stop string: such text is held back until it is settled.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from gpt.model import GPT
from gpt.predictor import Predictor
from gpt.sampling import SamplingParams
from gpt.tokenizer import EOT, PAD, encode, special_id, token_bytes


class IncrementalDecoder:
    """Turns ids into text piece by piece: UTF-8 decoding of the ids' bytes, a character once it is complete."""

    def __init__(self, table: list[bytes]):
        self.table = table  # id -> bytes, from gpt.tokenizer.token_bytes
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # same rule as the full decode

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.table[token_id])

    def flush(self) -> str:
        """Bytes of a character that never completed, shown as the full decode shows them."""
        return self.utf8.decode(b"", final=True)


@dataclass
class Completion:
    text: str  # the continuation, without the prompt, cut before a stop string
    finish_reason: str  # "stop" (end of text or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


class Continuation:
    """One row of a batch: its text so far, how much of it was handed out, and why it ended."""

    def __init__(self, table: list[bytes], stop: Sequence[str], prompt_tokens: int):
        self.decoder = IncrementalDecoder(table)
        self.stop = [s for s in stop if s]
        self.text, self.shown = "", 0
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self.finish_reason: str | None = None

    def push(self, token_id: int, eot: int) -> str:
        """Add a generated token; return the text that is now safe to show."""
        if token_id == eot:
            return self.finish("stop")
        self.completion_tokens += 1
        self.text += self.decoder.push(token_id)
        if self._cut_at_stop():
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def finish(self, reason: str) -> str:
        if self.finish_reason is None:
            self.text += self.decoder.flush()
            self._cut_at_stop()
            self.finish_reason = self.finish_reason or reason
        return self._release(len(self.text))

    def _cut_at_stop(self) -> bool:
        """A stop string can only start in text not yet shown: what was shown never began one."""
        hits = [at for at in (self.text.find(s, self.shown) for s in self.stop) if at >= 0]
        if hits:
            self.text, self.finish_reason = self.text[: min(hits)], "stop"
        return bool(hits)

    def _held_back(self) -> int:
        """Length of the longest ending of the text that could still grow into a stop string."""
        for size in range(min(len(self.text) - self.shown, max(map(len, self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(self.text[-size:]) for s in self.stop):
                return size
        return 0

    def _release(self, end: int) -> str:
        piece, self.shown = self.text[self.shown : end], max(self.shown, end)
        return piece


class TextStream:
    """Iterator over the pieces of one continuation; once it ends, finish_reason and token counts are set."""

    def __init__(self, steps: Iterator[list[str]], row: Continuation):
        self._steps, self._row = steps, row
        self.prompt_tokens = row.prompt_tokens

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        for pieces in self._steps:
            if pieces[0]:
                return pieces[0]
        raise StopIteration

    def close(self) -> None:
        """Stop generating (a client went away)."""
        self._steps.close()

    @property
    def finish_reason(self) -> str | None:
        return self._row.finish_reason

    @property
    def completion_tokens(self) -> int:
        return self._row.completion_tokens


class Retriever:
    def __init__(self, tokenizer: Tokenizer, model: GPT | Predictor):
        """`model`: a Predictor (a checkpoint's, with its memory), or a bare GPT for the network alone."""
        self.tokenizer, self.predictor = tokenizer, Predictor.of(model)
        self.eot = special_id(tokenizer, EOT)
        self.pad = tokenizer.token_to_id(PAD)
        self.table = token_bytes(tokenizer)

    def count_tokens(self, prompt: str) -> int:
        """Prompt tokens as the model sees them (the leading end-of-text token included)."""
        return 1 + len(encode(self.tokenizer, prompt))

    def _batch(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = [[self.eot] + encode(self.tokenizer, p) for p in prompts]
        longest = max(map(len, rows))
        filler = self.eot if self.pad is None else self.pad
        device = self.predictor.device
        idx = torch.tensor([[filler] * (longest - len(r)) + r for r in rows], dtype=torch.long, device=device)
        if all(len(r) == longest for r in rows):
            return idx, None
        pad_mask = torch.tensor([[True] * (longest - len(r)) + [False] * len(r) for r in rows], device=device)
        return idx, pad_mask  # (B, T) each, padding on the left

    def _steps(self, prompts: Sequence[str], max_new_tokens: int, params: SamplingParams, seed: int | None,
               rows: list[Continuation]) -> Iterator[list[str]]:
        """Generate for every prompt at once; yield each row's new text after every token."""
        idx, pad_mask = self._batch(prompts)
        generator = torch.Generator(device=idx.device)
        generator.manual_seed(seed) if seed is not None else generator.seed()
        done = [False] * len(rows)
        for token in self.predictor.stream(idx, max_new_tokens, params, pad_mask, generator):
            pieces = []
            for i, (row, token_id) in enumerate(zip(rows, token.tolist())):
                pieces.append("" if done[i] else row.push(token_id, self.eot))
                done[i] = row.finish_reason is not None
            yield pieces
            if all(done):
                return
        yield [row.finish("length") if row.finish_reason is None else "" for row in rows]

    def _start(self, prompts: Sequence[str], max_new_tokens: int, params: SamplingParams,
               stop: str | Sequence[str] | None, seed: int | None):
        params.validate()
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        rows = [Continuation(self.table, stop, self.count_tokens(p)) for p in prompts]
        return self._steps(prompts, max_new_tokens, params, seed, rows), rows

    def stream(self, prompt: str, max_new_tokens: int = 100, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, *, min_p: float | None = None,
               repetition_penalty: float | None = None, stop: str | Sequence[str] | None = None) -> TextStream:
        """Pieces of the continuation as they are generated; they join to the full continuation."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
        steps, rows = self._start([prompt], max_new_tokens, params, stop, seed)
        return TextStream(steps, rows[0])

    def complete(self, prompts: Sequence[str], max_new_tokens: int = 100, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None, *,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 stop: str | Sequence[str] | None = None) -> list[Completion]:
        """Continue every prompt, all in one batch."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
        steps, rows = self._start(prompts, max_new_tokens, params, stop, seed)
        for _ in steps:
            pass
        return [Completion(r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens) for r in rows]

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
