"""A large corpus, tokenized once: `gpt prepare --data FOLDER --out DATADIR`, then `gpt train --data DATADIR`.

Files are read in blocks of a few MB (memory stays bounded whatever the corpus size), each cut just
after a newline that sits between two visible ASCII characters: the byte-level pre-tokenizer always
splits there (and the newline is a pre-token of its own either way), so encoding the blocks separately
gives exactly the ids of encoding whole files. A pool of worker
processes encodes the blocks; the ids go, in order, into uint16 (or uint32) shard files, described by
manifest.json. The split rule is the one `gpt train` uses on text: the first 90% of the characters
train, the rest validate, each file a document that starts with the end-of-text token.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from gpt.checkpoint import write_text
from gpt.config import UsageError
from gpt.corpus import text_files
from gpt.dataset import TokenSplits, token_dtype
from gpt.preflight import check_disk
from gpt.tokenizer import EOT, encode, load_tokenizer, save_tokenizer, special_id, train_tokenizer

MANIFEST = "manifest.json"
BLOCK_BYTES = 4 << 20
SAMPLE_CHARS = 1 << 20  # text encoded up front to estimate the shards' size
SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard
BOUNDARY = re.compile(rb"(?<=[!-~])\n(?=[!-~])")  # visible ASCII, newline | visible ASCII


@dataclass(frozen=True)
class Block:
    path: str
    start: int  # byte range of the file
    end: int
    first: bool  # the file's first block: its document starts here


def blocks_of(path: Path, size: int = BLOCK_BYTES) -> Iterator[Block]:
    """Byte ranges of about `size`, each ending at a safe boundary (a file without one is one block)."""
    with open(path, "rb") as handle:
        start, buffer, first = 0, b"", True
        while True:
            piece = handle.read(size)
            buffer += piece
            at_end = len(piece) < size
            if at_end:
                end = len(buffer)
            else:  # the last boundary in what was just read (a boundary needs the byte after the newline)
                cuts = [m.end() for m in BOUNDARY.finditer(buffer, max(0, len(buffer) - len(piece) - 1))]
                end = cuts[-1] if cuts else 0
            if end:
                yield Block(str(path), start, start + end, first)
                start, buffer, first = start + end, buffer[end:], False
            if at_end:
                return


def read_block(block: Block) -> str:
    with open(block.path, "rb") as handle:
        handle.seek(block.start)
        raw = handle.read(block.end - block.start)
    if b"\x00" in raw:
        raise UsageError(f"{block.path} looks like a binary file (it contains NUL bytes); remove it from the folder")
    try:
        return raw.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as err:
        raise UsageError(f"{block.path} is not valid UTF-8 (byte {block.start + err.start}: {err.reason}); "
                         "convert it, e.g. iconv -t UTF-8") from None


def _measure(block: Block) -> tuple[int, bool]:
    text = read_block(block)
    return len(text), not text.isspace() and bool(text)


_tokenizer: Tokenizer | None = None


def _load_worker_tokenizer(tokenizer_json: str) -> None:
    global _tokenizer
    _tokenizer = Tokenizer.from_str(tokenizer_json)
    _tokenizer.encode_special_tokens = True


def _encode(job: tuple[Block, int | None, bool, bool]) -> list[tuple[str, np.ndarray]]:
    """A block's ids as (split, ids) pieces; `cut` is where validation starts inside the block, if it does."""
    block, cut, in_val, starts_document = job
    text = read_block(block)
    eot = special_id(_tokenizer, EOT)
    dtype = token_dtype(_tokenizer.get_vocab_size())
    if cut is None:
        parts = [("val" if in_val else "train", text, starts_document)]
    else:  # the validation text is a document of its own, as in gpt.dataset.split_documents
        parts = [("train", text[:cut], starts_document), ("val", text[cut:], True)]
    return [(part, np.array(([eot] if starts else []) + encode(_tokenizer, piece), dtype=dtype))
            for part, piece, starts in parts]


