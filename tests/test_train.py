import math
import os
import signal
import threading
import time

import pytest
import torch

import gpt.train
from gpt.checkpoint import load_checkpoint, load_training_state
from gpt.config import TrainConfig, UsageError, preset
from gpt.hardware import autocast_dtype, compiles, cpu_flags, native_bf16, read_cpuinfo
from gpt.logs import read_metrics
from gpt.optim import learning_rate, replaces_kept, run_progress
from gpt.train import train


def tiny_configs(steps: int):
    model_config, train_config = preset("tiny")
    train_config.max_steps, train_config.max_time = steps, None
    train_config.eval_interval, train_config.log_interval = 20, 5
    return model_config, train_config


def losses(folder):
    return [(r["step"], r["train_loss"]) for r in read_metrics(folder / "metrics.jsonl") if "train_loss" in r]


def test_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(learning_rate=1.0, warmup_steps=10, max_steps=100, max_time=None, min_lr_ratio=0.1)
    rates = [learning_rate(s, run_progress(s, 0.0, config), config) for s in range(100)]
    assert rates[0] == pytest.approx(0.1 * (0.1 + 0.9 * 1.0))
    assert max(rates) == rates[9] or max(rates) == rates[10]
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert learning_rate(100, 1.0, config) == pytest.approx(0.1)
    timed = TrainConfig(max_time=60.0, max_steps=None)
    assert run_progress(5, 30.0, timed) == 0.5


def test_training_lowers_loss_and_keeps_the_best_checkpoint(tiny_run):
    rows = read_metrics(tiny_run / "metrics.jsonl")
    train_losses = [r["train_loss"] for r in rows]
    assert train_losses[-1] < train_losses[0] - 1.0
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [50, 60]
    assert all(k in rows[-1] for k in ("step", "train_loss", "val_loss", "tokens_seen", "lr"))
    assert load_training_state(tiny_run)["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in val), abs=1e-6)


def test_same_seed_same_losses_and_other_seed_differs(tmp_path):
    runs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        model_config, train_config = tiny_configs(30)
        train_config.seed = seed
        train(model_config, train_config, tmp_path / name, show_progress=False)
        runs.append(losses(tmp_path / name))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_default_precision_and_compile_follow_the_hardware(monkeypatch):
    """On a CPU: bf16 autocast only with native bf16, never compiled unless asked; explicit choices win."""
    cpu = torch.device("cpu")
    native = native_bf16(cpu_flags(read_cpuinfo()))
    assert autocast_dtype(cpu, "auto") is None  # the suite pins float32 (conftest's GPT_DTYPE)
    monkeypatch.delenv("GPT_DTYPE")
    assert autocast_dtype(cpu, "auto") == (torch.bfloat16 if native else None)
    monkeypatch.setenv("GPT_DTYPE", "bfloat16")
    assert autocast_dtype(cpu, "auto") == torch.bfloat16
    assert autocast_dtype(cpu, "float32") is None and autocast_dtype(cpu, "bfloat16") == torch.bfloat16
    assert TrainConfig().dtype == "auto" and TrainConfig().compile is None
    assert not compiles(cpu, None) and compiles(cpu, True) and not compiles(torch.device("cuda"), False)


@pytest.mark.slow
def test_a_compiled_training_step_trains_like_the_eager_one(tmp_path):
    """--compile on a CPU (opt-in there): the same losses as eager training, and a checkpoint that loads."""
    runs = []
    for name, compiled in (("eager", False), ("compiled", True)):
        model_config, train_config = tiny_configs(10)
        train_config.compile, train_config.log_interval = compiled, 1
        train(model_config, train_config, tmp_path / name, show_progress=False)
        runs.append([loss for _, loss in losses(tmp_path / name)])
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)
    assert load_checkpoint(tmp_path / "compiled").model.state_dict().keys() == \
        load_checkpoint(tmp_path / "eager").model.state_dict().keys()


def interrupt_when(condition, timeout: float = 60.0) -> threading.Thread:
    """Send this process SIGINT once condition() holds, as Ctrl-C would."""

    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline and not condition():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("extras, rows", [({}, 3), ({"weight_average": 0.9, "bpe_dropout": 0.1, "bpe_copies": 3}, 3),
                                          ({"soup_trunk_steps": 20, "soup_branch_steps": 10}, 9)])
