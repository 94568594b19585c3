"""Configuration: two plain dataclasses, named presets and TOML overrides.

Everything a run needs is in ModelConfig (the network's shape) and TrainConfig (how it is
trained). They are passed down explicitly and saved verbatim in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, never as a traceback."""


def first_line(err: BaseException) -> str:
    """An exception as a short clause for a UsageError's one line: its type and the first line of its text."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


ARCHS = ("gpt1", "gpt2")
ACTIVATIONS = ("gelu", "gelu_tanh")  # the exact (erf) GELU; its tanh approximation, as in the GPT-1 code


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    sequence_len: int = 64
    num_layers: int = 6
    embed_dim: int = 512
    num_heads: int = 8
    forward_expansion: int = 4
    dropout: float = 0.2  # on embeddings and residual branches
    arch: str = "gpt1"  # "gpt1": post-LN blocks of the GPT-1 paper; "gpt2": pre-LN with a final LayerNorm
    pad_idx: int | None = None
    attention_dropout: float | None = None  # on attention weights; None: the same as dropout
    embedding_dropout: float = 0.0  # chance that a vocabulary entry is dropped from the input for a step
    memory_weight: float = 0.0  # share of the training text's memory in predictions (gpt.memory); 0: off
    memory_temperature: float = 110.0  # the memory's softmax temperature over squared distances of hidden states
    # (a run with train.tune_memory_temperature picks one from a quarter to twice this on its validation split)
    memory_dim: int = 64  # the memory's keys: the hidden states' top principal components (0: the states whole)
    memory_ngram_weight: float = 0.0  # share of the memory's Kneser-Ney n-gram of the training tokens (gpt.ngram)
    memory_ngram_order: int = 4  # the n-gram's longest context, in tokens, plus one
    activation: str = "gelu"  # the MLP's GELU: "gelu" exact, "gelu_tanh" the approximation (slower on a CPU)

    def validate(self) -> None:
        for name in ("vocab_size", "sequence_len", "num_layers", "embed_dim", "num_heads", "forward_expansion"):
            if getattr(self, name) <= 0:
                raise UsageError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise UsageError(
                f"model.embed_dim ({self.embed_dim}) must be divisible by model.num_heads ({self.num_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.attention_dropout is not None and not 0.0 <= self.attention_dropout < 1.0:
            raise UsageError(f"model.attention_dropout must be in [0, 1), got {self.attention_dropout}")
        if not 0.0 <= self.embedding_dropout < 1.0:
            raise UsageError(f"model.embedding_dropout must be in [0, 1), got {self.embedding_dropout}")
        if not 0.0 <= self.memory_weight < 1.0:
            raise UsageError(f"model.memory_weight must be in [0, 1), got {self.memory_weight}")
        if not self.memory_temperature > 0:
            raise UsageError(f"model.memory_temperature must be positive, got {self.memory_temperature}")
        if not 0.0 <= self.memory_ngram_weight < 1.0 - self.memory_weight:
            raise UsageError(f"model.memory_ngram_weight must be in [0, 1 - model.memory_weight), got "
                             f"{self.memory_ngram_weight} with memory_weight {self.memory_weight}")
        if self.memory_ngram_weight and not self.memory_weight:
            raise UsageError("model.memory_ngram_weight needs model.memory_weight above 0: the n-gram is part of the "
                             "memory of the training text")
        if self.memory_dim < 0:
            raise UsageError(f"model.memory_dim must be zero (the whole hidden state) or more, got {self.memory_dim}")
        if self.memory_ngram_order <= 0:
            raise UsageError(f"model.memory_ngram_order must be a positive integer, got {self.memory_ngram_order}")
        if self.arch not in ARCHS:
            raise UsageError(f"model.arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")


@dataclass
class TrainConfig:
    tokenizer_vocab_size: int = 2048  # BPE vocabulary, special tokens included
    batch_size: int = 16
    learning_rate: float = 8e-4
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 100
    max_steps: int | None = None
    max_time: float | None = 600.0  # seconds of training, evaluation included
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 200
    eval_stride: int | None = None  # sliding-window stride for validation; None: sequence_len // 2
    log_interval: int = 10
    checkpoint_interval: int = 500
    seed: int = 1337
    val_fraction: float = 0.1
    device: str = "auto"  # "auto", "cpu", "cuda", "mps"
    dtype: str = "auto"  # "auto" (bf16 autocast where the hardware has native bf16, else fp32), "float32", "bfloat16"
    compile: bool | None = None  # torch.compile the training step; None: on CUDA (with Triton) only
    grad_accum: int = 1  # micro-steps per optimizer step: global batch = batch_size x grad_accum x processes
    fsdp: bool = False  # shard parameters, gradients and optimizer state across torchrun processes
    bpe_dropout: float = 0.0  # chance that a BPE merge is skipped in the extra copies of the training text
    bpe_copies: int = 1  # the training text tokenized this many times: once plainly, the rest with BPE dropout
    retyped_copies: float = 0.0  # share of the BPE-dropout copies rewritten in another typography (gpt.typography)
    soup_trunk_steps: int = 0  # steps of a trunk at the peak learning rate before branches (gpt.soup); 0: off
    soup_branch_steps: int = 230  # the least steps a branch gets; as many branches as fit follow the trunk
    soup_weight_decay: float = 0.0  # weight_decay from the moment a run decides to branch (0: unchanged)
    tune_memory_temperature: bool = True  # the validation split picks the temperature of each memory a run builds
    weight_average: float = 0.0  # decay of an exponential moving average of the weights (0: off), used to
    # validate and save the model; e.g. 0.98 averages over about the last 50 steps

    def validate(self) -> None:
        for name in ("tokenizer_vocab_size", "batch_size", "eval_interval", "log_interval", "checkpoint_interval",
                     "grad_accum", "bpe_copies", "soup_branch_steps"):
            if getattr(self, name) <= 0:
                raise UsageError(f"train.{name} must be a positive integer, got {getattr(self, name)}")
        if self.tokenizer_vocab_size < 258:
            raise UsageError("train.tokenizer_vocab_size must be at least 258 (256 bytes + 2 special tokens)")
        if self.tokenizer_vocab_size > 2**32:
            raise UsageError("train.tokenizer_vocab_size must be at most 2**32 (token files store 32-bit ids)")
        if self.learning_rate <= 0:
            raise UsageError(f"train.learning_rate must be positive, got {self.learning_rate}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UsageError(f"--max-steps must be positive, got {self.max_steps}")
        if self.max_time is not None and self.max_time <= 0:
            raise UsageError(f"--max-time must be positive, got {self.max_time}")
        if self.max_steps is None and self.max_time is None:
            raise UsageError("set --max-steps or --max-time, or the run would never end")
        if self.eval_stride is not None and self.eval_stride <= 0:
            raise UsageError(f"train.eval_stride must be positive, got {self.eval_stride}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UsageError(f"train.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise UsageError(f"train.dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise UsageError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Values a typo can make absurd: NaN or infinite numbers, negative counts, betas outside [0, 1)."""
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"train.{item.name} must be a finite number, got {value}")
        for name in ("warmup_steps", "seed", "weight_decay", "soup_trunk_steps", "soup_weight_decay"):
            if getattr(self, name) < 0:
                raise UsageError(f"train.{name} must be zero or more, got {getattr(self, name)}")
        if self.seed >= 2**63:
            raise UsageError(f"train.seed must be below 2**63, got {self.seed}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UsageError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.bpe_dropout < 1.0:
            raise UsageError(f"train.bpe_dropout must be in [0, 1) (0 turns it off), got {self.bpe_dropout}")
        if not 0.0 <= self.retyped_copies <= 1.0:
            raise UsageError(f"train.retyped_copies must be in [0, 1] (0 turns it off), got {self.retyped_copies}")
        if not 0.0 <= self.weight_average < 1.0:
            raise UsageError(f"train.weight_average must be in [0, 1) (0 turns it off), got {self.weight_average}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UsageError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.grad_clip <= 0:
            raise UsageError(f"train.grad_clip must be positive, got {self.grad_clip}")


@dataclass
class Preset:
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    about: str = ""


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        model=dict(sequence_len=32, num_layers=2, embed_dim=32, num_heads=2, dropout=0.0),
        train=dict(tokenizer_vocab_size=320, batch_size=8, learning_rate=3e-3, warmup_steps=10,
                   eval_interval=50, log_interval=5, checkpoint_interval=50, max_time=30.0),
        about="2 layers, 32 wide: trains in seconds, for tests and smoke checks",
    ),
    "small": Preset(
        model=dict(dropout=0.0, attention_dropout=0.0, memory_weight=0.45, memory_temperature=80.0,
                   memory_ngram_weight=0.2, memory_ngram_order=4),
        train=dict(bpe_dropout=0.07, bpe_copies=20, retyped_copies=0.5, eval_interval=180, soup_trunk_steps=400,
                   soup_branch_steps=230, soup_weight_decay=1.0),
        about="6 layers, 512 wide, 64-token context, BPE dropout, half the copies in other typographies, "
              "a memory of the training text (neighbours and n-gram counts): the default, "
              "tuned for 10 minutes on a laptop CPU",
    ),
    "seed": Preset(
        model=dict(sequence_len=128, num_layers=12, embed_dim=768, num_heads=12, dropout=0.1),
        train=dict(tokenizer_vocab_size=4096, batch_size=16, learning_rate=2.5e-4, warmup_steps=2000,
                   weight_decay=0.01, max_time=None, max_steps=100_000),
        about="the seed project's 12-layer, 768-wide, 12-head, 128-token model (GPT-1 sized, slow on a CPU)",
    ),
}
DEFAULT_PRESET = "small"


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    """Return fresh configs for a named preset."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    chosen = PRESETS[name]
    return ModelConfig(**chosen.model), TrainConfig(**chosen.train)


def _coerce(section: str, key: str, value, annotation: str):
    allowed_none = "None" in annotation
    if value is None or (allowed_none and value == "none"):
        if allowed_none:
            return None
        raise UsageError(f"{section}.{key} cannot be empty")
    if "float" in annotation and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = {"int": int, "float": float, "str": str, "bool": bool}
    base = re.match(r"\w+", annotation).group(0)
    kind = expected.get(base)
    if kind is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise UsageError(f"{section}.{key} must be a {base}, got {value!r}")
    return value


def apply_overrides(model: ModelConfig, train: TrainConfig, overrides: dict) -> None:
    """Apply {"model": {...}, "train": {...}} onto the configs, naming any unknown or mistyped key."""
    targets = {"model": model, "train": train}
    for section, values in overrides.items():
        if section not in targets or not isinstance(values, dict):
            raise UsageError(f"unknown config section [{section}]; use [model] and [train]")
        target = targets[section]
        fields = {f.name: f for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in fields:
                raise UsageError(f"unknown key {section}.{key}; known keys: {', '.join(fields)}")
            annotation = str(fields[key].type)
            setattr(target, key, _coerce(section, key, value, annotation))


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} not found; pass an existing .toml file to --config")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"config file {path} is not valid TOML ({err}); fix the file") from None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr)?\s*$")


def parse_duration(text: str) -> float:
    """'30s', '10m', '2h' or plain seconds -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise UsageError(f"cannot read duration {text!r}; write it like 30s, 10m or 2h")
    number, unit = float(match.group(1)), (match.group(2) or "s")[0]
    seconds = number * {"s": 1, "m": 60, "h": 3600}[unit]
    if seconds <= 0:
        raise UsageError(f"duration {text!r} must be longer than zero")
    return seconds