class ShardWriter:
    """Appends ids to numbered shard files of one split, each written to a temporary name first."""

    def __init__(self, folder: Path, part: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.part, self.dtype, self.shard_tokens = folder, part, dtype, shard_tokens
        self.shards: list[dict] = []
        self.handle, self.count = None, 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.handle is None or self.count >= self.shard_tokens:
                self._open()
            room = self.shard_tokens - self.count
            ids[:room].tofile(self.handle)
            self.count += len(ids[:room])
            ids = ids[room:]

    def _open(self) -> None:
        self.close()
        name = f"{self.part}_{len(self.shards):03d}.bin"
        self.handle, self.count = open(self.folder / f".{name}.tmp", "wb"), 0
        self.shards.append({"file": name, "split": self.part, "tokens": 0})

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.shards[-1]["tokens"] = self.count
            name = self.shards[-1]["file"]
            os.replace(self.folder / f".{name}.tmp", self.folder / name)
            self.handle = None


@contextlib.contextmanager
def worker_pool(workers: int, initializer=None, initargs: tuple = ()):
    """Processes forked where possible (they start in milliseconds instead of importing torch again).

    TOKENIZERS_PARALLELISM=false while forking: each worker encodes one block at a time, and the
    variable keeps tokenizers from warning about a fork after the parent trained with threads.
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = context.Pool(workers, initializer, initargs)
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    with pool:
        yield pool


def prepare(source: str | Path, out: str | Path, vocab_size: int = 2048, val_fraction: float = 0.1,
            tokenizer_file: str | Path | None = None, workers: int | None = None, block_bytes: int = BLOCK_BYTES,
            shard_tokens: int = SHARD_TOKENS) -> dict:
    """Tokenize a text file or folder of .txt files into shards; returns the manifest."""
    out = Path(out)
    files = text_files(Path(source).expanduser())
    blocks = [b for path in files for b in blocks_of(path, block_bytes)]
    workers = workers or os.cpu_count() or 1
    with worker_pool(workers) as pool:
        sizes = pool.map(_measure, blocks, chunksize=4)
    has_text: dict[str, bool] = {}
    for block, (_, text) in zip(blocks, sizes):
        has_text[block.path] = has_text.get(block.path, False) or text
    kept = [(b, n) for b, (n, _) in zip(blocks, sizes) if has_text[b.path]]
    if not kept:
        raise UsageError(f"{source} holds no text (empty or only whitespace); pass files with text in them")
    total = sum(n for _, n in kept)
    cut = int((1.0 - val_fraction) * total)
    jobs, seen = [], 0
    for block, n in kept:  # a block is all training text, all validation text, or holds the cut
        inside = cut - seen if seen < cut < seen + n else None
        jobs.append((block, inside, seen >= cut, block.first or seen == cut))
        seen += n
    if tokenizer_file:
        tokenizer = load_tokenizer(tokenizer_file)
    else:
        train_text = (read_block(b)[:inside] for b, inside, in_val, _ in jobs if not in_val)
        tokenizer = train_tokenizer(train_text, vocab_size)
    dtype = token_dtype(tokenizer.get_vocab_size())
    check_shards_disk(out, tokenizer, jobs, total + len(files), dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, out / "tokenizer.json")
    writers = {part: ShardWriter(out, part, dtype, shard_tokens) for part in ("train", "val")}
    with worker_pool(workers, _load_worker_tokenizer, (tokenizer.to_str(),)) as pool:
        for pieces in pool.imap(_encode, jobs, chunksize=1):
            for part, ids in pieces:
                writers[part].write(ids)
    for writer in writers.values():
        writer.close()
    val_bytes = sum(len(read_block(b)[inside or 0 :].encode("utf-8"))
                    for b, inside, in_val, _ in jobs if in_val or inside is not None)
    manifest = {
        "format": 1, "source": str(Path(source).resolve()), "files": len({b.path for b, _ in kept}),
        "tokenizer_sha256": hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
        "vocab_size": tokenizer.get_vocab_size(), "dtype": dtype.name, "val_fraction": val_fraction,
        "characters": {"train": cut, "val": total - cut}, "val_utf8_bytes": val_bytes,
        "shards": writers["train"].shards + writers["val"].shards,
    }
    write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def check_shards_disk(out: Path, tokenizer: Tokenizer, jobs: list, characters: int, dtype: np.dtype) -> int:
    """Refuse before writing when the shards cannot fit: their size from the tokens per character of the first
    block's first MB (a tenth more, for text that tokenizes less well), less the shards they replace."""
    sample = read_block(jobs[0][0])[:SAMPLE_CHARS]
    tokens = characters * max(len(encode(tokenizer, sample)), 1) / max(len(sample), 1)
    shards = int(1.1 * tokens) * dtype.itemsize
    replaced = sum(p.stat().st_size for p in out.glob("*_[0-9][0-9][0-9].bin")) if out.is_dir() else 0
    return check_disk(out, {"the token shards": shards}, shards - replaced, "gpt prepare", {})


def is_prepared(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / MANIFEST).is_file()


class TokenStream:
    """Several memory-mapped shards read as one array of ids (fancy indexing included), never loaded whole."""

    def __init__(self, paths: list[Path], dtype: np.dtype):
        self.shards = [np.memmap(p, dtype=dtype, mode="r") for p in paths]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.dtype = dtype

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index):
        if len(self.shards) == 1:
            return self.shards[0][index]
        if isinstance(index, slice):
            return self[np.arange(*index.indices(len(self)))]
        index = np.asarray(index)
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        out = np.empty(index.shape, dtype=self.dtype)
        for s in np.unique(shard):
            chosen = shard == s
            out[chosen] = self.shards[s][index[chosen] - self.offsets[s]]
        return out


def load_prepared(folder: str | Path) -> tuple[Tokenizer, TokenSplits, dict]:
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"{folder / MANIFEST} cannot be read ({err}); run gpt prepare again") from None
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    dtype = np.dtype(manifest["dtype"])
    parts = {part: [folder / s["file"] for s in manifest["shards"] if s["split"] == part] for part in ("train", "val")}
    missing = [p for paths in parts.values() for p in paths if not p.is_file()]
    if missing or not parts["train"] or not parts["val"]:
        raise UsageError(f"{folder} lacks token shards ({missing[0].name if missing else 'none listed'}); "
                         "run gpt prepare again")
    splits = TokenSplits(TokenStream(parts["train"], dtype), TokenStream(parts["val"], dtype)[:],
                         [], manifest["characters"]["val"], manifest["val_utf8_bytes"])
    return tokenizer, splits, manifest

