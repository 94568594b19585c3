"""Text sources: the default book ("alice"), one UTF-8 file, or a folder of .txt files.

A corpus is a list of documents (strings), split into training and validation text by characters
(`split_documents`). Alice is downloaded once from Project Gutenberg into a cache folder and stripped
of the Gutenberg licence header and footer, so that what we train and score on is the book itself.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from gpt.config import UsageError

ALICE = "alice"
ALICE_FILE = "alice_in_wonderland.txt"
ALICE_URLS = (
    "https://www.gutenberg.org/files/11/11-0.txt",
    "https://www.gutenberg.org/cache/epub/11/pg11.txt",
)
# sha256 of the edition the project's reference figures were measured on (Gutenberg #11, Oct 2020 update).
ALICE_SHA256 = "8bc3b3e0e78abf4109c5d763bedffcd2b4acc8648298596d9f32fd541956713e"


def data_dir() -> Path:
    """Where downloaded text is cached: $GPT_DATA_DIR, else ~/.cache/wonderland-gpt."""
    if os.environ.get("GPT_DATA_DIR"):
        return Path(os.environ["GPT_DATA_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "wonderland-gpt"


def strip_gutenberg(text: str) -> str:
    """The book is what lies strictly between the '*** START OF' and '*** END OF' lines."""
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith("*** START OF")), None)
    end = next((i for i, line in enumerate(lines) if line.startswith("*** END OF")), None)
    if start is None or end is None or end <= start:
        return text.strip()
    return "\n".join(lines[start + 1 : end]).strip()


def _download(destination: Path) -> None:
    errors = []
    for url in ALICE_URLS:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                payload = response.read()
            break
        except (urllib.error.URLError, OSError) as err:
            errors.append(f"{url}: {getattr(err, 'reason', err)}")
    else:
        raise UsageError(
            f"could not download Alice from Project Gutenberg ({'; '.join(errors)}); connect to the internet, "
            f"or save the Gutenberg #11 text as {destination} (GPT_DATA_DIR sets the folder), or pass --data FILE"
        )
    if hashlib.sha256(payload).hexdigest() != ALICE_SHA256:
        print(f"note: the downloaded Alice differs from the reference edition (sha256 {ALICE_SHA256[:8]}...); "
              "validation figures may not match docs/", file=sys.stderr)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_suffix(".part")
    temporary.write_bytes(payload)
    os.replace(temporary, destination)


def alice_text() -> str:
    """The stripped book, downloaded into the cache on first use."""
    path = data_dir() / ALICE_FILE
    if not path.is_file():
        _download(path)
    return strip_gutenberg(read_text_file(path))


def read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise UsageError(f"{path} looks like a binary file (it contains NUL bytes); pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(
            f"{path} is not valid UTF-8 (byte {err.start}: {err.reason}); convert it, e.g. iconv -t UTF-8"
        ) from None
    return text.replace("\r\n", "\n")


def text_files(path: Path) -> list[Path]:
    """The files of a corpus: the file itself, or a folder's .txt files (recursively, in sorted order)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UsageError(f"folder {path} has no .txt files; add some or pass a single text file")
        return files
    if path.is_file():
        return [path]
    if path.exists():
        raise UsageError(f"{path} is not a regular file or folder; pass a text file or a folder of .txt files")
    raise UsageError(f"{path} does not exist; pass an existing text file or folder")


def load_documents(source: str | Path | None = None) -> list[str]:
    """Documents of a corpus: None or "alice" for the book, a text file, or a folder of .txt files."""
    if source is None or str(source) == ALICE:
        return [alice_text()]
    path = Path(source).expanduser()
    documents = [read_text_file(p) for p in text_files(path)]
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise UsageError(f"{path} holds no text (empty or only whitespace); pass a file with text in it")
    return documents


def split_documents(documents: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Cut the concatenated corpus at int((1 - val_fraction) * characters)."""
    total = sum(len(d) for d in documents)
    cut = int((1.0 - val_fraction) * total)
    train, val, seen = [], [], 0
    for doc in documents:
        head = doc[: max(0, cut - seen)]
        tail = doc[len(head) :]
        train += [head] if head else []
        val += [tail] if tail else []
        seen += len(doc)
    return train, val
