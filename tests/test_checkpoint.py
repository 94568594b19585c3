import json
import shutil

import pytest
import torch

from gpt.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    atomic_write,
    load_checkpoint,
    load_training_state,
    save_weights,
)
from gpt.config import UsageError


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    return copy


def test_folder_holds_everything_needed(tiny_run):
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, "training_state.pt", "metrics.jsonl", "loss.png"):
        assert (tiny_run / name).is_file(), name
    info = json.loads((tiny_run / CONFIG_FILE).read_text())
    assert info["format_version"] == 1
    assert info["versions"]["torch"] == torch.__version__
    assert info["model"]["vocab_size"] == info["tokenizer"]["vocab_size"]
    assert {"pad_id", "eot_id"} <= set(info["tokenizer"])


def test_load_gives_the_saved_weights(tiny_run):
    checkpoint = load_checkpoint(tiny_run)
    assert not checkpoint.model.training
    state = load_training_state(tiny_run)
    assert state["step"] == 60
    assert set(state) >= {"model", "optimizer", "elapsed", "rng", "best_val_loss"}


def test_save_then_load_is_bit_identical(run_copy):
    checkpoint = load_checkpoint(run_copy)
    with torch.no_grad():
        for p in checkpoint.model.parameters():
            p.add_(torch.randn_like(p))
    save_weights(run_copy, checkpoint.model)
    again = load_checkpoint(run_copy)
    for (name, a), (_, b) in zip(checkpoint.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_checkpoint_saved_before_the_activation_field_keeps_the_tanh_gelu(run_copy):
    """Checkpoints written before model.activation existed were trained with the tanh GELU, then the only one."""
    assert load_checkpoint(run_copy).model_config.activation == "gelu"
    info = json.loads((run_copy / CONFIG_FILE).read_text())
    del info["model"]["activation"]
    (run_copy / CONFIG_FILE).write_text(json.dumps(info))
    checkpoint = load_checkpoint(run_copy)
    assert checkpoint.model_config.activation == "gelu_tanh"
    assert checkpoint.model.blocks[0].mlp.gelu.approximate == "tanh"


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"previous")

    def crash_midway(path):
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, crash_midway)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_missing_folder_and_files(tmp_path, run_copy):
    with pytest.raises(UsageError, match="not found; train one"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(UsageError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path)
    (run_copy / WEIGHTS_FILE).unlink()
    with pytest.raises(UsageError, match="no weights"):
        load_checkpoint(run_copy)


def test_truncated_and_corrupted_weights(run_copy):
    weights = run_copy / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="damaged"):
        load_checkpoint(run_copy)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(UsageError, match="damaged"):
        load_checkpoint(run_copy)


def test_newer_format_and_mismatched_tokenizer(run_copy, tiny_run):
    config = run_copy / CONFIG_FILE
    info = json.loads(config.read_text())
    config.write_text(json.dumps({**info, "format_version": 99}))
    with pytest.raises(UsageError, match="upgrade"):
        load_checkpoint(run_copy)
    info["model"]["vocab_size"] += 1
    config.write_text(json.dumps(info))
    with pytest.raises(UsageError, match="another checkpoint"):
        load_checkpoint(run_copy)
    config.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_checkpoint(run_copy)


def test_weights_of_another_shape(run_copy):
    config = run_copy / CONFIG_FILE
    info = json.loads(config.read_text())
    info["model"]["num_layers"] += 1
    config.write_text(json.dumps(info))
    with pytest.raises(UsageError, match="does not fit"):
        load_checkpoint(run_copy)
