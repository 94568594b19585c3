"""The GPT: token + learned position embeddings, N transformer blocks, a tied output layer.

Two block types share everything else:
  gpt1 (the GPT-1 paper, post-LN):  h = LN(x + attn(x));  out = LN(h + mlp(h));  no final LN
  gpt2 (pre-LN):                    h = x + attn(LN(x));  out = h + mlp(LN(h));  final LN
The MLP's activation is the GELU, exact by default (model.activation). Attention is PyTorch's
scaled_dot_product_attention. Padding is masked on keys, so a padded
position is never attended to; with a KV cache, decoding costs one token's work per step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import ModelConfig, UsageError
from gpt.decoding import DecodePlan, layer_step, linear, matvec
from gpt.sampling import SamplingParams, sample_next

if TYPE_CHECKING:
    from gpt.memory import Memory


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, pad_idx: int | None) -> torch.Tensor:
    """Mean cross-entropy of (B, T, vocab) logits against (B, T) next tokens; padding targets do not count."""
    ignore = -100 if pad_idx is None else pad_idx
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore)


def gelu_approximation(config: ModelConfig) -> str:
    """F.gelu's `approximate` argument for the config's activation. The GPT-1 code used the tanh form; the
    exact one differs from it by under 1e-3 and is cheaper on a CPU (bench size S: 2.5-10% faster steps)."""
    return "tanh" if config.activation == "gelu_tanh" else "none"


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) computed by `linear`: few rows take the row-block path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, plus what each row needs to go on."""

    def __init__(self, config: ModelConfig, batch: int, device, dtype):
        head_dim = config.embed_dim // config.num_heads
        shape = (batch, config.num_heads, config.sequence_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.length = 0  # tokens cached, padding included
        self.real = torch.ones(batch, config.sequence_len, dtype=torch.bool, device=device)  # False = pad
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)  # per row
        self.has_padding = False

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values, end = self.keys[layer], self.values[layer], self.length + k.size(2)
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.num_heads = layer, config.num_heads
        self.dropout = config.dropout if config.attention_dropout is None else config.attention_dropout
        self.qkv = Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = Linear(config.embed_dim, config.embed_dim)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        B, T, E = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, E // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, T, D)
        if cache is not None:
            k, v = cache.store(self.layer, k, v)  # (B, H, S, D) with S = cached + T
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,  # 0: the fused kernel, and no masks to draw
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, E)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.forward_expansion * config.embed_dim
        self.fc = Linear(config.embed_dim, hidden)
        self.gelu = nn.GELU(approximate=gelu_approximation(config))
        self.proj = Linear(hidden, config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.pre_ln = config.arch == "gpt2"
        self.ln_1 = nn.LayerNorm(config.embed_dim)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.embed_dim)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.attn(self.ln_1(x), mask, cache)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, mask, cache))
        return self.ln_2(x + self.mlp(x))


