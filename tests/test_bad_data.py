"""Bad training data through `gpt train`: one clear line, exit 2, no file of the user's touched.

The cases run through the command's entry point in this process, one also as a new process (cli_helpers.gpt_many).

Decisions recorded here: invalid UTF-8 is refused (with the byte offset and a fix), not decoded
with replacement characters, because a model trained on U+FFFD noise is worse than a clear stop.
A vocabulary beyond 65,536 ids and a very long line with no line break are documented successes.
"""

import shutil

import numpy as np
import pytest
from cli_helpers import assert_one_clear_line, fingerprint, gpt, gpt_in_process, gpt_many

from gpt.corpus import load_documents
from gpt.dataset import encode_documents, write_tokens
from gpt.tokenizer import decode, encode, text_chunks, train_tokenizer

LATIN1 = "caf\xe9 au lait, cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 40

# name: (files to create {relative path: bytes}, --data argument, words the error line must contain)
CASES = {
    "missing_path": ({}, "missing.txt", ["does not exist", "pass an existing"]),
    "folder_without_txt": ({"notes/readme.md": b"# not a .txt\n"}, "notes", ["no .txt files", "add some"]),
    "empty_folder": ({"hollow/.keep": b""}, "hollow", ["no .txt files"]),
    "empty_file": ({"empty.txt": b""}, "empty.txt", ["holds no text", "pass a file with text"]),
    "whitespace_only": ({"spaces.txt": b"  \n\t\r\n   \n"}, "spaces.txt", ["holds no text"]),
    "folder_of_empty_files": ({"blank/a.txt": b"", "blank/b.txt": b"\n\n"}, "blank", ["holds no text"]),
    "binary_file": ({"image.txt": bytes(range(256)) * 8}, "image.txt", ["binary", "NUL", "UTF-8 text file"]),
    "invalid_utf8": ({"latin1.txt": LATIN1}, "latin1.txt", ["not valid UTF-8", "byte 3", "iconv"]),
    "invalid_utf8_in_folder": ({"mixed/good.txt": b"Good text. " * 200, "mixed/bad.txt": LATIN1}, "mixed",
                               ["bad.txt", "not valid UTF-8"]),
    "device_not_file": ({}, "/dev/null", ["not a regular file"]),
    "shorter_than_a_window": ({"short.txt": b"Too short to train on, by far."}, "short.txt",
                              ["fewer than one window", "use more text"]),
    "too_short_to_split": ({"one.txt": b"x"}, "one.txt", ["too few to split", "longer text"]),
}
INTO_EXISTING_RUN = ("folder_without_txt", "empty_file", "binary_file", "invalid_utf8", "shorter_than_a_window")


@pytest.fixture(scope="module")
def outcome(tmp_path_factory, tiny_run):
    """Every case run side by side; the user's files are hashed before and after."""
    root = tmp_path_factory.mktemp("bad_data")
    for files, _, _ in CASES.values():
        for relative, payload in files.items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_bytes(payload)
    existing = root / "existing_run"
    shutil.copytree(tiny_run, existing)
    before = fingerprint(root)
    commands = {}
    for name, (_, data, _) in CASES.items():
        data = data if data.startswith("/") else str(root / data)
        commands[name] = ["train", "--preset", "tiny", "--max-steps", "2", "--data", data, "--out",
                          str(root / "runs" / name)]
        if name in INTO_EXISTING_RUN:
            commands[name + "_into_existing_run"] = commands[name][:-1] + [str(existing), "--overwrite"]
    return root, before, gpt_many(commands, real="missing_path"), fingerprint(root)


@pytest.mark.parametrize("name", CASES)
def test_bad_data_fails_cleanly_and_touches_nothing(outcome, name):
    root, before, results, after = outcome
    words = CASES[name][2]
    assert_one_clear_line(results[name], *words)
    if name in INTO_EXISTING_RUN:  # the same refusal when --overwrite may replace a checkpoint, which stays as it was
        assert_one_clear_line(results[name + "_into_existing_run"], *words)
    assert not (root / "runs" / name).exists()  # a folder made for the run is removed again
    assert after == before  # every input file and the existing checkpoint are byte-identical


