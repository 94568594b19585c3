"""Large corpora: `gpt prepare` throughput against a plain tokenizers loop, and training memory as the corpus grows.

    python benchmarks/bench_prepare.py [--sizes-mb 20,200] [--workers 2] [--train-steps 200] [--work DIR]

For each size, a corpus is generated (not downloaded, not committed): Alice's paragraphs, shuffled with a
seeded generator, written into 1 MB .txt files until the size is reached. Then:

  1. `gpt prepare` (python API, `--workers` processes) into token shards, timed end to end; and the time of its
     tokenizer training alone, which is single-threaded in both cases.
  2. The baseline: the same tokenizer applied by a plain single-process loop, `tokenizer.encode(text)` for
     each file read whole, timed. Throughput is compared on encoding (tokens per second).
  3. `gpt train --data SHARDS --preset tiny --max-steps N` in a subprocess: peak resident memory (VmHWM, which
     includes the pages of the memory-mapped shards it touched) and its anonymous part (RssAnon: memory the
     process allocated, which is what would grow if it loaded the corpus), read from /proc at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpt.corpus import load_documents
from gpt.prepare import load_prepared, prepare
from gpt.tokenizer import encode

RSS_PROBE = """
import resource, sys
from gpt.cli import main
code = main(sys.argv[1:])
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print("RSS", status["VmHWM"].strip(), status["RssAnon"].strip(), file=sys.stderr)
sys.exit(code)
"""


def make_corpus(folder: Path, megabytes: int, seed: int = 0) -> int:
    paragraphs = [p for p in load_documents("alice")[0].split("\n\n") if p.strip()]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written, index = 0, 0
    while written < megabytes << 20:
        rng.shuffle(paragraphs)
        text = "\n\n".join(paragraphs)[: 1 << 20]
        (folder / f"part_{index:05d}.txt").write_text(text, encoding="utf-8")
        written += len(text.encode("utf-8"))
        index += 1
    return written


def plain_loop(folder: Path, tokenizer) -> tuple[int, float]:
    start, tokens = time.perf_counter(), 0
    for path in sorted(folder.glob("*.txt")):
        tokens += len(encode(tokenizer, path.read_text(encoding="utf-8"))) + 1
    return tokens, time.perf_counter() - start


def train_memory(shards: Path, out: Path, steps: int) -> str:
    command = [sys.executable, "-c", RSS_PROBE, "train", "--data", str(shards), "--preset", "tiny",
               "--max-steps", str(steps), "--out", str(out), "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    if result.returncode:
        raise SystemExit(result.stderr)
    return next(line for line in result.stderr.splitlines() if line.startswith("RSS"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", default="20,200")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--work", help="folder for corpora and shards (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_prepare_"))
    print(f"# {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.workers} workers, work folder {work}")
    print("| corpus | prepare total (s) | of which tokenizer training (s) | prepare encoding tokens/s | "
          "plain loop tokens/s | ratio | train peak RSS (VmHWM) | train RssAnon |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for megabytes in (int(m) for m in args.sizes_mb.split(",")):
        corpus, shards = work / f"corpus_{megabytes}mb", work / f"shards_{megabytes}mb"
        size = make_corpus(corpus, megabytes)
        start = time.perf_counter()
        manifest = prepare(corpus, shards, vocab_size=2048, workers=args.workers)
        total = time.perf_counter() - start
        tokenizer = load_prepared(shards)[0]
        start = time.perf_counter()
        prepare(corpus, work / "again", vocab_size=2048, workers=args.workers, tokenizer_file=shards / "tokenizer.json")
        encode_time = time.perf_counter() - start
        tokens = sum(s["tokens"] for s in manifest["shards"])
        plain_tokens, plain_time = plain_loop(corpus, tokenizer)
        rss = train_memory(shards, work / f"run_{megabytes}mb", args.train_steps).split()
        print(f"| {size / 2**20:.0f} MB, {tokens:,} tokens | {total:.1f} | {total - encode_time:.1f} | "
              f"{tokens / encode_time:,.0f} | {plain_tokens / plain_time:,.0f} | "
              f"{plain_time / encode_time:.2f}x | {rss[1]} {rss[2]} | {rss[3]} {rss[4]} |", flush=True)


if __name__ == "__main__":
    main()
