"""wonderland-gpt: train a small GPT on a book, sample from it and score it."""

from gpt.config import ModelConfig, TrainConfig, UsageError
from gpt.model import GPT

__all__ = ["GPT", "ModelConfig", "TrainConfig", "UsageError"]
