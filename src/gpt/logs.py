"""What a run tells the user: a progress bar, metrics.jsonl and a loss plot."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from gpt.checkpoint import atomic_write
from gpt.evaluate import Score


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def log_batch(loss: float, start: float, epoch_index: int, total_epochs: int, batch_index: int,
              total_batches: int) -> None:
    """The seed's one-line batch report: epoch, batch, loss, elapsed time and ETA."""
    elapsed = time.time() - start
    done = epoch_index * total_batches + batch_index + 1
    remaining = elapsed / done * (total_epochs * total_batches - done)
    print(f"epoch {epoch_index + 1}/{total_epochs} | batch {batch_index + 1}/{total_batches} | "
          f"loss {loss:.4f} | {format_seconds(elapsed)} elapsed | ETA {format_seconds(remaining)}")


def run_banner(parameters: int, train_tokens: int, val_tokens: int, copies: int, bpe_dropout: float, device: str,
               unigram: Score | None, peak: object | None, estimated_bytes: int | None = None) -> str:
    """The run's first line: what is trained on what, the memory estimate the run was checked against
    (gpt.preflight), and the unigram score as the floor any model must beat."""
    copies_note = f" ({copies} tokenizations, BPE dropout {bpe_dropout})" if copies > 1 else ""
    estimate = f" (~{estimated_bytes / 1e9:.2f} GB estimated)" if estimated_bytes else ""
    return (f"{parameters / 1e6:.2f}M parameters{estimate} | {train_tokens:,} training tokens{copies_note}, "
            f"{val_tokens:,} validation tokens | device {device}"
            + (f" | a unigram model scores val loss {unigram.loss:.3f} ({unigram.bits_per_char:.3f} bits/char)"
               if unigram else "") + (f" | MFU against {peak}" if peak else ""))


class Progress:
    """A bar over the run's progress (0..1, by steps or time, whichever limit is nearer).

    On a terminal it redraws in place; in a log file it writes a plain line every 10 seconds.
    """

    def __init__(self, initial: float = 0.0, enabled: bool = True):
        self.enabled, self.interactive = enabled, sys.stderr.isatty()
        self.bar = tqdm(total=1.0, initial=initial, disable=not (enabled and self.interactive), file=sys.stderr,
                        dynamic_ncols=True, mininterval=0.5,
                        bar_format="{percentage:3.0f}%|{bar:20}| {desc} [{elapsed}<{remaining}]")
        self.done, self.last_line = initial, 0.0

    def update(self, progress: float, **fields) -> None:
        text = " ".join(f"{k} {v}" for k, v in fields.items())
        self.bar.set_description_str(text, refresh=False)
        self.bar.update(max(0.0, min(progress, 1.0) - self.done))
        self.done = max(self.done, min(progress, 1.0))
        if self.enabled and not self.interactive and time.monotonic() - self.last_line >= 10.0:
            print(f"{100 * self.done:3.0f}% | {text}", file=sys.stderr, flush=True)
            self.last_line = time.monotonic()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MetricsLog:
    """One JSON object per logged step, flushed as written so a crash loses nothing."""

    def __init__(self, path: Path, resume_after_step: int | None = None):
        self.path = Path(path)
        if resume_after_step is None:
            self.path.write_text("")
        else:  # rows past the resumed step belong to the lost future: drop them
            kept = [row for row in read_metrics(self.path) if row["step"] <= resume_after_step]
            atomic_write(self.path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in kept)))
        self.handle = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    return rows


def plot_losses(metrics_path: Path, image_path: Path) -> None:
    """Train and validation loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    figure, axes = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if train:
        axes.plot(*zip(*train), label="train", linewidth=1)
    if val:
        axes.plot(*zip(*val), label="validation", marker="o", markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    atomic_write(Path(image_path), lambda p: figure.savefig(p, format="png", dpi=100))
    plt.close(figure)
