"""Many generations decoded as one batch, a token step at a time, each joining and leaving on its own.

Iteration-level scheduling (Orca, Yu et al., OSDI 2022): on a CPU a small model's decoding step is bound by
reading the weights and the memory's keys, not by arithmetic, so a step for 16 rows costs little more than a
step for one. A `Batch` holds the generations under way. A new one's prompt (and a window that slides) runs
through the layers in the next step, as more rows of the same matrix products as the rows that decode one token;
one that ends (end of text, a stop string, its token limit, or its reader gone) leaves at once, and the
last row moves into its slot, so the rows stay rows 0..n-1 of the cache.

Every row has its own length, position, window, sampling parameters and random generator. A seeded generation
therefore draws the same tokens whatever else is in the batch: the same text alone or among others (the scores
differ only by float noise, which changes a draw only where it falls exactly on a boundary).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from gpt.decoding import Attend, DecodePlan, matvec, run_layers
from gpt.model import KVCache
from gpt.predictor import Predictor
from gpt.sampling import SamplingParams, sample_next
from gpt.tokenizer import EOT, encode, special_id, token_bytes

MAX_SEED = 2**63  # seeds are taken modulo this: what torch.Generator.manual_seed accepts


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
    """The text of one row: what was generated, how much of it was handed out, and why it ended."""

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

    def completion(self) -> Completion:
        return Completion(self.text, self.finish_reason or "length", self.prompt_tokens, self.completion_tokens)


@dataclass
class Request:
    """One sequence to generate. `seed` None draws from a random seed."""

    prompt: str
    max_new_tokens: int = 100
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: str | Sequence[str] | None = None
    seed: int | None = None

    def validate(self) -> None:
        self.params.validate()
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


class Generation:
    """One request in the batch: its window of tokens, its sampler, its text, and its slot in the cache."""

    def __init__(self, request: Request, ids: list[int], table: list[bytes], vocab_size: int, device):
        self.request, self.params = request, request.params
        self.tokens = ids  # the context the next scores see: at most sequence_len tokens
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        self.text = Continuation(table, stop, len(ids))
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(request.seed) if request.seed is not None else self.generator.seed()
        self.seen = None  # (vocab,) True at every token of the context, for the repetition penalty
        if self.params.repetition_penalty not in (None, 1.0):
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(ids, device=device)] = True
        self.left = request.max_new_tokens
        self.scores: torch.Tensor | None = None  # (vocab,) for the next token
        self.slot, self.piece = -1, ""  # the piece: the text this step made safe to show

    @property
    def finished(self) -> bool:
        return self.text.finish_reason is not None

    def sample(self, eot: int) -> int:
        """Draw the next token from this row's scores with its own parameters and generator; update the text."""
        seen = None if self.seen is None else self.seen[None]
        token = int(sample_next(self.scores[None], self.params, self.generator, seen)[0])
        if self.seen is not None:
            self.seen[token] = True
        self.left -= 1
        self.piece = self.text.push(token, eot)
        if self.left == 0:
            self.piece += self.text.finish("length")
        return token


def batch_attention(slots: torch.Tensor, refills: list[tuple[int, int]]) -> Attend:
    """gpt.decoding's attention for a Batch step. Query row i (of B) puts its key and value at its own slot,
    slots[i], and attends to its slots up to that one; then each (slot, n) in `refills` has n more query rows,
    a window's tokens, whose keys and values fill that row's slots 0..n-1 and which attend causally among
    themselves."""
    rows, device = slots.size(0), slots.device
    at, span = torch.arange(rows, device=device), int(slots.max()) + 1
    mask = (torch.arange(span, device=device) <= slots[:, None])[:, None, None]  # (B, 1, 1, S)

    def attend(q, k, v, keys, values):  # q, k, v: (N, H, 1, D); keys, values: (B, H, S_max, D)
        keys[at, :, slots] = k[:rows, :, 0]  # (B, H, D) into each row's slot
        values[at, :, slots] = v[:rows, :, 0]
        out = [F.scaled_dot_product_attention(q[:rows], keys[:, :, :span], values[:, :, :span], attn_mask=mask)]
        start = rows
        for slot, n in refills:  # after the placeholders above, which a window may overwrite
            window = slice(start, start + n)
            keys[slot, :, :n] = k[window, :, 0].transpose(0, 1)  # (n, H, D) -> (H, n, D)
            values[slot, :, :n] = v[window, :, 0].transpose(0, 1)
            y = F.scaled_dot_product_attention(q[window, :, 0].transpose(0, 1), keys[slot, :, :n],
                                               values[slot, :, :n], is_causal=True)  # (H, n, D)
            out.append(y.transpose(0, 1)[:, :, None])  # (n, H, 1, D)
            start += n
        return torch.cat(out).reshape(q.size(0), -1)  # (N, E)

    return attend


