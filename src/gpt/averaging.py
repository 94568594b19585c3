"""An exponential moving average of the weights (Polyak averaging), for validation and the saved model.

Late in a short run the weights still move noisily from step to step; their running average is often a
better model than the last step's weights. It costs one copy of the parameters and one fused update per
step. Training itself always continues from the raw weights; the average only replaces them while it is
validated or saved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from gpt.config import UsageError, first_line


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, steps_done: int) -> None:
        """Blend in the weights after an optimizer step; early steps weigh more (the decay ramps up to
        `decay` as (1 + n) / (10 + n)), so the average does not start out dominated by the random init."""
        decay = min(self.decay, (1 + steps_done) / (10 + steps_done))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block and its own again after it."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            for param, average in zip(self.params, self.average):
                param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.params, raw):
                    param.copy_(saved)

    def state_dict(self) -> list[torch.Tensor]:
        return [a.detach().cpu() for a in self.average]

    def load_state_dict(self, tensors: list[torch.Tensor]) -> None:
        if len(tensors) != len(self.average) or any(t.shape != a.shape for t, a in zip(tensors, self.average)):
            raise ValueError("the saved weight average does not fit this model")
        with torch.no_grad():
            for average, saved in zip(self.average, tensors):
                average.copy_(saved)


def start_average(model: nn.Module, decay: float, fsdp: bool, state: dict | None) -> WeightAverage | None:
    """The weight average of a run (None when off), taken up again from a resumed state."""
    if not decay:
        return None
    if fsdp:
        raise UsageError("train.weight_average does not work with --fsdp yet; set it to 0 or train without --fsdp")
    average = WeightAverage(model, decay)
    if state is not None and "average" in state:
        try:
            average.load_state_dict(state["average"])
        except (ValueError, TypeError, AttributeError) as err:
            raise UsageError(f"the weight average in the training state does not fit the model ({first_line(err)}); "
                             "train again without --resume") from None
    return average
