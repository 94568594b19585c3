"""Byte-level BPE: every string maps to ids and back exactly (spaces, newlines, emoji, CJK).

Byte-level means the base alphabet is the 256 bytes, so nothing is ever unknown and decoding
is the exact inverse of encoding. Merges are learned from the training text only.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gpt.config import UsageError
from gpt.corpus import load_documents, split_documents

PAD = "[PAD]"
EOT = "<|endoftext|>"
SPECIAL_TOKENS = (PAD, EOT)
CHUNK_CHARS = 1 << 20
_CUT = re.compile(r" (?=\S)")  # the byte-level pre-tokenizer always starts a piece at a space before a non-space


def text_chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """Pieces of about `size` characters that tokenize, one by one, to exactly the ids of the whole.

    A long text (a 50 MB file with no line breaks) encoded in one call takes gigabytes of memory;
    cut just before a space that precedes a non-space, where a pre-token boundary lies anyway,
    the pieces give the same ids. A text with no such space in reach is cut at `size` characters:
    still lossless, though merges across that cut are lost.
    """
    begin = 0
    while len(text) - begin > size:
        cut = _CUT.search(text, begin + size, begin + 2 * size)
        end = cut.start() if cut else begin + size
        yield text[begin:end]
        begin = end
    if begin < len(text):
        yield text[begin:]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Tokenizer:
    """Learn a byte-level BPE of `vocab_size` ids (special tokens included) from `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((piece for text in texts for piece in text_chunks(text)), trainer=trainer)
    tokenizer.encode_special_tokens = True  # text that spells "<|endoftext|>" stays text
    return tokenizer


def build_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 1024) -> Tokenizer:
    """The seed's entry point: with no arguments, a BPE trained on Alice's training split."""
    if texts is None:
        texts = split_documents(load_documents(), val_fraction=0.1)[0]
    return train_tokenizer(texts, vocab_size)


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`; text holding lone surrogates (undecodable bytes smuggled through argv, stdin or
    JSON) has no UTF-8 form and is refused."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise UsageError(f"the text is not valid UTF-8 (an undecodable byte at character {err.start}); "
                             "pass UTF-8 text") from None
    return tokenizer.encode(text, add_special_tokens=False).ids


class MergeDropout:
    """BPE dropout (Provilkov et al., 2020): while a word is segmented, each merge that applies is skipped with
    probability p, so the same text comes out in other, finer segmentations: more distinct training data from a
    small text. The tokenizers library has this built in but draws from an unseeded generator; a run must repeat
    exactly from its seed, so the merges are applied here, in the library's order (lowest rank, then leftmost).
    """

    def __init__(self, tokenizer: Tokenizer, p: float, seed: int):
        model = json.loads(tokenizer.to_str())["model"]
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("ignore_merges"):
            raise UsageError("BPE dropout needs a plain byte-level BPE tokenizer (like gpt train's); set "
                             "train.bpe_dropout = 0")
        self.ids = model["vocab"]
        self.ranks = {tuple(m.split(" ") if isinstance(m, str) else m): rank for rank, m in enumerate(model["merges"])}
        self.pre_tokenize = tokenizer.pre_tokenizer.pre_tokenize_str
        self.p, self.random = p, random.Random(seed)

    def encode(self, text: str) -> list[int]:
        return [self.ids[symbol] for word, _ in self.pre_tokenize(text) for symbol in self.segment(word)]

    def segment(self, word: str) -> list[str]:
        symbols = list(word)  # one symbol per byte
        while len(symbols) > 1:
            best = None  # (rank, position) of the merge to apply: the lowest rank not dropped this round
            for i in range(len(symbols) - 1):
                rank = self.ranks.get((symbols[i], symbols[i + 1]))
                if rank is not None and (best is None or rank < best[0]) and self.random.random() >= self.p:
                    best = (rank, i)
            if best is None:
                break
            i = best[1]
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        return symbols


def decode(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def byte_alphabet() -> dict[str, int]:
    """Byte-level BPE spells each byte as one printable character (GPT-2's table): character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """The bytes each id stands for (b"" for special tokens): decoding is joining them as UTF-8."""
    alphabet = byte_alphabet()
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    table = [b""] * tokenizer.get_vocab_size()
    for token, token_id in tokenizer.get_vocab().items():
        if token not in special:
            table[token_id] = bytes(alphabet[c] for c in token)
    return table


def special_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise UsageError(f"tokenizer has no {token} token; use a tokenizer made by gpt train")
    return token_id


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    Path(path).write_text(tokenizer.to_str(pretty=True), encoding="utf-8")


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"tokenizer file {path} not found; the checkpoint folder is incomplete")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise UsageError(f"tokenizer file {path} cannot be read ({err}); re-create the checkpoint") from None
    tokenizer.encode_special_tokens = True  # not stored in tokenizer.json
    return tokenizer


def tokenizer_info(tokenizer: Tokenizer) -> dict:
    """What config.json records about the tokenizer."""
    return {
        "type": "byte-level BPE",
        "vocab_size": tokenizer.get_vocab_size(),
        "pad_id": tokenizer.token_to_id(PAD),  # None for an imported GPT-2 tokenizer
        "eot_id": special_id(tokenizer, EOT),
        "sha256_of_json": _fingerprint(tokenizer),
    }


def _fingerprint(tokenizer: Tokenizer) -> str:
    data = json.loads(tokenizer.to_str())
    return hashlib.sha256(json.dumps(data["model"], sort_keys=True).encode()).hexdigest()
