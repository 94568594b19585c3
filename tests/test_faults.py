"""Faults during training: signals, kill -9, a full disk, a NaN loss, a failing validation.

Each fault is real or injected from outside the training code: real signals, real SIGKILL, the
kernel's own ENOSPC (a temporary file pointed at /dev/full), and launchers that wrap a library
function (safetensors' writer, a NaN written into a weight, the validation pass) before running
the unchanged `gpt` command. After each, the previous checkpoint must load and resume.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_clear_line, fingerprint, gpt, gpt_in_process

from gpt.checkpoint import STATE_FILE, WEIGHTS_FILE, load_checkpoint, load_training_state
from gpt.logs import read_metrics

RUN_GPT = "import sys\nfrom gpt.cli import main\nsys.exit(main(sys.argv[1:]))\n"
OUT = "out = sys.argv[sys.argv.index('--out') + 1]\n"
FULL_DISK_FOR = "import os, sys\n" + OUT + "os.symlink('/dev/full', os.path.join(out, f'.{NAME}.tmp{os.getpid()}'))\n"
FULL_DISK_FOR_WEIGHTS = """import errno, os, sys
import gpt.checkpoint

def full_disk(tensors, filename, metadata=None):
    with open(filename, "wb") as handle:
        handle.write(b"\\0" * 4096)  # part of the file made it to disk
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

gpt.checkpoint.save_file = full_disk
"""
NAN_AT_FORWARD = """import sys, torch
from torch.nn.modules.module import register_module_forward_pre_hook
from gpt.model import GPT
calls = [0]

def poison(module, args):
    if isinstance(module, GPT) and module.training:
        calls[0] += 1
        if calls[0] == {N}:
            with torch.no_grad():
                module.token_embed.weight[0, 0] = float("nan")

register_module_forward_pre_hook(poison)
"""
EVAL_FAILS = """import sys
import gpt.train
real, calls = gpt.train.total_nats, [0]

def flaky(*args, **kwargs):
    calls[0] += 1
    if calls[0] <= {FAILURES}:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    return real(*args, **kwargs)