class GPT(nn.Module):
    def __init__(
        self,
        vocab_size: int | None = None,
        sequence_len: int = 128,
        num_layers: int = 12,
        embed_dim: int = 768,
        num_heads: int = 12,
        forward_expansion: int = 4,
        dropout: float = 0.1,
        pad_idx: int | None = None,
        arch: str = "gpt1",
        config: ModelConfig | None = None,
    ):
        super().__init__()
        if config is None:
            if vocab_size is None:
                raise UsageError("GPT needs vocab_size (or a ModelConfig)")
            config = ModelConfig(vocab_size=vocab_size, sequence_len=sequence_len, num_layers=num_layers,
                                 embed_dim=embed_dim, num_heads=num_heads, forward_expansion=forward_expansion,
                                 dropout=dropout, arch=arch, pad_idx=pad_idx)
        config.validate()
        self.config, self.pad_idx = config, config.pad_idx
        self.token_embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.position_embed = nn.Embedding(config.sequence_len, config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.embed_dim) if config.arch == "gpt2" else nn.Identity()
        self.memory: Memory | None = None  # the training text's memory (gpt.memory), attached by load_checkpoint
        self.apply(self._init_weights)
        if config.arch == "gpt2":  # GPT-2 scales residual projections by 1/sqrt(2 * layers)
            for name, param in self.named_parameters():
                if name.endswith("proj.weight"):
                    nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - (self.position_embed.weight.numel() if non_embedding else 0)

    def flops_per_token(self, context: int | None = None) -> float:
        """Training FLOPs per token: 6 per matmul parameter (forward + backward) plus attention (PaLM's 12*L*E*T)."""
        c = self.config
        context = context or c.sequence_len
        matmul_params = self.num_params() - self.token_embed.weight.numel()
        head_flops = 2 * c.embed_dim * c.vocab_size
        return 6 * matmul_params + 3 * head_flops + 12 * c.num_layers * c.embed_dim * context

    def forward(
        self, idx: torch.Tensor, pad_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab). pad_mask (B, T) is True at padding."""
        return self.head(self.hidden(idx, pad_mask, cache))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., E) final states -> (..., vocab) logits: the output layer, tied to the input embedding."""
        return linear(hidden, self.token_embed.weight)

    def hidden(
        self, idx: torch.Tensor, pad_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """forward() up to the output layer: (B, T, E) final states, the memory's keys and queries."""
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.sequence_len:
            raise ValueError(f"{past + T} positions exceed sequence_len {self.config.sequence_len}")
        real = None if pad_mask is None else ~pad_mask
        positions = torch.arange(T, device=idx.device) if real is None else (real.long().cumsum(1) - 1).clamp(min=0)
        if cache is not None:
            positions = cache.next_position[:, None] + positions  # (B, T): real tokens count 0, 1, 2, ...
        mask = self._attention_mask(real, past, T, cache)
        x = self.dropout(self._embed_tokens(idx) + self.position_embed(positions))  # (B, T, E)
        for block in self.blocks:
            x = block(x, mask, cache)
        x = self.ln_f(x)
        if cache is not None:
            cache.next_position = cache.next_position + (T if real is None else real.sum(1))
            cache.length += T
        return x

    def decode_step(self, token: torch.Tensor, cache: KVCache, plan: DecodePlan | None = None) -> torch.Tensor:
        """One new token per row (B,) -> logits (B, vocab) for the position after it, extending the cache."""
        plan = plan or DecodePlan(self, token.size(0))
        return matvec(self.decode_hidden(token, cache, plan), *plan.head)  # (B, vocab)

    def decode_hidden(self, token: torch.Tensor, cache: KVCache, plan: DecodePlan | None = None) -> torch.Tensor:
        """decode_step up to the output layer: (B,) -> (B, E) final states.

        forward() on one position, written flat: decoding a token is little arithmetic, so on a CPU the
        module calls, dropout no-ops, masks and reshapes of the general path are a large part of a step (a
        flat step measured 1.45-1.9x faster, docs/benchmarks.md). Evaluation only; tests hold it to forward().
        Pass the same `plan` to every step of a generation; without one, each step takes its own.
        """
        at = cache.length
        if at >= self.config.sequence_len:
            raise ValueError(f"{at + 1} positions exceed sequence_len {self.config.sequence_len}")
        plan = plan or DecodePlan(self, token.size(0))
        mask = cache.real[:, None, None, : at + 1] if cache.has_padding else None  # (B, 1, 1, S): real keys
        x = plan.token_embed[token] + plan.position_embed[cache.next_position]  # (B, E)
        for weights, keys, values in zip(plan.layers, cache.keys, cache.values):
            x = layer_step(x, weights, keys, values, at, mask, plan)
        if plan.final_norm is not None:
            x = F.layer_norm(x, *plan.final_norm)
        cache.length, cache.next_position = at + 1, cache.next_position + 1
        return x

    def _embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """Embedding dropout (AWD-LSTM's): in training, whole vocabulary entries are dropped from the input
        for a step, so the model cannot lean on any one token being visible; the tied output layer keeps them."""
        p = self.config.embedding_dropout
        if not self.training or not p:
            return self.token_embed(idx)
        weight = self.token_embed.weight
        keep = torch.empty(weight.size(0), 1, device=weight.device, dtype=weight.dtype).bernoulli_(1 - p) / (1 - p)
        return F.embedding(idx, weight * keep)

    @staticmethod
    def _attention_mask(real, past: int, T: int, cache: KVCache | None) -> torch.Tensor | None:
        """None means plain causal attention (the fast path); else a (B, 1, T, past + T) bool mask."""
        if cache is not None:
            if real is not None:
                cache.real[:, past : past + T] = real
                cache.has_padding = cache.has_padding or bool((~real).any())
            padded, keys_real = cache.has_padding, cache.real[:, : past + T]
        else:
            padded, keys_real = real is not None, real
        if not padded and (past == 0 or T == 1):
            return None
        query_at = torch.arange(past, past + T, device=keys_real.device)[:, None]
        key_at = torch.arange(past + T, device=keys_real.device)[None, :]
        allowed = (key_at <= query_at)[None, None]  # (1, 1, T, S)
        if padded:
            allowed = allowed & keys_real[:, None, None, :]
            allowed = allowed | (key_at == query_at)  # a pad query sees itself: no empty rows, no NaN
        return allowed

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(self(idx), targets, self.pad_idx)

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
        was_training = self.training
        self.eval()
        try:
            decoder = Decoder(self, idx, pad_mask, use_cache) if max_new_tokens > 0 else None
            seen = None
            if params.repetition_penalty not in (None, 1.0):  # every real token of the context, per row
                seen = torch.zeros(idx.size(0), self.config.vocab_size, dtype=torch.bool, device=idx.device)
                real = torch.ones_like(idx, dtype=torch.bool) if pad_mask is None else ~pad_mask
                seen[torch.arange(idx.size(0), device=idx.device)[:, None].expand_as(idx)[real], idx[real]] = True
            for step in range(max_new_tokens):
                next_token = sample_next(decoder.logits, params, generator, seen)  # (B,)
                yield next_token
                if seen is not None:
                    seen[torch.arange(idx.size(0), device=idx.device), next_token] = True
                if step + 1 < max_new_tokens:
                    decoder.append(next_token)
        finally:
            self.train(was_training)

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

    def __init__(self, model: GPT, idx: torch.Tensor, pad_mask: torch.Tensor | None = None, use_cache: bool = True):
        self.model, self.use_cache = model, use_cache
        self.window = model.config.sequence_len
        self.keep = max(1, self.window // 2)
        self.tokens = idx[:, -self.window :]  # (B, <= window): the context the next logits see
        self.pad = None if pad_mask is None else pad_mask[:, -self.window :]
        self.plan = DecodePlan(model, idx.size(0)) if use_cache else None
        self.logits = self._prefill()  # (B, vocab): scores for the next token

    def _prefill(self) -> torch.Tensor:
        self.cache = KVCache(self.model.config, self.tokens.size(0), self.tokens.device,
                             self.model.token_embed.weight.dtype) if self.use_cache else None
        return self._scores(self.model.hidden(self.tokens, self.pad, self.cache)[:, -1])

    def _scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, E) -> (B, vocab) the network's logits, or with a memory (gpt.memory) the mixture's log-probs."""
        logits = self.model.head(hidden) if self.plan is None else matvec(hidden, *self.plan.head)
        memory = self.model.memory
        return logits if memory is None else memory.mix(hidden, logits, memory.contexts(self.tokens, self.pad)[:, -1])

    def append(self, token: torch.Tensor) -> torch.Tensor:
        """Add one token per row (B,); return the logits for the token after it."""
        step = token[:, None]  # (B, 1)
        step_pad = None if self.pad is None else torch.zeros_like(step, dtype=torch.bool)
        self.tokens = torch.cat([self.tokens, step], dim=1)
        if self.pad is not None:
            self.pad = torch.cat([self.pad, step_pad], dim=1)
        if self.tokens.size(1) > self.window:  # slide: keep the last half, prefill it again
            self.tokens = self.tokens[:, -self.keep :]
            self.pad = None if self.pad is None else self.pad[:, -self.keep :]
            self.logits = self._prefill()
        elif self.cache is None:
            self.logits = self._prefill()
        else:
            self.logits = self._scores(self.model.decode_hidden(token, self.cache, self.plan))
        return self.logits
