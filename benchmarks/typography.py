"""How much a checkpoint loses to another typography of the same words (issue 25, item 3).

    python benchmarks/typography.py runs/small [runs/other ...] [--text FILE]

Scores the validation split of each checkpoint's text as it is and rewritten in plain ASCII typography
(gpt.typography.ascii_typography: straight quotes, `--` for dashes, no `_emphasis_` marks, rewrapped at 66
columns), with the checkpoint's memory and with the network alone, and prints the gap. The rewrite is built
here from the split, in memory: no book text is written anywhere. `--text FILE` scores that file too, as it is
and in ASCII (for unseen text by the same author).
"""

from __future__ import annotations

import argparse

from gpt.checkpoint import load_checkpoint
from gpt.corpus import load_documents, split_documents
from gpt.evaluate import evaluate_documents
from gpt.typography import ascii_typography


def scores(checkpoint, documents: list[str]) -> tuple[float, float]:
    """(bits/char with the checkpoint's memory, of the network alone)."""
    mixed = evaluate_documents(checkpoint.predictor, checkpoint.tokenizer, documents).bits_per_char
    alone = evaluate_documents(checkpoint.model, checkpoint.tokenizer, documents).bits_per_char
    return mixed, alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--text", help="another text file to score as it is and in ASCII typography")
    args = parser.parse_args()
    print("| checkpoint | text | as it is: memory / network | ASCII: memory / network | gap: memory / network |")
    print("|---|---|---|---|---|")
    for folder in args.checkpoints:
        checkpoint = load_checkpoint(folder)
        texts = {"validation split": split_documents(load_documents(checkpoint.info.get("data", "alice")),
                                                     checkpoint.train_config.val_fraction)[1]}
        if args.text:
            texts[args.text] = load_documents(args.text)
        for name, documents in texts.items():
            original = scores(checkpoint, documents)
            retyped = scores(checkpoint, [ascii_typography(d) for d in documents])
            print(f"| {folder} | {name} | {original[0]:.4f} / {original[1]:.4f} | {retyped[0]:.4f} / "
                  f"{retyped[1]:.4f} | {retyped[0] - original[0]:+.4f} / {retyped[1] - original[1]:+.4f} |",
                  flush=True)


if __name__ == "__main__":
    main()
