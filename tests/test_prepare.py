"""gpt prepare: blocks cut where the tokenizer splits anyway, so shards hold exactly the ids gpt train would
make from the text; shards read as one stream; gpt train and gpt eval run on them."""

import json

import numpy as np
import pytest

from gpt.cli import main
from gpt.corpus import load_documents, split_documents
from gpt.dataset import AffinePermutation, encode_documents
from gpt.prepare import BOUNDARY, TokenStream, blocks_of, load_prepared, prepare
from gpt.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, alice_text):
    """Alice in three files (one with Windows line ends), a whitespace-only file and a file in a subfolder."""
    folder = tmp_path_factory.mktemp("corpus")
    third = len(alice_text) // 3
    (folder / "a.txt").write_text(alice_text[:third])
    (folder / "b.txt").write_bytes(alice_text[third : 2 * third].replace("\n", "\r\n").encode())
    (folder / "blank.txt").write_text("  \n\n ")
    (folder / "sub").mkdir()
    (folder / "sub" / "c.txt").write_text(alice_text[2 * third :] + "\n🐇 白兔 é\n")
    return folder


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare(corpus, out, vocab_size=512, workers=2, block_bytes=4096, shard_tokens=20_000)
    return out


def test_blocks_end_where_the_tokenizer_splits(corpus):
    path = corpus / "a.txt"
    blocks = list(blocks_of(path, 1000))
    data = path.read_bytes()
    assert len(blocks) > 20 and blocks[0].start == 0 and blocks[-1].end == len(data)
    assert all(a.end == b.start for a, b in zip(blocks, blocks[1:])) and blocks[0].first and not blocks[1].first
    assert all(BOUNDARY.match(data, b.end - 1) for b in blocks[:-1])
    assert len(list(blocks_of(path, 1 << 30))) == 1


def test_shards_hold_exactly_the_ids_of_the_text_path(corpus, prepared):
    train_docs, val_docs = split_documents(load_documents(corpus), 0.1)
    tokenizer, splits, manifest = load_prepared(prepared)
    assert tokenizer.to_str() == train_tokenizer(train_docs, 512).to_str()  # the same BPE as gpt train's
    assert np.array_equal(splits.train[: len(splits.train)], encode_documents(tokenizer, train_docs))
    assert np.array_equal(np.asarray(splits.val), encode_documents(tokenizer, val_docs))
    assert sum(1 for s in manifest["shards"] if s["split"] == "train") > 1  # several shards, read as one
    assert manifest["files"] == 3 and manifest["characters"]["val"] == splits.val_chars == sum(map(len, val_docs))
    assert splits.val_bytes == sum(len(d.encode()) for d in val_docs)


def test_token_stream_indexes_across_shards(tmp_path):
    parts = [np.arange(0, 7, dtype=np.uint16), np.arange(7, 10, dtype=np.uint16), np.arange(10, 20, dtype=np.uint16)]
    for i, part in enumerate(parts):
        part.tofile(tmp_path / f"{i}.bin")
    stream = TokenStream([tmp_path / f"{i}.bin" for i in range(3)], np.dtype(np.uint16))
    assert len(stream) == 20
    index = np.array([[5, 6, 7, 8], [9, 10, 11, 12], [0, 19, 3, 7]])
    assert np.array_equal(stream[index], index) and np.array_equal(stream[4:15], np.arange(4, 15))


def test_affine_permutation_visits_every_window_once():
    for n in (1, 2, 97, 1000, 4096):
        permutation = AffinePermutation(n, np.random.default_rng(n))
        assert sorted(permutation[i] for i in range(n)) == list(range(n))


def test_train_and_eval_on_prepared_shards(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(prepared), "--preset", "tiny", "--max-steps", "20", "--out", str(out),
                 "--quiet"]) == 0
    info = json.loads((out / "config.json").read_text())
    assert info["data"] == str(prepared.resolve()) and not (out / "data").exists()
    assert main(["eval", "--checkpoint", str(out), "--json"]) == 0
    score = json.loads(capsys.readouterr().out)
    assert score["chars"] == load_prepared(prepared)[1].val_chars and 0 < score["bits_per_char"] < 10


def test_prepare_command_and_bad_input(corpus, tmp_path, capsys):
    assert main(["prepare", "--data", str(corpus / "a.txt"), "--out", str(tmp_path / "p"), "--vocab-size", "300",
                 "--workers", "1"]) == 0
    assert "gpt train --data" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_bytes(b"fine text\n\xff\xfe broken")
    assert main(["prepare", "--data", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "q")]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "q"), "--out", str(tmp_path / "r")]) == 2