def test_eval_refuses_bad_text_without_touching_the_checkpoint(tiny_run, tmp_path):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    before = fingerprint(tiny_run, binary)
    assert_one_clear_line(gpt_in_process("eval", "--checkpoint", str(tiny_run), "--text", str(binary)), "binary")
    assert fingerprint(tiny_run, binary) == before


def test_debug_shows_the_traceback(tmp_path):
    result = gpt("--debug", "train", "--data", str(tmp_path / "missing.txt"), cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "does not exist" in result.stderr


# ------------------------------------------------------------------------------ documented successes


def test_long_line_is_encoded_in_pieces_with_the_same_ids(alice_text):
    """A text with no line breaks is tokenized piece by piece, to the very ids of the whole."""
    line = alice_text.replace("\n", " ")
    tokenizer = train_tokenizer([line], vocab_size=320)
    pieces = list(text_chunks(line, size=10_000))
    assert len(pieces) > 10 and "".join(pieces) == line
    assert [i for piece in pieces for i in encode(tokenizer, piece)] == encode(tokenizer, line)
    no_spaces = "ab" * 20_000
    chunked = [i for piece in text_chunks(no_spaces, size=1000) for i in encode(tokenizer, piece)]
    assert decode(tokenizer, chunked) == no_spaces  # cut without a space: still lossless


@pytest.mark.slow
def test_a_10_mb_single_line_trains(tmp_path, alice_text):
    """No line break in 10 MB: encoded piece by piece, it trains (the 50 MB figures are in docs/bad-input.md)."""
    line = alice_text.replace("\n", " ")
    text = (line * (10_000_000 // len(line) + 1))[:10_000_000]
    data, config = tmp_path / "one_line.txt", tmp_path / "small_val.toml"
    data.write_text(text)
    config.write_text("[train]\nval_fraction = 0.002\n")
    assert load_documents(data) == [text]
    before = fingerprint(data)
    result = gpt_in_process("train", "--preset", "tiny", "--config", str(config), "--max-steps", "2", "--data",
                            str(data), "--out", str(tmp_path / "run"), "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.fromfile(tmp_path / "run" / "data" / "train.bin", dtype=np.uint16).size > 5_000_000
    assert fingerprint(data) == before


def test_a_vocabulary_beyond_16_bits_is_stored_in_32_bits(tmp_path):
    """70,000 ids do not fit uint16: the token files switch to uint32 and training works end to end."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 8)) for _ in range(40_000)]
    data = tmp_path / "words.txt"
    data.write_text(" ".join(words + words))
    tokenizer = train_tokenizer([data.read_text()], vocab_size=70_000)
    assert tokenizer.get_vocab_size() == 70_000
    ids = encode_documents(tokenizer, [data.read_text()])
    assert ids.dtype == np.uint32 and ids.max() > 2**16
    stored = write_tokens(tmp_path / "ids.bin", ids)
    assert np.array_equal(stored, ids) and decode(tokenizer, stored[1:].tolist()) == data.read_text()
    config = tmp_path / "big_vocab.toml"
    config.write_text("[train]\ntokenizer_vocab_size = 70000\neval_stride = 32\nval_fraction = 0.01\n")
    out = tmp_path / "run"
    result = gpt_in_process("train", "--preset", "tiny", "--config", str(config), "--max-steps", "2", "--data",
                            str(data), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.fromfile(out / "data" / "train.bin", dtype=np.uint32).max() >= 2**16
    sample = tmp_path / "sample.txt"
    sample.write_text(" ".join(words[:50]))
    scored = gpt_in_process("eval", "--checkpoint", str(out), "--text", str(sample), "--json")
    assert scored.returncode == 0, scored.stderr[-2000:]
