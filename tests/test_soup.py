"""gpt.soup: branches of one trunk, averaged. A real optimizer on a real (small) module, stepped as a run steps it:
the branches start from the trunk, the saved network is their mean, and a budget too short for two branches is
trained with the plain cosine."""

import pytest
import torch

from gpt.config import TrainConfig
from gpt.optim import learning_rate
from gpt.soup import Soup


def stepped(config: TrainConfig, steps: int, total: int | None = None):
    """Train a linear layer for `steps` steps under the soup's schedule; its weights after each step, before the
    soup acts (a branch's end), and after (a branch's start), and the soup."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    soup, before, after, total = Soup(config, sharded=False), {}, {}, total or steps
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = soup.learning_rate(step - 1, (step - 1) / total)
        loss = ((model(torch.randn(8, 4)) - torch.randn(8, 3)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        before[step] = model.weight.detach().clone()
        soup.after_step(model, optimizer, step, step / total)
        after[step] = model.weight.detach().clone()
    stepped.optimizer = optimizer  # the last run's, for the weight decay it ends with
    return before, after, soup


def test_branches_start_from_the_trunk_and_are_averaged():
    config = TrainConfig(max_steps=40, max_time=None, warmup_steps=1, soup_trunk_steps=10, soup_branch_steps=10)
    before, after, soup = stepped(config, 40)
    assert soup.branching and soup.branches == 3 and soup.done == 3 and not soup.pending
    trunk = after[10]
    for end in (20, 30):  # a branch ends, and the next starts from the trunk's weights
        assert not torch.equal(before[end], trunk)
        assert torch.equal(after[end], trunk)
    assert torch.allclose(after[40], (before[20] + before[30] + before[40]) / 3)


def test_each_branch_decays_to_the_floor_from_the_peak():
    config = TrainConfig(max_steps=40, max_time=None, warmup_steps=1, soup_trunk_steps=10, soup_branch_steps=10)
    _, _, soup = stepped(config, 40)
    soup.load_state_dict({"trunk": {}, "done": 1})  # inside the second branch
    assert soup.learning_rate(20, 0.5) == pytest.approx(config.learning_rate)  # its start: the peak
    assert soup.learning_rate(29, 0.75) == pytest.approx(config.learning_rate * config.min_lr_ratio)


@pytest.mark.parametrize("steps, decay", [(40, 1.0), (25, 0.1)])
def test_a_run_that_branches_takes_the_soups_weight_decay(steps, decay):
    config = TrainConfig(max_steps=steps, max_time=None, warmup_steps=1, soup_trunk_steps=10, soup_branch_steps=10,
                         soup_weight_decay=1.0)
    stepped(config, steps)
    assert [group["weight_decay"] for group in stepped.optimizer.param_groups] == [decay]


def test_a_budget_without_room_for_two_branches_is_one_cosine():
    config = TrainConfig(max_steps=25, max_time=None, warmup_steps=1, soup_trunk_steps=10, soup_branch_steps=10)
    _, _, soup = stepped(config, 25)
    assert soup.decided and not soup.branching and soup.trunk is None
    for step in (0, 5, 20):
        assert soup.learning_rate(step, step / 25) == learning_rate(step, step / 25, config)


def test_the_state_survives_a_round_trip():
    config = TrainConfig(max_steps=40, max_time=None, warmup_steps=1, soup_trunk_steps=10, soup_branch_steps=10)
    _, _, soup = stepped(config, 25, total=40)
    copy = Soup(config, sharded=False)
    copy.load_state_dict(soup.state_dict())
    assert copy.pending and copy.done == soup.done == 1 and copy.branches == 3
    assert all(torch.equal(a, b) for a, b in zip(copy.total, soup.total))


def test_a_run_ends_with_the_average_and_its_memory_temperature(tmp_path):
    """The tiny preset with a memory, 60 steps: the trunk, the branches and their average in the log; config.json
    and the saved memory take the temperature the validation split picked for the average (or, with
    tune_memory_temperature off, the configured one)."""
    from gpt.checkpoint import load_checkpoint
    from gpt.config import preset
    from gpt.logs import read_metrics
    from gpt.memory import TEMPERATURE_STEPS
    from gpt.train import train

    model_config, train_config = preset("tiny")
    model_config.memory_weight = 0.3
    train_config.max_steps, train_config.max_time = 60, None
    train_config.soup_trunk_steps, train_config.soup_branch_steps, model_config.memory_temperature = 20, 10, 99.0
    train(model_config, train_config, tmp_path / "run", show_progress=False)
    events = [row["soup"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl") if "soup" in row]
    assert events[0] == "trunk done at step 20: 4 branches follow"
    assert events[-1] == "the 4 branches averaged into the saved network" and len(events) == 5
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.memory.temperature == checkpoint.model_config.memory_temperature
    assert checkpoint.memory.temperature in [99.0 * step for step in TEMPERATURE_STEPS]
    model_config.memory_temperature, train_config.tune_memory_temperature = 99.0, False
    train(model_config, train_config, tmp_path / "fixed", show_progress=False)
    checkpoint = load_checkpoint(tmp_path / "fixed")
    assert checkpoint.model_config.memory_temperature == 99.0 and checkpoint.memory.temperature == 99.0
