"""Shared fixtures: the book comes from GPT_DATA_DIR (CI points it at ../shared/data)."""

import os
import signal
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not os.environ.get("GPT_DATA_DIR") and SHARED_DATA.is_dir():
    os.environ["GPT_DATA_DIR"] = str(SHARED_DATA)

# Runs are compared with each other and with `gpt eval` to 1e-5: pin float32 on CPUs that would pick bf16.
os.environ.setdefault("GPT_DTYPE", "float32")

# A shell starts background jobs (`pytest &`, nohup) with Ctrl-C ignored, and child processes inherit that,
# so the tests that press Ctrl-C on a `gpt` subprocess would hang. Handled signals reset on exec: restore it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def alice_text() -> str:
    from gpt.corpus import load_documents

    return load_documents("alice")[0]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny model trained for 60 steps on Alice: a real checkpoint folder for the CLI and loaders."""
    from gpt.config import preset
    from gpt.train import train

    model_config, train_config = preset("tiny")
    train_config.max_steps, train_config.max_time = 60, None
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(model_config, train_config, out, show_progress=False)
    return out


@pytest.fixture(scope="session")
def memory_run(tmp_path_factory, alice_text):
    """A tiny model trained on the first 30,000 characters of Alice, ending with its memory."""
    from gpt.config import preset
    from gpt.train import train

    folder = tmp_path_factory.mktemp("runs")
    (folder / "alice_start.txt").write_text(alice_text[:30_000], encoding="utf-8")
    model_config, train_config = preset("tiny")
    model_config.memory_weight, model_config.memory_temperature, model_config.memory_ngram_weight = 0.5, 2.0, 0.2
    train_config.max_steps, train_config.max_time = 40, None
    train_config.eval_interval = 20
    train(model_config, train_config, folder / "memory", data=str(folder / "alice_start.txt"), show_progress=False)
    return folder / "memory"
