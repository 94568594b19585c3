"""The `gpt` command as a user runs it: real checkpoints, real subprocesses where the process itself matters
(starting, training, the terminal), the command's entry point in this process for the rest.

Bad data, configuration and checkpoints have their own modules: tests/test_bad_*.py.
"""

import json
import os
import sys

import pytest
from cli_helpers import assert_one_clear_line, gpt, gpt_in_process


def test_train_generate_eval_end_to_end(tmp_path):
    out = tmp_path / "runs" / "t"
    trained = gpt("train", "--preset", "tiny", "--max-time", "6s", "--out", str(out))
    assert trained.returncode == 0, trained.stderr
    assert "unigram" in trained.stderr and "done" in trained.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file()
    first = gpt("generate", "--checkpoint", str(out), "Alice was", "--max-new-tokens", "30", "--seed", "1")
    second = gpt_in_process("generate", "--checkpoint", str(out), "Alice was", "--max-new-tokens", "30", "--seed", "1")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("Alice was") and len(first.stdout) > len("Alice was\n")
    assert first.stdout == second.stdout
    samples = gpt_in_process("generate", "--checkpoint", str(out), "The", "--num-samples", "3", "--seed", "2",
                             "--max-new-tokens", "10")
    assert samples.returncode == 0 and samples.stdout.count("--- sample") == 3
    text = tmp_path / "other.txt"
    text.write_text("Curiouser and curiouser! cried Alice.\n" * 20)
    scored = gpt_in_process("eval", "--checkpoint", str(out), "--text", str(text), "--json")
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert set(report) == {"loss", "perplexity", "bits_per_char", "bits_per_byte", "tokens", "chars",
                           "memory_positions"}
    assert report["chars"] == len(text.read_text()) and report["memory_positions"] == 0  # tiny: no memory
    adapted = gpt_in_process("eval", "--checkpoint", str(out), "--text", str(text), "--json", "--adapt")
    adapted_report = json.loads(adapted.stdout)
    assert adapted_report["adapt_lr"] > 0 and adapted_report["tokens"] == report["tokens"]
    assert adapted_report["bits_per_char"] < report["bits_per_char"]  # a text that repeats itself: learnt as read
    default = gpt_in_process("eval", "--checkpoint", str(out))
    assert default.returncode == 0 and "validation split" in default.stdout and "bits/char" in default.stdout


def test_python_dash_m_and_help():
    result = gpt("--help")
    assert result.returncode == 0 and "train" in result.stdout and "generate" in result.stdout


def test_invalid_sampling_value_from_the_shell(tiny_run):
    """The real command exits 2 with one line (test_bad_generation covers every value, in-process)."""
    assert_one_clear_line(gpt("generate", "--checkpoint", str(tiny_run), "Alice", "--top-p", "1.5"), "top-p")


def test_eval_rejects_a_bad_stride_or_adaptation_rate(tiny_run):
    assert_one_clear_line(gpt_in_process("eval", "--checkpoint", str(tiny_run), "--stride", "0"), "stride")
    assert_one_clear_line(gpt_in_process("eval", "--checkpoint", str(tiny_run), "--adapt", "-1"), "learning rate")


def test_generate_with_stop_strings_and_filters(tiny_run):
    greedy = ("generate", "--checkpoint", str(tiny_run), "Alice", "--temperature", "0", "--max-new-tokens", "40")
    free = gpt_in_process(*greedy)
    continuation = free.stdout[len("Alice"):-1]
    stop = continuation[8:11]
    cut = gpt_in_process(*greedy, "--stop", stop, "--stop", "zzzz", "--min-p", "0.05", "--repetition-penalty", "1.0")
    assert cut.returncode == 0, cut.stderr
    assert cut.stdout == "Alice" + continuation[: continuation.index(stop)] + "\n"


@pytest.mark.slow
def test_interactive_mode_in_a_terminal(tiny_run):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "gpt", "generate", "--checkpoint", str(tiny_run), "--interactive",
                                           "--max-new-tokens", "100000", "--temperature", "1.5", "--seed", "0"],
                          env=dict(os.environ), encoding="utf-8", timeout=60)
    child.expect("Ctrl-D exits")
    child.expect("> ")
    child.sendline("Alice said")
    child.expect("Alice said")  # the echo of the typed line
    child.expect("Alice said")  # the streamed continuation starts with the prompt
    child.expect(r"\S{3}")  # generated text is arriving
    child.sendintr()  # Ctrl-C stops this continuation, not the program
    child.expect(r"\[stopped\]")
    child.expect("> ")
    child.send("\x1b[A")  # up arrow: readline history brings the last prompt back
    child.expect("Alice said")
    child.sendline("")
    child.expect(r"\S{3}")
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect("> ")
    child.sendeof()  # Ctrl-D exits cleanly
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("flags, compiled, dtype", [([], None, "auto"), (["--compile"], True, "auto"),
                                                     (["--no-compile", "--dtype", "float32"], False, "float32")])
def test_train_flags_for_compile_and_precision(flags, compiled, dtype):
    from gpt.cli import build_parser, train_configs

    _, train_config = train_configs(build_parser().parse_args(["train", *flags]))
    assert (train_config.compile, train_config.dtype) == (compiled, dtype)
