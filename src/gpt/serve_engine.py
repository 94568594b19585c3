"""One worker thread owns the model and decodes every request under way as one batch (gpt.batching).

The model is not thread-safe, so a single thread runs it: between two token steps it admits waiting requests
(up to `max_batch` rows; beyond that they queue), drops the rows of clients that went away, then runs the
step for all rows at once. Each row is one choice of a request (`n` of them for each prompt). Pieces travel
back to the event loop through an asyncio queue per request, which keeps the server answering (health checks,
new requests, other streams' pieces) while the batch runs. A reader that goes away sets its request's flag,
and the worker frees its rows before the next step; a request still queued never starts.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from gpt.batching import Batch, Completion, Generation, Request
from gpt.retriever import Retriever
from gpt.sampling import SamplingParams

DEFAULT_MAX_BATCH = 16


@dataclass
class Choice:
    """One sequence to generate: which prompt, and its own seed (None: random)."""

    index: int
    prompt: str
    seed: int | None


@dataclass
class Piece:
    index: int
    text: str


@dataclass
class Finished:
    index: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Job:
    """One HTTP request: its choices still waiting for a row, how many have not finished, where events go."""

    def __init__(self, requests: list[tuple[int, Request]], put: Callable[[object], None]):
        self.waiting = deque(requests)
        self.unfinished = len(requests)
        self.put = put
        self.stop = threading.Event()  # the reader went away


def request_of(choice: Choice, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
               min_p: float | None, repetition_penalty: float | None, stop: list[str]) -> Request:
    """A choice with the request's sampling settings (serve_schema's CompletionRequest.sampling()), checked."""
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    request = Request(choice.prompt, max_new_tokens, params, stop, choice.seed)
    request.validate()
    return request


class Engine:
    def __init__(self, retriever: Retriever, max_batch: int = DEFAULT_MAX_BATCH):
        self.batch = Batch(retriever.predictor, retriever.tokenizer, max_batch)
        self.max_batch = max_batch
        self._jobs: deque[Job] = deque()  # requests with choices waiting for a row
        self._owners: dict[Generation, tuple[Job, int]] = {}  # each running row's request and choice index
        self._wake = threading.Condition()
        self._closed = False
        self.completion_tokens = 0  # tokens generated since start, cut-short streams included
        self.cancelled = 0  # streams stopped because their reader went away
        self._thread = threading.Thread(target=self._run, name="gpt-generate", daemon=True)
        self._thread.start()

    def stats(self) -> dict[str, int]:
        with self._wake:
            queued = sum(len(job.waiting) for job in self._jobs)
            return {"running": len(self._owners), "queued": queued, "max_batch": self.max_batch,
                    "completion_tokens": self.completion_tokens, "cancelled_streams": self.cancelled}

    async def stream(self, choices: list[Choice], **sampling) -> AsyncIterator[Piece | Finished]:
        """Each choice's pieces as they come, then its Finished; errors (UsageError included) are raised here."""
        requests = [(choice.index, request_of(choice, **sampling)) for choice in choices]
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
                job.stop.set()

        job = Job(requests, put)
        with self._wake:
            self._jobs.append(job)
            self._wake.notify()
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, Exception):
                    raise event
                yield event
        finally:
            job.stop.set()

    async def complete(self, choices: list[Choice], **sampling) -> list[Completion]:
        """Every choice to its end, in the order of `choices`."""
        texts = {choice.index: [] for choice in choices}
        done: dict[int, Completion] = {}
        async for event in self.stream(choices, **sampling):
            if isinstance(event, Piece):
                texts[event.index].append(event.text)
            else:
                done[event.index] = Completion("".join(texts[event.index]), event.finish_reason,
                                               event.prompt_tokens, event.completion_tokens)
        return [done[choice.index] for choice in choices]

    def shutdown(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._jobs and not self._owners:
                    self._wake.wait()
                if self._closed:
                    return
            try:
                self._drop_cancelled()
                self._admit()
                if self._owners:
                    self._step()
            except Exception as err:  # a bug: every request under way hears of it, and the engine goes on
                self._fail(err)

    def _admit(self) -> None:
        """Prefill waiting choices into free rows, oldest request first."""
        while len(self.batch.active) < self.max_batch:
            with self._wake:
                if not self._jobs:
                    return
                job = self._jobs[0]
                index, request = job.waiting.popleft()
                if not job.waiting:
                    self._jobs.popleft()
            try:
                generation = self.batch.add(request)
            except Exception as err:  # a bug, or no memory for the prompt: this request hears of it
                job.put(err)
                job.stop.set()
                continue
            self._owners[generation] = (job, index)
            if generation.finished:  # max_tokens 0: done without a row
                self._finish(generation)

    def _step(self) -> None:
        for generation in self.batch.step():
            job, index = self._owners[generation]
            if generation.piece:
                job.put(Piece(index, generation.piece))
            if generation.finished:
                self._finish(generation)

    def _finish(self, generation: Generation) -> None:
        job, index = self._owners.pop(generation)
        text = generation.text
        self.completion_tokens += text.completion_tokens
        job.put(Finished(index, text.finish_reason, text.prompt_tokens, text.completion_tokens))
        job.unfinished -= 1
        if not job.unfinished:
            job.put(None)

    def _drop_cancelled(self) -> None:
        """Free the rows, and forget the waiting choices, of every request whose reader went away."""
        with self._wake:
            gone = [job for job in self._jobs if job.stop.is_set()]
            for job in gone:
                self._jobs.remove(job)
        cancelled = set(gone)
        for generation, (job, _) in list(self._owners.items()):
            if job.stop.is_set():
                self.batch.remove(generation)
                self.completion_tokens += generation.text.completion_tokens
                del self._owners[generation]
                cancelled.add(job)
        self.cancelled += len(cancelled)

    def _fail(self, err: Exception) -> None:
        jobs = {job for job, _ in self._owners.values()}
        for generation in list(self._owners):
            if generation.slot >= 0:
                self.batch.remove(generation)
        self._owners.clear()
        for job in jobs:
            job.put(err)
