"""Reading the book and other text: Gutenberg stripping, folders, bad input, offline behaviour."""

import os
from pathlib import Path

import pytest

import gpt.corpus
from gpt.config import UsageError
from gpt.corpus import ALICE_FILE, data_dir, load_documents, read_text_file, strip_gutenberg

SHARED = Path(os.environ.get("GPT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
BOOK = SHARED / ALICE_FILE


@pytest.fixture(scope="module")
def raw_book() -> str:
    if not BOOK.is_file():
        pytest.fail(f"the book is missing at {BOOK}; set GPT_DATA_DIR to the folder holding {ALICE_FILE}")
    return BOOK.read_text(encoding="utf-8")


@pytest.fixture
def shared_data(monkeypatch):
    monkeypatch.setenv("GPT_DATA_DIR", str(SHARED))
    return SHARED


# ------------------------------------------------------------------------------------------ the book


def test_strip_gutenberg_on_the_book(raw_book):
    text = strip_gutenberg(raw_book)
    assert len(text) == 144_600
    assert len(text.encode("utf-8")) == 151_095
    assert len(set(text)) == 75
    assert text.startswith("[Illustration]")
    assert text.endswith("THE END")
    assert "*** START OF" not in text and "*** END OF" not in text
    assert "Project Gutenberg" not in text


def test_strip_gutenberg_synthetic():
    text = (
        "licence\nmore licence\n*** START OF THE BOOK ***\n\n  Body line 1\nBody line 2\n\n"
        "*** END OF THE BOOK ***\nfooter"
    )
    assert strip_gutenberg(text) == "Body line 1\nBody line 2"


def test_strip_gutenberg_without_markers_only_strips_whitespace():
    assert strip_gutenberg("  just text\nno markers \n") == "just text\nno markers"
    # an END before the START is not a valid frame
    assert strip_gutenberg("*** END OF x\nbody\n*** START OF x") == "*** END OF x\nbody\n*** START OF x"


def test_load_documents_default_is_alice(shared_data, raw_book):
    documents = load_documents()
    assert documents == [strip_gutenberg(raw_book)]
    assert len(documents[0]) == 144_600


def test_load_documents_alice_by_name(shared_data):
    assert load_documents("alice") == load_documents()
    assert len(load_documents("alice")[0]) == 144_600


def test_data_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path


def test_data_dir_default_under_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("GPT_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data_dir() == tmp_path / "wonderland-gpt"


# ----------------------------------------------------------------------------------- files and folders


def test_single_file(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("Hello, world.\nSecond line “quoted” ✓\n", encoding="utf-8")
    assert load_documents(path) == ["Hello, world.\nSecond line “quoted” ✓\n"]
    assert load_documents(str(path)) == ["Hello, world.\nSecond line “quoted” ✓\n"]


def test_single_file_crlf_is_normalised(tmp_path):
    path = tmp_path / "dos.txt"
    path.write_bytes(b"line one\r\nline two\r\n")
    assert load_documents(path) == ["line one\nline two\n"]


def test_folder_sorted_and_empty_dropped(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "c.txt").write_text("", encoding="utf-8")
    (tmp_path / "d.txt").write_text("  \n\t\n", encoding="utf-8")
    (tmp_path / "e.txt").write_text("third", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not a txt file", encoding="utf-8")
    assert load_documents(tmp_path) == ["first", "second", "third"]


def test_folder_includes_subfolders(tmp_path):
    (tmp_path / "z.txt").write_text("top", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("nested", encoding="utf-8")
    documents = load_documents(tmp_path)
    assert sorted(documents) == ["nested", "top"]


def test_missing_path(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(UsageError) as info:
        load_documents(missing)
    assert "missing.txt" in str(info.value)
    assert "does not exist" in str(info.value)


def test_folder_without_txt(tmp_path):
    (tmp_path / "readme.md").write_text("hello", encoding="utf-8")
    with pytest.raises(UsageError) as info:
        load_documents(tmp_path)
    assert ".txt" in str(info.value)


def test_empty_folder(tmp_path):
    with pytest.raises(UsageError, match=r"\.txt"):
        load_documents(tmp_path)


@pytest.mark.parametrize("content", ["", " ", "\n\n\t  \r\n"])
def test_empty_or_whitespace_file(tmp_path, content):
    path = tmp_path / "blank.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError) as info:
        load_documents(path)
    assert "no text" in str(info.value)


def test_folder_of_only_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UsageError, match="no text"):
        load_documents(tmp_path)


def test_binary_file(tmp_path):
    path = tmp_path / "model.txt"
    path.write_bytes(b"text\x00\x01\x02more")
    with pytest.raises(UsageError) as info:
        load_documents(path)
    assert "binary" in str(info.value)
    assert "model.txt" in str(info.value)


def test_binary_file_in_folder(tmp_path):
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"\x00\x00")
    with pytest.raises(UsageError, match="binary"):
        load_documents(tmp_path)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(UsageError) as info:
        load_documents(path)
    message = str(info.value)
    assert "UTF-8" in message
    assert "latin1.txt" in message
    assert "byte 3" in message  # where the bad byte is


def test_read_text_file_valid(tmp_path):
    path = tmp_path / "u.txt"
    path.write_text("中文 😀 e\u0301", encoding="utf-8")
    assert read_text_file(path) == "中文 😀 e\u0301"


# --------------------------------------------------------------------------------------------- offline


def test_offline_without_cached_book(monkeypatch, tmp_path):
    empty = tmp_path / "cache"
    empty.mkdir()
    monkeypatch.setenv("GPT_DATA_DIR", str(empty))
    monkeypatch.setattr(gpt.corpus, "ALICE_URLS", ("http://127.0.0.1:9/nothing",))
    with pytest.raises(UsageError) as info:
        load_documents()
    message = str(info.value)
    assert "GPT_DATA_DIR" in message
    assert "--data" in message
    assert str(empty / ALICE_FILE) in message
    assert "127.0.0.1:9" in message
    assert list(empty.iterdir()) == []


def test_offline_named_alice(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(gpt.corpus, "ALICE_URLS", ("http://127.0.0.1:9/nothing",))
    with pytest.raises(UsageError, match="GPT_DATA_DIR"):
        load_documents("alice")
    assert list(tmp_path.iterdir()) == []


def test_cached_book_is_used_without_download(monkeypatch, tmp_path):
    (tmp_path / ALICE_FILE).write_text(
        "header\n*** START OF THIS EBOOK ***\nA short cached book.\n*** END OF THIS EBOOK ***\nfooter\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("GPT_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(gpt.corpus, "ALICE_URLS", ("http://127.0.0.1:9/nothing",))
    assert load_documents() == ["A short cached book."]
