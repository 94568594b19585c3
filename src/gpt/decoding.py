"""The one-token decoding step: every CPU thread reads the weights, and little Python runs around them.

`decode_step` runs a GPT (gpt.model) on one new position per row: it takes a DecodePlan once per generation
and runs `layer_step` on it for every layer. The network itself stays the plain general path; this module
holds what makes its decoding fast and is held to it by the tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.model import GPT, KVCache


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except for a few rows on a CPU: then the weight's row blocks go through one batched matmul.

    Decoding reads every weight once per token, so a step is bound by memory bandwidth, and MKL's fp32
    matrix-vector product reads on one thread. As a batch of row blocks the same dot products run on
    every thread: 1.6x faster matrix-vector products on 2 cores (docs/benchmarks.md).
    """
    return matvec(x, *step_weights(weight, bias, rows=x.numel() // x.size(-1)))


def row_blocks_of(weight: torch.Tensor) -> int:
    """The number of row blocks `linear` splits a weight into, or 0 for plain F.linear: two per thread where
    they divide the rows (a decoding step ran 4-8% faster than with one per thread, docs/benchmarks.md)."""
    threads = torch.get_num_threads()
    if threads < 2 or not weight.is_cpu or not weight.is_contiguous():
        return 0
    return next((blocks for blocks in (2 * threads, threads) if weight.size(0) % blocks == 0), 0)


def split_rows(
    weight: torch.Tensor, bias: torch.Tensor | None, blocks: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Views of weight (out, in) as (blocks, in, out / blocks) and of bias as (blocks, 1, out / blocks)."""
    w = weight.view(blocks, -1, weight.size(1)).transpose(1, 2)
    return w, None if bias is None else bias.view(blocks, 1, -1)


def blocked_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.size(-1)
    x_blocks = (x if x.dim() == 2 else x.reshape(rows, -1)).expand(w.size(0), rows, -1)  # (blocks, rows, in)
    y = torch.bmm(x_blocks, w) if b is None else torch.baddbmm(b, x_blocks, w)  # (blocks, rows, out / blocks)
    return y.view(*x.shape[:-1], -1) if rows == 1 else y.transpose(0, 1).reshape(*x.shape[:-1], -1)


def step_weights(weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> tuple:
    """A weight and bias as `matvec` reads them for `rows` rows: row-block views where that path applies."""
    blocks = row_blocks_of(weight) if rows <= 16 else 0
    return split_rows(weight, bias, blocks) if blocks else (weight, bias)


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) times a weight from `step_weights`: (out, in) as it is, or (blocks, in, out / blocks) views."""
    return F.linear(x, weight, bias) if weight.dim() == 2 else blocked_linear(x, weight, bias)


class DecodePlan:
    """Every weight the one-token step reads, in the form it reads it, taken once per generation.

    A decoding step is four matrix-vector products per layer and little else, so on a CPU the Python
    around them (module calls, parameter lookups, taking row-block views) is a large part of it. A plan
    does that once; the step then walks plain tuples (steps ran 6-25% faster, docs/benchmarks.md).
    Its views alias the parameters, so it serves while the weights stay where they are: one generation.
    """

    def __init__(self, model: GPT, rows: int):
        def norm_of(ln: nn.LayerNorm) -> tuple:
            return ln.normalized_shape, ln.weight, ln.bias, ln.eps

        def weights_of(layer: nn.Linear) -> tuple:
            return step_weights(layer.weight, layer.bias, rows)

        self.pre_ln = model.config.arch == "gpt2"
        self.gelu = model.blocks[0].mlp.gelu.approximate  # F.gelu's argument for the model's activation
        self.heads = model.config.num_heads
        self.token_embed, self.position_embed = model.token_embed.weight, model.position_embed.weight
        self.layers = [
            (norm_of(b.ln_1), weights_of(b.attn.qkv), weights_of(b.attn.proj),
             norm_of(b.ln_2), weights_of(b.mlp.fc), weights_of(b.mlp.proj))
            for b in model.blocks
        ]
        self.final_norm = norm_of(model.ln_f) if self.pre_ln else None
        self.head = step_weights(model.token_embed.weight, None, rows)  # tied to the input embedding


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def layer_step(x: torch.Tensor, weights: tuple, keys: torch.Tensor, values: torch.Tensor, attend: Attend,
               plan: DecodePlan) -> torch.Tensor:
    """Block.forward() for one new position per row, x (N, E) -> (N, E). `attend(q, k, v, keys, values)` puts the
    rows' new keys and values, each (N, H, 1, D), into the layer's cache and returns what each row attends to,
    (N, E): `attend_at` for rows that all sit at one slot, gpt.batching's for rows at their own slots."""
    ln_1, qkv, attn_proj, ln_2, fc, mlp_proj = weights
    N, E = x.shape
    h = F.layer_norm(x, *ln_1) if plan.pre_ln else x
    q, k, v = matvec(h, *qkv).view(N, 3, plan.heads, 1, E // plan.heads).unbind(1)  # each (N, H, 1, D)
    attended = matvec(attend(q, k, v, keys, values), *attn_proj)  # (N, E)
    if plan.pre_ln:
        x = x + attended
        return x + matvec(F.gelu(matvec(F.layer_norm(x, *ln_2), *fc), approximate=plan.gelu), *mlp_proj)
    x = F.layer_norm(x + attended, *ln_1)
    return F.layer_norm(x + matvec(F.gelu(matvec(x, *fc), approximate=plan.gelu), *mlp_proj), *ln_2)


def attend_at(at: int, mask: torch.Tensor | None) -> Attend:
    """Every row's new key and value at slot `at`; each row attends to slots 0..at, where `mask` (B, 1, 1, S)
    lets it (left padding)."""
    def attend(q, k, v, keys, values):
        keys[:, :, at : at + 1] = k
        values[:, :, at : at + 1] = v
        y = F.scaled_dot_product_attention(q, keys[:, :, : at + 1], values[:, :, : at + 1], attn_mask=mask)
        return y.view(q.size(0), -1)  # (B, H, 1, D) -> (B, E)
    return attend


def decode_step(model: GPT, token: torch.Tensor, cache: KVCache, plan: DecodePlan | None = None) -> torch.Tensor:
    """One new token per row (B,) -> logits (B, vocab) for the position after it, extending the cache."""
    plan = plan or DecodePlan(model, token.size(0))
    return matvec(decode_hidden(model, token, cache, plan), *plan.head)  # (B, vocab)


def decode_hidden(model: GPT, token: torch.Tensor, cache: KVCache, plan: DecodePlan | None = None) -> torch.Tensor:
    """decode_step up to the output layer: (B,) -> (B, E) final states.

    model.forward() on one position, written flat: decoding a token is little arithmetic, so on a CPU the
    module calls, dropout no-ops, masks and reshapes of the general path are a large part of a step (a
    flat step measured 1.45-1.9x faster, docs/benchmarks.md). Evaluation only; tests hold it to forward().
    Pass the same `plan` to every step of a generation; without one, each step takes its own.
    """
    at = cache.length
    if at >= model.config.sequence_len:
        raise ValueError(f"{at + 1} positions exceed sequence_len {model.config.sequence_len}")
    plan = plan or DecodePlan(model, token.size(0))
    mask = cache.real[:, None, None, : at + 1] if cache.has_padding else None  # (B, 1, 1, S): real keys
    x = plan.token_embed[token] + plan.position_embed[cache.next_position]  # (B, E)
    x = run_layers(x, plan, cache.keys, cache.values, attend_at(at, mask))
    cache.length, cache.next_position = at + 1, cache.next_position + 1
    return x


def run_layers(x: torch.Tensor, plan: DecodePlan, keys: list[torch.Tensor], values: list[torch.Tensor],
               attend: Attend) -> torch.Tensor:
    """Every block's layer_step, then the final norm: (N, E) embedded tokens -> (N, E) final states."""
    for weights, layer_keys, layer_values in zip(plan.layers, keys, values):
        x = layer_step(x, weights, layer_keys, layer_values, attend, plan)
    return x if plan.final_norm is None else F.layer_norm(x, *plan.final_norm)