class Batch:
    """The generations under way, `capacity` rows at most, each with its own slot of one KV cache."""

    def __init__(self, predictor: Predictor, tokenizer: Tokenizer, capacity: int):
        self.predictor, self.network, self.tokenizer = predictor, predictor.network, tokenizer
        self.capacity, self.window = capacity, predictor.config.sequence_len
        self.keep = max(1, self.window // 2)  # a full window restarts from its last half (gpt.predictor.Decoder)
        self.eot, self.table = special_id(tokenizer, EOT), token_bytes(tokenizer)
        self.active: list[Generation] = []
        self.cache = KVCache(predictor.config, capacity, predictor.device, self.network.token_embed.weight.dtype)
        self.plans: dict[bool, DecodePlan] = {}  # by whether the rows take decoding's row-block path

    def add(self, request: Request) -> Generation:
        """Start a generation: the next step prefills its prompt, and it draws its first token the step after."""
        request.validate()
        if len(self.active) >= self.capacity:
            raise RuntimeError(f"the batch is full ({self.capacity} rows)")
        ids = [self.eot] + encode(self.tokenizer, request.prompt)
        generation = Generation(request, ids, self.table, self.predictor.config.vocab_size, self.predictor.device)
        if request.max_new_tokens == 0:
            generation.text.finish("length")
            return generation
        generation.tokens = ids[-self.window :]
        generation.slot = len(self.active)
        self.active.append(generation)
        return generation

    def remove(self, generation: Generation) -> None:
        """Free a row (it ended, or its reader went away): the last row moves into its slot."""
        last = self.active.pop()
        if last is not generation:
            self.active[generation.slot] = last
            for layer_keys, layer_values in zip(self.cache.keys, self.cache.values):
                layer_keys[generation.slot] = layer_keys[last.slot]
                layer_values[generation.slot] = layer_values[last.slot]
            last.slot = generation.slot
        generation.slot = -1

    def step(self) -> list[Generation]:
        """Every row with scores draws its next token and the ended ones leave. The others run as one batch: each
        decodes its new token, or (a new row, or one whose window slid) runs its window through the network; then
        one pass of the output layer and the memory scores every row. Returns the rows of this step, each with its
        new text in `piece`."""
        stepped = list(self.active)
        with self._evaluating():
            decoding, refilling = [], [g for g in stepped if g.scores is None]
            for generation in [g for g in stepped if g.scores is not None]:
                token = generation.sample(self.eot)
                if generation.finished:
                    self.remove(generation)
                    continue
                generation.tokens = generation.tokens + [token]
                if len(generation.tokens) > self.window:  # slide: the last half, run through again
                    generation.tokens = generation.tokens[-self.keep :]
                    refilling.append(generation)
                else:
                    decoding.append((generation, token))
            if self.active:
                self._score(self._decode(decoding, refilling))
        return stepped

    @contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Inference mode, and the network in eval mode (no dropout) for as long as a step runs."""
        was_training = self.network.training
        self.network.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.network.train(was_training)

    def _decode(self, decoding: list[tuple[Generation, int]], refilling: list[Generation]) -> torch.Tensor:
        """(B, E) final states of every row, from one pass through the layers: each row in `decoding` runs its new
        token at its own slot (the slot after its window), and each row in `refilling` (a new row, or one whose
        window slid) runs its whole window, as more rows of the same matrix products."""
        rows, device = len(self.active), self.predictor.device
        token = torch.zeros(rows, dtype=torch.long, device=device)
        # a row being refilled decodes a placeholder, into the slot after its window or one its window overwrites
        slots = torch.tensor([min(len(g.tokens), self.window - 1) for g in self.active], device=device)
        for generation, new in decoding:
            token[generation.slot], slots[generation.slot] = new, len(generation.tokens) - 1
        windows = [torch.tensor(g.tokens, device=device) for g in refilling]
        plan = self._plan(rows + sum(len(w) for w in windows))
        x = torch.cat([plan.token_embed[token] + plan.position_embed[slots]]  # (B, E): a row's position is its slot
                      + [plan.token_embed[w] + plan.position_embed[: len(w)] for w in windows])  # (N, E)
        attend = batch_attention(slots, [(g.slot, len(w)) for g, w in zip(refilling, windows)])
        x = run_layers(x, plan, [k[:rows] for k in self.cache.keys], [v[:rows] for v in self.cache.values], attend)
        last = list(range(rows))  # each row's final state: its token's, or its window's last
        end = rows - 1
        for generation, window in zip(refilling, windows):
            end += len(window)
            last[generation.slot] = end
        return x[torch.tensor(last, device=device)]

    def _score(self, hidden: torch.Tensor) -> None:
        """Every row's scores for its next token, from its (B, E) final state: the output layer and the memory
        read their weights and keys once for the whole batch."""
        head = self._plan(len(self.active)).head
        windows = [generation.tokens for generation in self.active]
        scores = self.predictor.scores_after(hidden, matvec(hidden, *head), windows)  # (B, vocab)
        for generation in self.active:
            generation.scores = scores[generation.slot]

    def _plan(self, rows: int) -> DecodePlan:
        blocked = rows <= 16  # decoding.step_weights' row-block path
        if blocked not in self.plans:
            self.plans[blocked] = DecodePlan(self.network, rows)
        return self.plans[blocked]
