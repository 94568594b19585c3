"""Pre-flight checks: what a training run will need in memory and on disk, refused before anything is allocated
or written.

Why: a typo such as `num_layers = 1000000000` is a valid config, and without a check the run sits building
layers and taking memory until the operating system kills it. The estimate is a closed form of the config
(no model is built), so it answers in microseconds for any size and says which setting to lower.

The estimate is of the process's peak resident memory: the runtime already loaded (the process's RSS when
the check runs: Python, torch, tokenizers), RUNTIME_BYTES for what the run adds whatever its size, and the
model's part: fp32 weights, gradients and AdamW's two moments, the activations one step keeps for backward,
and the logits with the loss's copies of them. Under bf16 autocast the matmuls keep 2-byte inputs and outputs
and a bf16 copy of each weight, while the LayerNorms still keep their fp32 inputs: a run's activations then take
about 0.56-0.66 of fp32's (measured: the peak of a run whose activations dominate fell from 1.78 GB to 1.32 GB).

The disk estimate is of the files a run writes (token data, weights, training state, the memory of the training
text) or `gpt prepare` writes (token shards), each once, plus the largest of them a second time: every file is
replaced atomically, so a new copy sits beside the old one until the rename.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

from gpt.config import ModelConfig, TrainConfig, UsageError
from gpt.hardware import autocast_dtype
from gpt.memory import QUERY_CHUNK
from gpt.memory import fits as memory_fits

GB = 1e9
# measured on Linux with torch 2.13 (CPU): the tiny preset's peak RSS is ~150 MB above the RSS after imports
# (the first backward and optimizer step's kernels and allocator pools ~90 MB, the loss plot's matplotlib
# ~35 MB, tokenizer training and the token arrays ~25 MB), for a model whose own part is under 1 MB
RUNTIME_BYTES = 150 * 2**20
# (queries x keys) float arrays alive at once while the memory scores a chunk of queries: the tiny preset's peak
# rose by 0.39 GB with a memory of 85,051 positions, about this many copies of 256 x 85,051 floats
MEMORY_SCRATCH_COPIES = 4.5


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


def training_parts(model_config: ModelConfig, train_config: TrainConfig, vocab_size: int,
                   memory_tokens: int = 0, bf16: bool = False) -> dict[str, int]:
    """Bytes by what holds them, for one process training fp32 or under bf16 autocast (which keeps fp32 weights
    too), with the memory of `memory_tokens` training positions built at the end (its keys: fp16 pieces, joined,
    scanned as fp32; the scratch of scoring with it)."""
    P = parameters(model_config, vocab_size)
    E, L, f = model_config.embed_dim, model_config.num_layers, model_config.forward_expansion
    tokens = train_config.batch_size * model_config.sequence_len
    per_layer = (9 + 2 * f) * E + 2 * model_config.num_heads  # values a block keeps per token for backward
    layer_bytes = 2 * per_layer + 4 * E if bf16 else 4 * per_layer  # bf16: two fp32 LayerNorm inputs among them
    # weights, gradients, 2 AdamW moments, the average; a soup's trunk (weights, moments) and sum of branches
    states = 4 + (1 if train_config.weight_average else 0) + (4 if train_config.soup_trunk_steps else 0)
    return {
        "weights, gradients and optimizer state": 4 * P * states + (2 * P if bf16 else 0),
        "activations": tokens * ((L + 1) * layer_bytes + 4 * (2 * E + 3 * vocab_size)),
        "runtime": process_rss() + RUNTIME_BYTES,
        "the memory of the training text": int(memory_tokens * (8 * E + 24 + MEMORY_SCRATCH_COPIES * 4 * QUERY_CHUNK)),
    }


def peak_of(parts: dict[str, int]) -> int:
    """The memory is built after the last step, when the activations are gone: only the larger of them counts."""
    return sum(parts.values()) - min(parts["activations"], parts["the memory of the training text"])


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
    if part == "the memory of the training text":
        return "set model.memory_weight = 0 (no memory), or train on less text"
    E = m.embed_dim
    terms = {f"train.tokenizer_vocab_size ({vocab_size}) or model.embed_dim ({E})": vocab_size * E,
             f"model.sequence_len ({m.sequence_len})": m.sequence_len * E,
             f"model.num_layers ({m.num_layers}) or model.embed_dim ({E})": m.num_layers * E * E}
    return f"lower {max(terms, key=terms.get)}"


def check_training(model_config: ModelConfig, train_config: TrainConfig, vocab_size: int,
                   device: torch.device, memory_tokens: int = 0) -> int:
    """The run's estimated peak in bytes; a UsageError with the figures when it exceeds what is available.
    Checked before anything is built, and again with `memory_tokens` once the text is tokenized."""
    bf16 = autocast_dtype(device, train_config.dtype) is not None
    parts = training_parts(model_config, train_config, vocab_size, memory_tokens, bf16)
    total = peak_of(parts)
    available = available_memory(device)
    if available is not None and total > available:
        largest = max(parts, key=parts.get)
        single = dataclasses.replace(train_config, batch_size=1)  # when one window does not fit, the model is too big
        part = "activations" if peak_of(training_parts(model_config, single, vocab_size, 0, bf16)) <= available else ""
        if largest == "the memory of the training text":
            part = largest
        raise UsageError(f"this run needs ~{total / GB:,.1f} GB of memory ({largest} ~{parts[largest] / GB:,.1f} GB "
                         f"for {parameters(model_config, vocab_size):,} parameters) but {device.type} has "
                         f"{available / GB:,.1f} GB available; "
                         f"{what_to_lower(part, model_config, train_config, vocab_size)}")
    return total


def check_loading(config: ModelConfig, memory_file_bytes: int, folder: Path, copies: int = 2) -> int:
    """Refuse to load a checkpoint that cannot fit in RAM: its network is built there and the weights file read
    beside it (`copies` fp32 copies of the parameters, counted from the config: no file is read; gpt import holds
    three: transformers' model, the converted tensors and ours), and its memory's fp16 keys are scanned as fp32
    (three times the file while both exist). Returns the estimate in bytes."""
    parts = {"its network": 4 * copies * parameters(config, config.vocab_size),
             "its memory of the training text": 3 * memory_file_bytes}
    total, available = sum(parts.values()), available_memory(torch.device("cpu"))
    if available is not None and total > available:
        largest = max(parts, key=parts.get)
        fix = ("leave the memory out (--no-memory) or use a machine with more memory" if largest.endswith("text")
               else "use a machine with more memory")
        raise UsageError(f"{folder} needs ~{size_text(total)} of memory to load ({largest} "
                         f"~{size_text(parts[largest])}) but only {size_text(available)} is available; {fix}")
    return total


def check_serving(config: ModelConfig, max_batch: int, memory_keys: int, device: torch.device) -> int:
    """Refuse a server whose batch cannot fit beside the model it has loaded: each of `max_batch` rows holds
    keys and values for the whole context (fp32), and a step scores every row against the memory's keys (the
    scratch of memory.probs, per query). Returns the estimate in bytes."""
    head_dim = config.embed_dim // config.num_heads
    parts = {"the KV cache": 4 * max_batch * config.num_layers * 2 * config.num_heads * config.sequence_len * head_dim,
             "the memory's scratch": int(4 * min(max_batch, QUERY_CHUNK) * memory_keys * MEMORY_SCRATCH_COPIES),
             "the logits": 4 * max_batch * config.vocab_size * 8}
    total, available = sum(parts.values()), available_memory(device)
    if available is not None and total > available:
        largest = max(parts, key=parts.get)
        raise UsageError(f"serving {max_batch:,} rows at once needs ~{size_text(total)} of memory ({largest} "
                         f"~{size_text(parts[largest])}) but {device.type} has {size_text(available)} available; "
                         f"lower --max-batch")
    return total


def size_text(num_bytes: float) -> str:
    return f"{num_bytes / GB:,.1f} GB" if num_bytes >= 0.1 * GB else f"{num_bytes / 1e6:,.1f} MB"


def free_disk(folder: Path) -> int | None:
    """Free bytes on the filesystem of `folder`, or of its nearest existing parent; None where it cannot be read."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def run_files(model_config: ModelConfig, train_config: TrainConfig, plain_tokens: int, token_bytes: int,
              ) -> dict[str, int]:
    """Bytes of each file a run writes: token_bytes of token data (0 for prepared shards, read in place)."""
    P = parameters(model_config, model_config.vocab_size)
    # raw weights, AdamW's two moments, the average; a soup's trunk (weights, moments) and sum of branches
    states = 3 + (1 if train_config.weight_average else 0) + (4 if train_config.soup_trunk_steps else 0)
    files = {"the training state": 4 * P * states, "the weights": 4 * P, "the token data": token_bytes}
    if memory_fits(plain_tokens, model_config):  # fp16 keys, 32-bit values and the tokens themselves
        files["the memory of the training text"] = plain_tokens * (2 * model_config.embed_dim + 8)
    return files


def check_disk(folder: Path, files: dict[str, int], needed: int, what: str, fixes: dict[str, str]) -> int:
    """`needed` bytes back; a UsageError with the figures when the disk of `folder` has less free. `files` are
    the bytes by file (the largest is named), `fixes` the setting to lower where a file dominates."""
    free = free_disk(folder)
    if free is not None and needed > free:
        largest = max(files, key=files.get)
        fix = fixes.get(largest)
        raise UsageError(f"{what} needs ~{size_text(needed)} of disk in {folder} ({largest} "
                         f"~{size_text(files[largest])}) but only {size_text(free)} is free; free some space or "
                         f"choose another folder" + (f", or {fix}" if fix else ""))
    return needed
