import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from gpt.averaging import WeightAverage
from gpt.checkpoint import load_training_state
from gpt.config import UsageError, preset
from gpt.model import GPT
from gpt.train import train


def test_average_follows_the_decay_and_ramps_up():
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    average = WeightAverage(layer, decay=0.5)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    average.update(1)  # ramp: decay min(0.5, 2 / 11) = 2/11, so the average moves 9/11 of the way
    assert average.average[0].item() == pytest.approx(9 / 11)
    average.update(100)  # decay 0.5 from here on
    assert average.average[0].item() == pytest.approx(9 / 11 + (1 - 9 / 11) / 2)


def test_swapped_in_restores_the_raw_weights_even_after_an_error():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    average = WeightAverage(layer, decay=0.9)
    raw = [p.detach().clone() for p in layer.parameters()]
    with torch.no_grad():
        for a in average.average:
            a.add_(1.0)
    with pytest.raises(RuntimeError):
        with average.swapped_in():
            assert torch.equal(layer.weight, raw[0] + 1.0)
            raise RuntimeError("validation failed")
    assert all(torch.equal(p, r) for p, r in zip(layer.parameters(), raw))


def test_training_saves_the_average_and_keeps_the_raw_weights_for_resuming(tmp_path):
    model_config, train_config = preset("tiny")
    train_config.max_steps, train_config.max_time, train_config.weight_average = 30, None, 0.9
    train(model_config, train_config, tmp_path / "run", show_progress=False)
    saved = load_file(tmp_path / "run" / "model.safetensors")
    state = load_training_state(tmp_path / "run")
    names = [name for name, _ in GPT(config=model_config).named_parameters()]
    averaged = dict(zip(names, state["average"], strict=True))
    assert all(torch.equal(saved[name], averaged[name]) for name in names)  # the last validation was the best
    name = "blocks.0.mlp.fc.weight"
    assert not torch.equal(saved[name], state["model"][name])  # resuming continues from the raw weights


def test_weight_average_out_of_range_is_refused(tmp_path):
    model_config, train_config = preset("tiny")
    train_config.weight_average = 1.0
    with pytest.raises(UsageError, match="weight_average"):
        train(model_config, train_config, tmp_path / "run", show_progress=False)
