"""Bad configuration through `gpt train`: one clear line naming the setting and the fix, exit 2.

The cases run through the command's entry point in this process, one also as a new process (cli_helpers.gpt_many).

Every case runs against a folder of the user's files (configs, a text, an existing checkpoint),
which must be byte-identical afterwards; a run folder that a failed command would have made
must not exist.
"""

import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_clear_line, fingerprint, gpt_many

TOMLS = {
    "heads.toml": "[model]\nembed_dim = 30\nnum_heads = 4\n",
    "zero_layers.toml": "[model]\nnum_layers = 0\n",
    "negative_embed.toml": "[model]\nembed_dim = -32\n",
    "zero_context.toml": "[model]\nsequence_len = 0\n",
    "zero_batch.toml": "[train]\nbatch_size = 0\n",
    "negative_warmup.toml": "[train]\nwarmup_steps = -10\n",
    "nan_lr.toml": "[train]\nlearning_rate = nan\n",
    "beta.toml": "[train]\nbeta2 = 1.0\n",
    "dropout.toml": "[model]\ndropout = 1.5\n",
    "unknown_key.toml": "[model]\nembed_dims = 64\n",
    "unknown_section.toml": "[optimizer]\nlr = 0.1\n",
    "mistyped.toml": "[model]\nembed_dim = \"wide\"\n",
    "bool_for_int.toml": "[train]\nbatch_size = true\n",
    "not_toml.toml": "[model\nembed_dim = 64\n",
    "stride.toml": "[train]\neval_stride = 64\n",
    "arch.toml": "[model]\narch = \"gpt3\"\n",
    "layers.toml": "[model]\nnum_layers = 3\n",
    "huge_layers.toml": "[model]\nnum_layers = 1000000000\n",
    "huge_embed.toml": "[model]\nembed_dim = 1048576\nnum_heads = 1\n",
    "huge_context.toml": "[model]\nsequence_len = 1000000000\n",
    "huge_batch.toml": "[train]\nbatch_size = 1000000000\n",
    "huge_vocab.toml": "[train]\ntokenizer_vocab_size = 4000000000\n",
}

