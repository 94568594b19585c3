"""torchrun on CPU (gloo, 2 processes): the same run as one process with gradient accumulation, FSDP
included, and an interrupted run that resumes exactly, on the same or another number of processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from gpt.checkpoint import load_checkpoint, load_training_state
from gpt.cli import main

pytestmark = pytest.mark.slow
STEPS = 60
CONFIG = """
[model]
dropout = 0.1   # dropout masks must not depend on how the batch is split
[train]
log_interval = 1
eval_interval = 20
"""


UPSTREAM_ABORT = "terminate called without an active exception"


def torchrun(*args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "gpt", "train", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ,
                            start_new_session=True)


def finished(*args: str) -> str:
    """torchrun `gpt train *args` to a clean exit; its stderr.

    A worker that aborts inside torch's C++ with UPSTREAM_ABORT (SIGABRT, no Python traceback) is run once more
    from the folder as it was: CI saw it once, in an FSDP run right after step 1, and 65 runs here did not
    repeat it. Any other failure, or a second abort, fails the test.
    """
    out = Path(args[args.index("--out") + 1])
    before = out.with_name(out.name + ".before")
    if out.exists():
        shutil.copytree(out, before)
    for attempt in (1, 2):
        process = torchrun(*args)
        try:
            _, err = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:  # a hung run (a collective only some ranks reached) must not outlive it
            os.killpg(process.pid, signal.SIGKILL)
            raise
        if process.returncode == 0 or attempt == 2 or UPSTREAM_ABORT not in err:
            break
        warnings.warn(f"a torchrun worker aborted in torch's C++ ({UPSTREAM_ABORT}); running it again",
                      stacklevel=2)
        shutil.rmtree(out, ignore_errors=True)
        if before.exists():
            shutil.copytree(before, out)
    assert process.returncode == 0, err[-3000:]
    return err


def losses(folder) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train_loss"] for row in rows}


def assert_same_losses(a: dict[int, float], b: dict[int, float], tolerance: float, after: int = 0) -> None:
    steps = [s for s in a if s > after]
    assert steps and steps == [s for s in b if s > after]
    worst = max(abs(a[s] - b[s]) for s in steps)
    assert worst <= tolerance, worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted 2-process run and the same batches on one process with --grad-accum 2."""
    root = tmp_path_factory.mktemp("distributed")
    (root / "run.toml").write_text(CONFIG)
    common = ["--preset", "tiny", "--config", str(root / "run.toml"), "--max-steps", str(STEPS)]
    err = finished(*common, "--out", str(root / "two"))
    assert "global batch 16 windows = 8 per micro-step x 1 micro-steps x 2 processes" in err
    assert main(["train", *common, "--grad-accum", "2", "--out", str(root / "one"),
                 "--quiet"]) == 0
    return root, common


def test_two_processes_equal_one_process_with_accumulation(runs):
    root, _ = runs
    assert len(losses(root / "two")) == STEPS
    assert_same_losses(losses(root / "two"), losses(root / "one"), 1e-4)


def test_fsdp_trains_the_same_and_saves_a_full_checkpoint(runs):
    root, common = runs
    finished(*common, "--fsdp", "--out", str(root / "fsdp"))
    assert_same_losses(losses(root / "fsdp"), losses(root / "one"), 1e-4)
    load_checkpoint(root / "fsdp")  # unsharded weights that one process loads


def test_interrupted_run_resumes_exactly_on_two_or_one_processes(runs):
    root, common = runs
    out = root / "stopped"
    process = torchrun(*common, "--out", str(out))
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "metrics.jsonl").is_file() or len(losses(out)) < 3:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches torchrun and every worker
    _, err = process.communicate(timeout=120)
    stopped_at = load_training_state(out)["step"]
    assert "checkpoint saved" in err and 0 < stopped_at < STEPS
    shutil.copytree(out, root / "stopped_copy")

    finished("--resume", "--out", str(out))
    assert_same_losses(losses(out), losses(root / "two"), 1e-6, after=stopped_at)

    assert main(["train", "--resume", "--grad-accum", "2", "--out", str(root / "stopped_copy"), "--quiet"]) == 0
    assert_same_losses(losses(root / "stopped_copy"), losses(root / "two"), 1e-4, after=stopped_at)


@pytest.mark.parametrize("fsdp", [False, True])
def test_validations_with_a_memory_under_torchrun(tmp_path, alice_text, fsdp):
    """Rank 0 builds the validations' memories alone with its full model; a sharded (FSDP) model cannot, so its
    validations log the network only, and the run still ends with the memory of the saved weights."""
    (tmp_path / "start.txt").write_text(alice_text[1_000:5_000], encoding="utf-8")
    (tmp_path / "run.toml").write_text("[model]\nmemory_weight = 0.5\nmemory_ngram_weight = 0.2\n[train]\n"
                                       "eval_interval = 20\n")
    out = tmp_path / "run"
    finished("--preset", "tiny", "--config", str(tmp_path / "run.toml"), "--data", str(tmp_path / "start.txt"),
             "--max-steps", "40", *(["--fsdp"] if fsdp else []), "--out", str(out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    middle = next(row for row in rows if row["step"] == 20 and "val_loss" in row)
    assert ("val_bits_per_char_with_memory" in middle) is not fsdp
    assert rows[-1]["memory_positions"] > 0
    assert load_checkpoint(out).memory is not None
