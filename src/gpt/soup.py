"""Branches of one trunk, averaged into one network: how a run spends a budget longer than one network can use.

On a small text the network is best after a few hundred steps (docs/training.md, round 21): trained longer it
overfits, whatever the regularisation. A budget with room for more is spent on branches instead. The trunk
trains at the peak learning rate for `soup_trunk_steps`; then each branch starts from the trunk's weights and
optimizer state, reads the next windows of the data stream, and decays the learning rate to its floor; the
branches' weights are averaged at the end (a model soup, Wortsman et al. 2022: branches of one trunk stay in one
basin, so their average is a network, not a blur). The average scores like an ensemble of the branches at the
cost of one network when sampling.

How many branches fit is decided from the run's measured progress: a run whose budget holds fewer than two
branches after the trunk is trained as before, one cosine over the whole budget (a slow machine's 10 minutes).
A run that branches also takes `soup_weight_decay` from then on: weight decay 1.0 helps a network trained for 450
steps or more and hurts one of ~350 (docs/training.md, round 21).
"""

from __future__ import annotations

import copy

import torch

from gpt.config import TrainConfig
from gpt.optim import learning_rate


class Soup:
    def __init__(self, config: TrainConfig, sharded: bool):
        self.config = config
        # not with FSDP (shards are not averaged here) nor a weight average (it would blur the branches)
        self.enabled = config.soup_trunk_steps > 0 and not sharded and not config.weight_average
        self.decided, self.branching = not self.enabled, False
        self.branches, self.done, self.trunk_progress = 0, 0, 0.0
        self.averaged = False  # the model holds the branches' average: the run's end
        self.trunk: dict | None = None  # the trunk's weights and optimizer state, where every branch starts
        self.total: list[torch.Tensor] | None = None  # the finished branches' weights, summed

    @property
    def pending(self) -> bool:
        """A branch is under way: the run's end must average it in first."""
        return self.trunk is not None and self.done < self.branches

    def decide(self, step: int, progress: float) -> None:
        """Once warmed up (or at once for a run limited by steps): branch if two branches fit after the trunk."""
        if self.decided or (not self.config.max_steps and step < self.config.warmup_steps) or progress <= 0:
            return
        steps = self.config.max_steps or step / progress  # the run's length in steps, as it goes now
        self.branching = steps >= self.config.soup_trunk_steps + 2 * self.config.soup_branch_steps
        self.decided = True

    def learning_rate(self, step: int, progress: float) -> float:
        """optim.learning_rate over the whole run, or at the trunk's peak (progress 0), then over each branch."""
        if not self.branching or self.trunk is None:
            return learning_rate(step, progress if not self.branching else 0.0, self.config)
        share = (1.0 - self.trunk_progress) / self.branches
        return learning_rate(step, min(1.0, max(0.0, (progress - self.trunk_progress) / share - self.done)),
                             self.config)

    @torch.no_grad()
    def after_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                   progress: float) -> str | None:
        """Start the branches when the trunk ends, the next branch when one ends, and average them all when the run
        ends (progress 1); what happened, for the log."""
        if not self.decided:
            self.decide(step, progress)
            if self.branching and self.config.soup_weight_decay:  # the matrices' group: the one that decays
                for group in optimizer.param_groups:
                    group["weight_decay"] = self.config.soup_weight_decay if group["weight_decay"] else 0.0
        if not self.branching:
            return None
        if progress >= 1.0:
            return self.finish(model)
        if self.trunk is None and not self.branches and step >= self.config.soup_trunk_steps:
            steps_left = (1.0 - progress) * step / progress
            self.branches = max(2, int(steps_left // self.config.soup_branch_steps))
            self.trunk_progress = progress
            self.trunk = {"weights": [p.detach().clone() for p in model.parameters()],
                          "optimizer": copy.deepcopy(optimizer.state_dict())}
            return f"trunk done at step {step}: {self.branches} branches follow"
        share = (1.0 - self.trunk_progress) / max(self.branches, 1)
        branch_end = self.trunk_progress + (self.done + 1) * share - 1e-9  # float sums: a step's progress may miss
        if self.pending and self.done + 1 < self.branches and progress >= branch_end:
            self._add(model)
            for param, start in zip(model.parameters(), self.trunk["weights"]):
                param.copy_(start)
            optimizer.load_state_dict(copy.deepcopy(self.trunk["optimizer"]))
            return f"branch {self.done} of {self.branches} done at step {step}"
        return None

    @torch.no_grad()
    def finish(self, model: torch.nn.Module) -> str | None:
        """At the run's end: the last branch joins the others, and the model holds their average."""
        if not self.pending:
            return None
        self._add(model)
        for param, total in zip(model.parameters(), self.total):
            param.copy_(total / self.done)
        self.trunk, self.averaged = None, True  # nothing pending; the average is what validation and saving see
        return f"the {self.done} branches averaged into the saved network"

    def _add(self, model: torch.nn.Module) -> None:
        weights = [p.detach().clone() for p in model.parameters()]
        self.total = weights if self.total is None else [t.add_(w) for t, w in zip(self.total, weights)]
        self.done += 1

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in ("decided", "branching", "branches", "done", "trunk_progress",
                                                       "trunk", "total", "averaged")}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)
