"""Bad or unusual generation input through the real CLI: a clear error, or a documented success.

Documented successes: an empty prompt starts a new text; a prompt longer than the context keeps its
last tokens; characters never seen in training are encoded as bytes; --max-new-tokens 0 prints the
prompt; a huge --max-new-tokens streams until end of text or Ctrl-C. The checkpoint is never changed.
"""

import hashlib
import os
import signal
import subprocess
import sys

import pytest
from cli_helpers import gpt_in_process


def gpt(*args: str) -> tuple[int, str, str]:
    """The CLI's main() in this process (no interpreter start-up per case): exit code, stdout, stderr."""
    result = gpt_in_process(*args)
    return result.returncode, result.stdout, result.stderr


def folder_hash(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    before = folder_hash(tiny_run)
    yield str(tiny_run)
    assert folder_hash(tiny_run) == before  # generation never writes to the checkpoint


@pytest.mark.parametrize("args, words", [
    (["--temperature", "-1"], ["temperature", ">= 0"]),
    (["--temperature", "nan"], ["temperature"]),
    (["--top-p", "0"], ["top-p", "(0, 1]"]),
    (["--top-p", "1.5"], ["top-p", "(0, 1]"]),
    (["--temperature", "hot"], ["invalid float"]),
    (["--top-k", "-3"], ["top-k"]),
    (["--min-p", "1.5"], ["min-p", "[0, 1]"]),
    (["--min-p", "-0.1"], ["min-p"]),
    (["--repetition-penalty", "0"], ["repetition penalty", "> 0"]),
    (["--repetition-penalty", "inf"], ["repetition penalty"]),
    (["--max-new-tokens", "-5"], ["--max-new-tokens", ">= 0"]),
    (["--max-new-tokens", "lots"], ["invalid int"]),
    (["--num-samples", "-2"], ["--num-samples"]),
    (["--top-k", "2.5"], ["invalid int"]),
])
def test_invalid_sampling_values_are_one_clear_line(checkpoint, args, words):
    code, out, err = gpt("generate", "--checkpoint", checkpoint, "Alice", *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt: error: ") and "Traceback" not in err
    assert all(word in lines[0] for word in words), lines[0]


@pytest.mark.parametrize("prompt", [
    "",  # a new text
    "Alice " * 400,  # far longer than the context
    "Ωmega ≈ 🦄 日本語 \u200b\ttab",  # characters the book never uses
    "<|endoftext|>[PAD]",  # special-token names are plain text
])
def test_unusual_prompts_are_continued(checkpoint, prompt):
    code, out, err = gpt("generate", "--checkpoint", checkpoint, prompt, "--max-new-tokens", "20",
                         "--seed", "0")
    assert code == 0 and err == "", err
    assert out.startswith(prompt) and len(out) > len(prompt)


def test_zero_new_tokens_prints_the_prompt(checkpoint):
    assert gpt("generate", "--checkpoint", checkpoint, "Alice", "--max-new-tokens", "0") == (0, "Alice\n", "")


@pytest.mark.slow
def test_huge_max_new_tokens_streams_until_interrupted(checkpoint):
    """Greedy decoding of the briefly trained test model never picks end-of-text: the text only ends by Ctrl-C."""
    command = [sys.executable, "-m", "gpt", "generate", "--checkpoint", checkpoint, "Alice",
               "--max-new-tokens", str(10**15), "--temperature", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
    first = process.stdout.read(3000)  # text arrives as it is generated, not at the end
    assert process.poll() is None
    process.send_signal(signal.SIGINT)
    rest, err = process.communicate(timeout=60)
    assert first.startswith("Alice") and len(first) == 3000
    assert process.returncode == 130 and "Traceback" not in err


def test_undecodable_prompt_bytes_are_one_clear_line(checkpoint):
    """argv bytes that are not UTF-8 reach Python as lone surrogates: refused before anything is printed."""
    command = [sys.executable.encode(), b"-m", b"gpt", b"generate", b"--checkpoint", checkpoint.encode(),
               b"Alice \xff was", b"--max-new-tokens", b"5"]
    result = subprocess.run(command, capture_output=True, env=os.environ, timeout=180)
    assert result.returncode == 2 and result.stdout == b""
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt: error: ") and "not valid UTF-8" in lines[0]


def test_interactive_mode_reports_an_undecodable_line_and_goes_on(checkpoint):
    command = [sys.executable, "-m", "gpt", "generate", "--checkpoint", checkpoint, "--interactive",
               "--max-new-tokens", "5", "--seed", "1"]
    result = subprocess.run(command, input=b"Alice \xff\nAlice\n", capture_output=True, env=os.environ, timeout=180)
    err = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in err
    assert err.count("gpt: error:") == 1 and "not valid UTF-8" in err
    assert "Alice" in result.stdout.decode()  # the next prompt was continued
