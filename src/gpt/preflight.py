"""Pre-flight checks: what a training run will need in memory, refused before anything is allocated.

Why: a typo such as `num_layers = 1000000000` is a valid config, and without a check the run sits building
layers and taking memory until the operating system kills it. The estimate is a closed form of the config
(no model is built), so it answers in microseconds for any size and says which setting to lower.

The estimate is of the process's peak resident memory: the runtime already loaded (the process's RSS when
the check runs: Python, torch, tokenizers), RUNTIME_BYTES for what the run adds whatever its size, and the
model's part: fp32 weights, gradients and AdamW's two moments, the activations one step keeps for backward,
and the logits with the loss's copies of them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from gpt.config import ModelConfig, TrainConfig, UsageError

GB = 1e9
# measured on Linux with torch 2.13 (CPU): the tiny preset's peak RSS is ~150 MB above the RSS after imports
# (the first backward and optimizer step's kernels and allocator pools ~90 MB, the loss plot's matplotlib
# ~35 MB, tokenizer training and the token arrays ~25 MB), for a model whose own part is under 1 MB
RUNTIME_BYTES = 150 * 2**20


def parameters(config: ModelConfig, vocab_size: int) -> int:
    """The parameter count GPT(config) would have (position embeddings included), without building it."""
    E, f = config.embed_dim, config.forward_expansion
    block = (4 + 2 * f) * E * E + (5 + f) * E + 4 * E  # qkv, proj, MLP (weights and biases), two LayerNorms
    final = 2 * E if config.arch == "gpt2" else 0
    return vocab_size * E + config.sequence_len * E + config.num_layers * block + final


def process_rss() -> int:
    """This process's resident memory now, from /proc (0 where there is none: the baseline is then the constant)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def training_parts(model_config: ModelConfig, train_config: TrainConfig, vocab_size: int) -> dict[str, int]:
    """Bytes by what holds them, for one process training fp32 (bf16 autocast keeps fp32 weights too)."""
    P = parameters(model_config, vocab_size)
    E, L, f = model_config.embed_dim, model_config.num_layers, model_config.forward_expansion
    tokens = train_config.batch_size * model_config.sequence_len
    per_layer = (9 + 2 * f) * E + 2 * model_config.num_heads  # floats a block keeps per token for backward
    states = 4 + (1 if train_config.weight_average else 0)  # weights, gradients, 2 AdamW moments, the average
    return {
        "weights, gradients and optimizer state": 4 * P * states,
        "activations": 4 * tokens * ((L + 1) * per_layer + 2 * E + 3 * vocab_size),
        "runtime": process_rss() + RUNTIME_BYTES,
    }


def available_memory(device: torch.device) -> int | None:
    """Free memory of the device: the GPU's from CUDA, else the RAM the OS says is available."""
    if device.type == "cuda":  # under torchrun, this rank's GPU: a context on GPU 0 for every rank would cost it
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        return torch.cuda.mem_get_info(index)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def what_to_lower(part: str, model_config: ModelConfig, train_config: TrainConfig, vocab_size: int) -> str:
    """The setting behind the largest part of the estimate, with its value."""
    m, t = model_config, train_config
    if part == "activations":
        return f"lower train.batch_size ({t.batch_size}) or model.sequence_len ({m.sequence_len})"
    E = m.embed_dim
    terms = {f"train.tokenizer_vocab_size ({vocab_size}) or model.embed_dim ({E})": vocab_size * E,
             f"model.sequence_len ({m.sequence_len})": m.sequence_len * E,
             f"model.num_layers ({m.num_layers}) or model.embed_dim ({E})": m.num_layers * E * E}
    return f"lower {max(terms, key=terms.get)}"


def check_training(model_config: ModelConfig, train_config: TrainConfig, vocab_size: int,
                   device: torch.device) -> int:
    """The run's estimated peak in bytes; a UsageError with the figures when it exceeds what is available."""
    parts = training_parts(model_config, train_config, vocab_size)
    total = sum(parts.values())
    available = available_memory(device)
    if available is not None and total > available:
        largest = max(parts, key=parts.get)
        single = dataclasses.replace(train_config, batch_size=1)  # when one window does not fit, the model is too big
        part = "activations" if sum(training_parts(model_config, single, vocab_size).values()) <= available else ""
        raise UsageError(f"this run needs ~{total / GB:,.1f} GB of memory ({largest} ~{parts[largest] / GB:,.1f} GB "
                         f"for {parameters(model_config, vocab_size):,} parameters) but {device.type} has "
                         f"{available / GB:,.1f} GB available; "
                         f"{what_to_lower(part, model_config, train_config, vocab_size)}")
    return total