# name: (arguments after `gpt train`, words the error line must contain); {u} is the user's folder
CASES = {
    "unknown_preset": (["--preset", "huge"], ["unknown preset 'huge'", "tiny"]),
    "heads_do_not_divide": (["--config", "{u}/heads.toml"], ["embed_dim (30)", "divisible", "num_heads (4)"]),
    "zero_layers": (["--config", "{u}/zero_layers.toml"], ["model.num_layers", "positive", "got 0"]),
    "negative_embed": (["--config", "{u}/negative_embed.toml"], ["model.embed_dim", "got -32"]),
    "zero_context": (["--config", "{u}/zero_context.toml"], ["model.sequence_len"]),
    "zero_batch": (["--config", "{u}/zero_batch.toml"], ["train.batch_size", "positive"]),
    "negative_warmup": (["--config", "{u}/negative_warmup.toml"], ["train.warmup_steps", "zero or more"]),
    "nan_learning_rate": (["--config", "{u}/nan_lr.toml"], ["train.learning_rate", "finite"]),
    "beta_of_one": (["--config", "{u}/beta.toml"], ["train.beta2", "[0, 1)"]),
    "dropout_above_one": (["--config", "{u}/dropout.toml"], ["model.dropout"]),
    "unknown_toml_key": (["--config", "{u}/unknown_key.toml"], ["unknown key model.embed_dims", "embed_dim"]),
    "unknown_toml_section": (["--config", "{u}/unknown_section.toml"], ["[optimizer]", "[model] and [train]"]),
    "mistyped_value": (["--config", "{u}/mistyped.toml"], ["model.embed_dim must be a int", "'wide'"]),
    "bool_for_an_int": (["--config", "{u}/bool_for_int.toml"], ["train.batch_size must be a int"]),
    "broken_toml": (["--config", "{u}/not_toml.toml"], ["not valid TOML", "fix the file"]),
    "missing_config": (["--config", "{u}/missing.toml"], ["not found", "existing .toml"]),
    "stride_beyond_context": (["--config", "{u}/stride.toml", "--preset", "tiny"], ["eval_stride (64)", "(32)"]),
    "unknown_arch": (["--config", "{u}/arch.toml"], ["model.arch", "gpt1, gpt2"]),
    "max_time_words": (["--max-time", "ten minutes"], ["'ten minutes'", "30s, 10m or 2h"]),
    "max_time_negative": (["--max-time=-5m"], ["cannot read duration"]),
    "max_time_zero": (["--max-time", "0s"], ["longer than zero"]),
    "max_steps_zero": (["--max-steps", "0"], ["--max-steps must be positive"]),
    "max_steps_not_a_number": (["--max-steps", "many"], ["invalid int value: 'many'", "--help"]),
    "eval_interval_zero": (["--eval-interval", "0"], ["train.eval_interval"]),
    "negative_seed": (["--seed", "-1"], ["train.seed", "zero or more"]),
    "unknown_device": (["--device", "tpu"], ["--device", "'tpu'"]),
    "unknown_dtype": (["--dtype", "float8"], ["invalid choice: 'float8'"]),
    "unknown_flag": (["--epochs", "3"], ["unrecognized arguments: --epochs"]),
    "out_is_a_file": (["--out", "{u}/a_file"], ["is a file", "pass a folder"]),
    "out_under_a_file": (["--out", "{u}/a_file/run"], ["cannot write", "Not a directory", "writable --out"]),
    "new_run_into_a_trained_folder": (["--preset", "tiny", "--out", "{u}/run"],
                                      ["already holds a trained model", "--resume", "--overwrite"]),
    "resume_and_overwrite": (["--resume", "--overwrite", "--out", "{u}/run"], ["pass only one"]),
    "resume_without_checkpoint": (["--resume", "--out", "{u}/nowhere"], ["not found", "gpt train --out"]),
    "resume_without_state": (["--resume", "--out", "{u}/no_state"], ["no training state", "without --resume"]),
    "resume_another_shape": (["--resume", "--preset", "tiny", "--config", "{u}/layers.toml", "--out", "{u}/run"],
                             ["differs", "new --out"]),
    # absurd but valid sizes: refused by gpt.preflight's memory estimate before anything is allocated or written
    "huge_layers": (["--preset", "tiny", "--config", "{u}/huge_layers.toml"], ["GB of memory", "model.num_layers"]),
    "huge_embed": (["--preset", "tiny", "--config", "{u}/huge_embed.toml"], ["GB available", "model.embed_dim"]),
    "huge_context": (["--preset", "tiny", "--config", "{u}/huge_context.toml"], ["lower model.sequence_len"]),
    "huge_batch": (["--preset", "tiny", "--config", "{u}/huge_batch.toml"], ["lower train.batch_size"]),
    "huge_vocab": (["--preset", "tiny", "--config", "{u}/huge_vocab.toml"], ["lower train.tokenizer_vocab_size"]),
    "resume_finished_run": (["--resume", "--out", "{u}/run"], ["already reached its limit", "--max-steps"]),
}
if not torch.cuda.is_available():
    CASES["cuda_without_gpu"] = (["--device", "cuda", "--preset", "tiny"], ["no CUDA GPU", "--device cpu"])
if not torch.backends.mps.is_available():
    CASES["mps_without_apple_gpu"] = (["--device", "mps", "--preset", "tiny"], ["mps", "--device cpu"])
READ_ONLY = Path("/sys/kernel")  # sysfs refuses new folders even to root, whom chmod would not stop


def readonly_folder_refuses_writes() -> bool:
    try:
        (READ_ONLY / "gpt-run").mkdir()
    except OSError:
        return True
    (READ_ONLY / "gpt-run").rmdir()
    return False


if READ_ONLY.is_dir() and readonly_folder_refuses_writes():
    CASES["out_not_writable"] = (["--out", str(READ_ONLY / "gpt-run")], ["cannot write", "writable --out"])


@pytest.fixture(scope="module")
def outcome(tmp_path_factory, tiny_run, alice_text):
    user = tmp_path_factory.mktemp("bad_config")
    for name, text in TOMLS.items():
        (user / name).write_text(text)
    (user / "a_file").write_text("the user's notes\n")
    shutil.copytree(tiny_run, user / "run")
    (user / "no_state").mkdir()
    shutil.copy(tiny_run / "config.json", user / "no_state")
    before = fingerprint(user)
    commands = {}
    for name, (args, _) in CASES.items():
        args = [a.format(u=user) for a in args]
        out = [] if "--out" in args else ["--out", str(user / "runs" / name)]
        commands[name] = ["train", "--quiet", *args, *out]
    return user, before, gpt_many(commands, real="unknown_preset"), fingerprint(user)


@pytest.mark.parametrize("name", CASES)
def test_bad_config_fails_cleanly_and_touches_nothing(outcome, name):
    user, before, results, after = outcome
    assert_one_clear_line(results[name], *CASES[name][1])
    assert not (user / "runs" / name).exists()
    assert after == before
