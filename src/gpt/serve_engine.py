"""One worker thread owns the model; the web server's event loop only waits on it.

The model is not thread-safe and a CPU runs one generation at full speed anyway, so requests
queue up and run one at a time in a dedicated thread. Streamed pieces travel back to the
event loop through an asyncio queue, which keeps the server answering (health checks, new
requests, other streams' pieces) while a generation runs. A stream whose reader goes away
sets a flag the worker checks after every piece, so a disconnected client frees the model
within one token; a request that is cancelled while still queued never starts.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gpt.retriever import Completion, Retriever


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


class Engine:
    def __init__(self, retriever: Retriever):
        self.retriever = retriever
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpt-generate")
        self._counters = threading.Lock()
        self.queued = 0  # requests accepted and not finished (running included)
        self.running = 0  # requests the worker is generating for right now (0 or 1)
        self.completion_tokens = 0  # tokens generated since start, cut-short streams included
        self.cancelled = 0  # streams stopped because their reader went away

    def stats(self) -> dict[str, int]:
        with self._counters:
            return {"queued": self.queued, "running": self.running,
                    "completion_tokens": self.completion_tokens, "cancelled_streams": self.cancelled}

    def _count(self, **changes: int) -> None:
        with self._counters:
            for name, change in changes.items():
                setattr(self, name, getattr(self, name) + change)

    async def complete(self, prompts: list[str], **sampling) -> list[Completion]:
        """All prompts as one batch, run when the model is free."""
        def work() -> list[Completion]:
            self._count(running=1)
            try:
                completions = self.retriever.complete(prompts, **sampling)
                self._count(completion_tokens=sum(c.completion_tokens for c in completions))
                return completions
            finally:
                self._count(running=-1, queued=-1)

        self._count(queued=1)
        return await asyncio.wrap_future(self._worker.submit(work))

    async def stream(self, choices: list[Choice], **sampling) -> AsyncIterator[Piece | Finished]:
        """Pieces of each choice in turn, then its Finished; errors (UsageError included) are raised here."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def put(event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
                stop.set()

        def work() -> None:
            self._count(running=1)
            try:
                for choice in choices:
                    if stop.is_set():
                        return
                    run_one(choice)
                put(None)
            except Exception as err:  # handed to the reader, who raises it in the request's task
                put(err)
            finally:
                self._count(running=-1, queued=-1)

        def run_one(choice: Choice) -> None:
            generation = self.retriever.stream(choice.prompt, seed=choice.seed, **sampling)
            try:
                for text in generation:
                    put(Piece(choice.index, text))
                    if stop.is_set():
                        self._count(cancelled=1)
                        return
            finally:
                generation.close()
                self._count(completion_tokens=generation.completion_tokens)
            put(Finished(choice.index, generation.finish_reason, generation.prompt_tokens,
                         generation.completion_tokens))

        self._count(queued=1)
        self._worker.submit(work)
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, Exception):
                    raise event
                yield event
        finally:
            stop.set()

    def shutdown(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
