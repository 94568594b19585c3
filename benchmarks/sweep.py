"""Hyper-parameter sweep for the default preset: train each variant for a fixed time on Alice, score it.

    python benchmarks/sweep.py --time 3m --out runs/sweep NAME=key=value,key=value ...

Each variant overrides the default preset ("model.embed_dim=192,train.learning_rate=2e-3"). Runs are
sequential (2 cores: parallel runs would distort each other's step counts). Results are appended to
OUT/results.jsonl and printed as a markdown table: validation bits per character (the last 10% of
the book, scored by the same sliding-window evaluation as `gpt eval`), steps, tokens/s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gpt.checkpoint import load_checkpoint
from gpt.config import DEFAULT_PRESET, apply_overrides, parse_duration, preset
from gpt.corpus import load_documents, split_documents
from gpt.evaluate import evaluate_documents
from gpt.logs import read_metrics
from gpt.train import train


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, assignments = text.partition("=")
    overrides: dict = {"model": {}, "train": {}}
    for assignment in filter(None, assignments.split(",")):
        key, _, value = assignment.partition("=")
        section, _, field = key.partition(".")
        overrides[section][field] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    return name, overrides


def run(name: str, overrides: dict, seconds: float, out: Path) -> dict:
    model_config, train_config = preset(DEFAULT_PRESET)
    apply_overrides(model_config, train_config, overrides)
    train_config.max_time, train_config.max_steps = seconds, None
    started = time.time()
    train(model_config, train_config, out / name, show_progress=False)
    checkpoint = load_checkpoint(out / name)
    val_text = split_documents(load_documents(), train_config.val_fraction)[1]
    score = evaluate_documents(checkpoint.predictor, checkpoint.tokenizer, val_text)
    rows = read_metrics(out / name / "metrics.jsonl")
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    under_two = next((r["elapsed"] for r in rows if r.get("val_bits_per_char", 9) <= 2.0), None)
    return {"name": name, "overrides": overrides, "seconds": seconds, "val_bpc": round(score.bits_per_char, 4),
            "steps": rows[-1]["step"], "tokens_per_s": round(sorted(speeds)[len(speeds) // 2]),
            "params_M": round(checkpoint.model.num_params() / 1e6, 3), "time_to_2.00": under_two,
            "wall_s": round(time.time() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="NAME=section.key=value,...")
    parser.add_argument("--time", default="3m")
    parser.add_argument("--out", default="runs/sweep")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("| variant | overrides | val bits/char | steps | tokens/s | params (M) | time to 2.00 bpc |")
    print("|---|---|---|---|---|---|---|")
    for text in args.variants:
        name, overrides = parse_variant(text)
        result = run(name, overrides, parse_duration(args.time), out)
        with open(out / "results.jsonl", "a") as handle:
            handle.write(json.dumps(result) + "\n")
        flat = ", ".join(f"{s}.{k}={v}" for s, kv in overrides.items() for k, v in kv.items())
        print(f"| {name} | {flat} | {result['val_bpc']:.4f} | {result['steps']} | {result['tokens_per_s']:,} | "
              f"{result['params_M']} | {result['time_to_2.00'] or '-'} |", flush=True)


if __name__ == "__main__":
    main()