def test_interrupted_run_resumes_exactly(tmp_path, extras, rows):
    """Also with weight averaging and BPE dropout (the resumed run tokenizes the copies again, from the seed), and
    stopped inside a soup's second branch (gpt.soup: the trunk and the finished branch are in the state)."""
    def configs():
        model_config, train_config = tiny_configs(60)
        for name, value in extras.items():
            setattr(train_config, name, value)
        return model_config, train_config

    train(*configs(), tmp_path / "whole", show_progress=False)
    split = tmp_path / "split"
    watcher = interrupt_when(lambda: len(read_metrics(split / "metrics.jsonl")) >= rows)
    result = train(*configs(), split, show_progress=False)
    watcher.join()
    assert result.interrupted_by == "SIGINT" and 0 < result.step < 60
    train(*configs(), split, resume=True, show_progress=False)
    whole = dict(losses(tmp_path / "whole"))
    resumed = [(step, loss) for step, loss in losses(split) if step > result.step]
    assert resumed and resumed[-1][0] == 60
    for step, loss in resumed:
        assert math.isclose(loss, whole[step], abs_tol=1e-6), step
    final = [read_metrics(folder / "metrics.jsonl")[-1]["val_loss"] for folder in (tmp_path / "whole", split)]
    assert math.isclose(*final, abs_tol=1e-6)  # validated with the same (averaged) weights


def test_resume_refuses_another_model_shape(tmp_path):
    model_config, train_config = tiny_configs(5)
    train(model_config, train_config, tmp_path / "run", show_progress=False)
    model_config, train_config = tiny_configs(10)
    model_config.num_layers += 1
    with pytest.raises(UsageError, match="differs"):
        train(model_config, train_config, tmp_path / "run", resume=True, show_progress=False)


def test_a_new_run_replaces_a_trained_folder_only_when_asked(tmp_path):
    model_config, train_config = tiny_configs(5)
    train(model_config, train_config, tmp_path / "run", show_progress=False)
    first = (tmp_path / "run" / "model.safetensors").read_bytes()
    train_config.seed += 1
    with pytest.raises(UsageError, match="already holds a trained model"):
        train(model_config, train_config, tmp_path / "run", show_progress=False)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == first
    train(model_config, train_config, tmp_path / "run", show_progress=False, overwrite=True)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() != first
    assert load_training_state(tmp_path / "run")["step"] == 5


def test_text_shorter_than_a_window(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words here.")
    model_config, train_config = tiny_configs(5)
    with pytest.raises(UsageError, match="fewer than one window"):
        train(model_config, train_config, tmp_path / "run", data=str(short), show_progress=False)


def test_a_timed_run_ends_with_the_validation_that_runs_past_its_time(tmp_path, monkeypatch):
    """That validation and its checkpoint are the run's last: no step after it, and no second validation."""
    real, calls = gpt.train.total_nats, []

    def second_one_is_slow(*args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) == 2:
            time.sleep(6.0)  # crosses max_time below, whatever the machine's speed
        return real(*args, **kwargs)

    monkeypatch.setattr(gpt.train, "total_nats", second_one_is_slow)
    model_config, train_config = tiny_configs(0)
    train_config.max_steps, train_config.max_time = None, 4.0
    train_config.eval_interval = train_config.log_interval = 1
    train(model_config, train_config, tmp_path / "run", show_progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all("val_loss" in r for r in rows)
    assert calls == [1, 2] and load_training_state(tmp_path / "run")["step"] == 2


def test_the_kept_weights_are_judged_by_the_memory_score_where_a_validation_has_one():
    assert replaces_kept(5.0, 1.80, kept_loss=4.0, kept_mixed=1.90)  # the network worse, the mixture better
    assert not replaces_kept(3.0, 1.95, kept_loss=4.0, kept_mixed=1.90)
    assert replaces_kept(3.0, None, kept_loss=4.0, kept_mixed=1.90)  # no memory score: the network's loss
    assert not replaces_kept(5.0, None, kept_loss=4.0, kept_mixed=1.90)
    assert not replaces_kept(None, None, kept_loss=math.inf, kept_mixed=math.inf)  # a failed validation
