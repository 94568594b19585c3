"""wonderland-gpt: train a small GPT on a book, sample from it and score it."""

from gpt.config import ModelConfig, TrainConfig, UsageError

__all__ = ["GPT", "ModelConfig", "TrainConfig", "UsageError"]


def __getattr__(name: str):
    """GPT is imported on first use: torch takes seconds to load, and `gpt --help` or a typo should not wait."""
    if name == "GPT":
        from gpt.model import GPT

        return GPT
    raise AttributeError(f"module 'gpt' has no attribute {name!r}")
