"""Validation curves of several runs in one PNG: bits/char of the network alone and with the memory, by step.

    python benchmarks/plot_curves.py --out docs/curves.png "before=runs/old" "after=runs/small"

Each argument is LABEL=RUN_FOLDER (a folder written by gpt train, read through its metrics.jsonl). The
with-memory curve is drawn where the run's validations scored one; the end's memory row gives its last point.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gpt.logs import read_metrics  # noqa: E402


def curves(run: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, network bits/char) and (step, bits/char with the memory) of one run's validations."""
    rows = read_metrics(run / "metrics.jsonl")
    network = [(r["step"], r["val_bits_per_char"]) for r in rows if "val_bits_per_char" in r]
    mixed = [(r["step"], r["val_bits_per_char_with_memory"]) for r in rows if "val_bits_per_char_with_memory" in r]
    return network, mixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_FOLDER")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--title", default="validation bits/char on Alice")
    args = parser.parse_args()
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for index, item in enumerate(args.runs):
        label, _, folder = item.partition("=")
        network, mixed = curves(Path(folder))
        color = f"C{index}"
        axes.plot(*zip(*network), color=color, linestyle="--", marker=".", label=f"{label}: network alone")
        if mixed:
            axes.plot(*zip(*mixed), color=color, marker="o", markersize=3, label=f"{label}: with the memory")
    axes.set_xlabel("step")
    axes.set_ylabel("bits per character")
    axes.set_title(args.title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
