"""What `gpt train` adds to a bare training step: its logged tokens/s against the step bench_train.py times.

    python benchmarks/trainer_overhead.py [--steps 40] [--bare-steps 12]

Size M of bench_train.py (6 layers, 6 heads, 384 wide, block 256, batch 8, vocabulary 4096, no dropout, fp32).
The bare step is bench_train's: forward, loss, backward, clipping, AdamW, zero_grad on random tokens. The
trainer is `gpt.train.train()` on Alice (a 4,096-token BPE) with validation and checkpoints only at the end,
logging every 5 steps; its speed is the median of the tokens/s it logs in metrics.jsonl, leaving out the
last row (which also times the final validation). Bare steps are timed before and after the trainer run, in
the same process, so a change in background load shows as a gap between the two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import SIZES, build_ours, make_batches, train_step  # noqa: E402

from gpt.config import ModelConfig, TrainConfig  # noqa: E402
from gpt.logs import read_metrics  # noqa: E402
from gpt.train import train  # noqa: E402


def bare_tokens_per_s(steps: int) -> float:
    size = SIZES["M"]
    contender = build_ours(size)
    batches = make_batches(size, 4)
    for x, y in batches[:2]:
        train_step(contender, x, y, "fp32")
    seconds = []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        start = time.perf_counter()
        train_step(contender, x, y, "fp32")
        seconds.append(time.perf_counter() - start)
    return size.batch * size.block / statistics.median(seconds)


def trainer_tokens_per_s(steps: int, out: Path) -> float:
    size = SIZES["M"]
    model_config = ModelConfig(vocab_size=size.vocab, sequence_len=size.block, num_layers=size.layers,
                               embed_dim=size.width, num_heads=size.heads, dropout=0.0)
    train_config = TrainConfig(tokenizer_vocab_size=size.vocab, batch_size=size.batch, max_steps=steps, max_time=None,
                               eval_interval=10**9, checkpoint_interval=10**9, log_interval=5, device="cpu",
                               dtype="float32")  # the bare step is fp32: on a bf16 CPU "auto" would differ
    train(model_config, train_config, out, show_progress=False)
    rows = read_metrics(out / "metrics.jsonl")[:-1]
    return statistics.median(row["tokens_per_s"] for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="trainer steps")
    parser.add_argument("--bare-steps", type=int, default=12, help="bare steps before and after")
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; size M, fp32")
    before = bare_tokens_per_s(args.bare_steps)
    with tempfile.TemporaryDirectory() as folder:
        trainer = trainer_tokens_per_s(args.steps, Path(folder) / "run")
    after = bare_tokens_per_s(args.bare_steps)
    bare = (before + after) / 2
    print(f"bare step: {before:,.0f} tokens/s before, {after:,.0f} after (mean {bare:,.0f})")
    print(f"gpt train: {trainer:,.0f} tokens/s (median of its logged rows)")
    print(f"trainer / bare step: {trainer / bare:.3f} ({100 * (1 - trainer / bare):+.1f}% overhead)")


if __name__ == "__main__":
    main()
