"""The GPT: token + learned position embeddings, N transformer blocks, a tied output layer.

Two block types share everything else:
  gpt1 (the GPT-1 paper, post-LN):  h = LN(x + attn(x));  out = LN(h + mlp(h));  no final LN
  gpt2 (pre-LN):                    h = x + attn(LN(x));  out = h + mlp(LN(h));  final LN
The MLP's activation is the GELU, exact by default (model.activation). Attention is PyTorch's
scaled_dot_product_attention. Padding is masked on keys, so a padded
position is never attended to; with a KV cache, decoding costs one token's work per step.

This is the network alone, and it needs nothing of the package but its config: what builds on it (the flat
one-token step in gpt.decoding, the memory in gpt.memory, sampling in gpt.predictor) imports it, never the
other way round.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import ModelConfig, UsageError


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, pad_idx: int | None) -> torch.Tensor:
    """Mean cross-entropy of (B, T, vocab) logits against (B, T) next tokens; padding targets do not count."""
    ignore = -100 if pad_idx is None else pad_idx
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore)


def gelu_approximation(config: ModelConfig) -> str:
    """F.gelu's `approximate` argument for the config's activation. The GPT-1 code used the tanh form; the
    exact one differs from it by under 1e-3 and is cheaper on a CPU (bench size S: 2.5-10% faster steps)."""
    return "tanh" if config.activation == "gelu_tanh" else "none"


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
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)
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
        self.fc = nn.Linear(config.embed_dim, hidden)
        self.gelu = nn.GELU(approximate=gelu_approximation(config))
        self.proj = nn.Linear(hidden, config.embed_dim)
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
        return F.linear(hidden, self.token_embed.weight)

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
