"""The optimizer and its schedule, and the rules a run steps by: which weights it keeps, which masks it draws.

Progress is max(step / max_steps, elapsed / max_time), so a run limited by time still warms up, decays to its
floor and ends exactly when the budget is spent.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gpt.config import TrainConfig
from gpt.model import GPT


def make_optimizer(model: GPT, config: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices (and embeddings) only; biases and LayerNorm gains are left alone."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": others, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    # fused: one kernel for all tensors instead of several per tensor (CPU support arrived in torch 2.4)
    torch_version = tuple(int(part) for part in torch.__version__.split(".")[:2])
    fused = device.type == "cuda" or (device.type == "cpu" and torch_version >= (2, 4))
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=fused)


def run_progress(step: int, elapsed: float, config: TrainConfig, reserve: float = 0.0) -> float:
    """How far the run is, 0 to 1; `reserve` seconds of max_time are kept for the memory built at the end."""
    by_steps = step / config.max_steps if config.max_steps else 0.0
    by_time = elapsed / (config.max_time - reserve) if config.max_time else 0.0
    return max(by_steps, by_time)


def learning_rate(step: int, progress: float, config: TrainConfig) -> float:
    warmup = min(1.0, (step + 1) / max(1, config.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return config.learning_rate * warmup * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def replaces_kept(val_loss: float | None, mixed_bits: float | None, kept_loss: float, kept_mixed: float) -> bool:
    """Whether a validation's weights replace the kept ones. Scored with a memory, they are judged by that
    score, the one `gpt eval` reports: with a memory the best weights come later than the network's best (round 19
    of docs/training.md). A validation without one is judged by the network's loss against the kept weights'."""
    if val_loss is None:
        return False
    return mixed_bits < kept_mixed if mixed_bits is not None else val_loss < kept_loss


def micro_seed(seed: int, step: int, micro_batch: int) -> int:
    """Dropout masks are a function of the data position, so the split into processes and micro-steps
    does not change the run, and a resumed run draws the same masks."""
    return int(np.random.SeedSequence([seed, step, micro_batch]).generate_state(1, np.uint64)[0] >> 1)
