"""What the memory of the training text costs when sampling: a checkpoint's 200-token sample with its memory
against the same network alone.

    python benchmarks/memory_generation.py CHECKPOINT [--new-tokens 200] [--rounds 5]

Both decode from the same prompt ("Alice was beginning") at temperature 0.8 with the same seed, through
Predictor.generate and its KV cache; the memory adds, per token, the neighbours' distribution over every stored
position and the n-gram counts. The runs alternate, several rounds; the table gives each one's best round
(the least disturbed by background load) and the ratio. The issue's bound: at most 2.5x the network alone.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from gpt.checkpoint import load_checkpoint
from gpt.predictor import Predictor


def seconds_to_sample(predictor: Predictor, prompt: torch.Tensor, new_tokens: int) -> float:
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    with torch.no_grad():
        out = predictor.generate(prompt, new_tokens, temperature=0.8, generator=generator)
    assert out.size(1) == prompt.size(1) + new_tokens
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.checkpoint)
    memory = checkpoint.memory
    if memory is None:
        raise SystemExit(f"{args.checkpoint} has no memory of its training text: nothing to compare")
    prompt = torch.tensor([checkpoint.tokenizer.encode("Alice was beginning").ids])
    predictors = {"with the memory": checkpoint.predictor, "network alone": Predictor(checkpoint.model)}
    best = dict.fromkeys(predictors, float("inf"))
    for _ in range(args.rounds):
        for name, predictor in predictors.items():
            best[name] = min(best[name], seconds_to_sample(predictor, prompt, args.new_tokens))
    machine = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine}, "
          f"{len(memory):,} memory positions, {args.new_tokens} new tokens, best of {args.rounds} rounds")
    print("| run | seconds | tokens/s |\n|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.3f} | {args.new_tokens / seconds:.0f} |")
    print(f"with the memory / network alone: {best['with the memory'] / best['network alone']:.2f}x")


if __name__ == "__main__":
    main()
