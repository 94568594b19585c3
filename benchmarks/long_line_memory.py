"""Peak memory of preparing a text with no line breaks: python benchmarks/long_line_memory.py FILE.

Loads FILE, trains the tiny preset's 320-id tokenizer on its training split and tokenizes both
splits, as `gpt train` does, then prints the seconds each stage took and the peak resident memory.
"""

import resource
import sys
import time

from gpt.corpus import load_documents, split_documents
from gpt.dataset import prepare_splits
from gpt.tokenizer import train_tokenizer


def main(path: str) -> None:
    started = time.perf_counter()
    documents = load_documents(path)
    print(f"load {time.perf_counter() - started:.1f}s", flush=True)
    started = time.perf_counter()
    tokenizer = train_tokenizer(split_documents(documents, 0.1)[0], 320)
    print(f"train tokenizer {time.perf_counter() - started:.1f}s", flush=True)
    started = time.perf_counter()
    splits = prepare_splits(documents, tokenizer, 0.1)
    print(f"encode {time.perf_counter() - started:.1f}s, {len(splits.train):,} training tokens", flush=True)
    print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main(sys.argv[1])