gpt.train.total_nats = flaky
"""


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A copy of a real 60-step tiny run (validation and checkpoints every 50 steps, logs every 5)."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


def resume(run: Path, steps: int, launcher: str | None = None) -> subprocess.CompletedProcess:
    """With a launcher, a new process that sets up the fault first; without, `gpt train` in this process."""
    args = ("train", "--resume", "--out", str(run), "--max-steps", str(steps), "--quiet")
    return gpt(*args, launcher=launcher + RUN_GPT) if launcher else gpt_in_process(*args)


def assert_resumable(run: Path, steps: int) -> None:
    load_checkpoint(run)
    result = resume(run, steps)
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_training_state(run)["step"] == steps


# ------------------------------------------------------------------------------------------- signals


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_leaves_a_checkpoint_that_resume_continues(tmp_path, sig):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "gpt", "train", "--preset", "tiny", "--max-steps", "100000", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_metrics(out / "metrics.jsonl")) < 3:
        time.sleep(0.2)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == (130 if sig == signal.SIGINT else 143), stderr
    assert "Traceback" not in stderr and "gpt train --resume" in stderr
    stopped_at = load_training_state(out)["step"]
    assert stopped_at > 0 and read_metrics(out / "metrics.jsonl")[-1]["step"] == stopped_at
    load_checkpoint(out)
    resumed = gpt_in_process(*command[3:-4], "--max-steps", str(stopped_at + 10), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {stopped_at}" in resumed.stderr
    assert load_training_state(out)["step"] == stopped_at + 10


# ------------------------------------------------------------------------------------------- kill -9

KILLS = 10


def wait_for_new_save(path: Path, since: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if path.exists() and path.stat().st_mtime_ns != since:
            return
        time.sleep(0.005)
    raise AssertionError(f"no new {path.name} within {timeout}s (exit {process.poll()})")


@pytest.mark.slow
def test_kill_9_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path, alice_text):
    """Saves every 2 steps, so many kills land inside a checkpoint write; each time, the folder must load."""
    rng = random.Random(8)
    data, config, out = tmp_path / "text.txt", tmp_path / "often.toml", tmp_path / "run"
    data.write_text(alice_text[:40_000])
    config.write_text("[train]\ncheckpoint_interval = 2\neval_interval = 6\nlog_interval = 2\n")
    base = [sys.executable, "-m", "gpt", "train", "--preset", "tiny", "--config", str(config), "--data", str(data),
            "--out", str(out), "--max-steps", "100000", "--quiet"]
    steps, mid_write = [], 0
    for kill in range(KILLS):
        since = (out / STATE_FILE).stat().st_mtime_ns if (out / STATE_FILE).exists() else 0
        process = subprocess.Popen(base + (["--resume"] if kill else []), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, env=os.environ)
        wait_for_new_save(out / (WEIGHTS_FILE if kill == 0 else STATE_FILE), since, process)
        time.sleep(rng.uniform(0.0, 0.3))
        process.kill()
        process.communicate()
        assert process.returncode == -signal.SIGKILL
        mid_write += any(out.glob(".*.tmp*"))  # a half-written file: the kill landed inside a save
        load_checkpoint(out)
        state = load_training_state(out)
        assert all(bool(torch.isfinite(t).all()) for t in state["model"].values())
        steps.append(state["step"])
    assert steps == sorted(steps) and steps[-1] > steps[0]
    final = gpt_in_process(*base[3:-3], "--max-steps", str(steps[-1] + 4), "--quiet", "--resume")
    assert final.returncode == 0, final.stderr[-2000:]
    assert load_training_state(out)["step"] == steps[-1] + 4
    assert not list(out.glob(".*.tmp*"))  # what the killed runs left half-written is cleaned up
    print(f"{KILLS} kills, {mid_write} inside a checkpoint write, steps {steps}")


# ---------------------------------------------------------------------------------------- disk full


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux) for a real ENOSPC")
def test_disk_full_while_saving_the_training_state_keeps_the_previous_one(run):
    """The kernel's ENOSPC, met by torch's own writer: the previous training state survives."""
    state_before = fingerprint(run / STATE_FILE)
    result = resume(run, 80, launcher=FULL_DISK_FOR.replace("{NAME}", STATE_FILE))
    assert_one_clear_line(result, "could not save the checkpoint", "at step 80", "previous checkpoint is kept",
                          "free disk space", "gpt train --resume")
    assert fingerprint(run / STATE_FILE) == state_before and load_training_state(run)["step"] == 60
    assert not list(run.glob(".*.tmp*"))
    assert_resumable(run, 65)


def test_disk_full_while_saving_the_weights_keeps_the_previous_ones(run):
    before = fingerprint(run / WEIGHTS_FILE, run / STATE_FILE)
    result = resume(run, 100, launcher=FULL_DISK_FOR_WEIGHTS)
    if result.returncode == 0:  # validation did not improve at step 100, so no weights were written
        pytest.skip("no new best weights to write in this run")
    assert_one_clear_line(result, "No space left on device", "previous checkpoint is kept", "--resume")
    assert fingerprint(run / WEIGHTS_FILE, run / STATE_FILE) == before
    assert not list(run.glob(".*.tmp*"))
    assert_resumable(run, 65)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux) for a real ENOSPC")
def test_disk_full_before_the_first_checkpoint(tmp_path, alice_text):
    data, out = tmp_path / "text.txt", tmp_path / "run"
    data.write_text(alice_text[:20_000])
    out.mkdir()
    result = gpt("train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--max-steps", "5", "--quiet",
                 launcher=FULL_DISK_FOR.replace("{NAME}", "config.json") + RUN_GPT)
    assert_one_clear_line(result, "No space left on device", "free some disk space")


# ----------------------------------------------------------------------------------------- NaN loss


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(run):
    """A NaN lands in a weight at step 106; the checkpoint of step 100 is the one kept."""
    result = resume(run, 200, launcher=NAN_AT_FORWARD.replace("{N}", "46"))
    line = assert_one_clear_line(result, "the training loss became nan at step 110", "last good checkpoint",
                                 "learning_rate")
    assert str(run) in line
    state = load_training_state(run)
    assert state["step"] == 100
    assert all(bool(torch.isfinite(t).all()) for t in state["model"].values())
    checkpoint = load_checkpoint(run)
    assert all(bool(torch.isfinite(p).all()) for p in checkpoint.model.parameters())
    assert_resumable(run, 105)


# ------------------------------------------------------------------------------- failing validation


def test_training_survives_a_failed_validation(run):
    result = resume(run, 110, launcher=EVAL_FAILS.replace("{FAILURES}", "1"))
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: validation failed at step 100 (RuntimeError: CUDA out of memory. Tried to "
                        "allocate 2.00 GiB (injected)); training goes on and the checkpoint is still saved"]
    rows = {row["step"]: row for row in read_metrics(run / "metrics.jsonl")}
    assert "val_loss" not in rows[100] and "val_loss" in rows[110]
    assert load_training_state(run)["step"] == 110
    load_checkpoint(run)


def test_a_run_whose_validations_all_fail_still_keeps_usable_weights(run):
    (run / WEIGHTS_FILE).unlink()
    result = resume(run, 70, launcher=EVAL_FAILS.replace("{FAILURES}", "1000"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: validation failed at step 70" in result.stderr
    header = json.loads((run / WEIGHTS_FILE).read_bytes()[8:][: int.from_bytes((run / WEIGHTS_FILE).read_bytes()[:8],
                                                                                "little")])
    assert header["__metadata__"] == {"step": "70", "val_loss": "unknown"}
    load_checkpoint(run)
