"""The `gpt` command: a thin layer over the library. Bad input ends in one line on stderr."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from gpt.config import DEFAULT_PRESET, PRESETS, UsageError, apply_overrides, load_toml, parse_duration, preset


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda or mps")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="gpt", description="Train a small GPT on a book, sample from it, score it.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    train = commands.add_parser("train", help="train a model (Alice by default)")
    train.add_argument("--data", help="a UTF-8 text file or a folder of .txt files (default: Alice)")
    train.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    train.add_argument("--config", help="a TOML file with [model] and [train] sections overriding the preset")
    train.add_argument("--out", help="checkpoint folder (default runs/PRESET)")
    train.add_argument("--max-time", help="training time budget, e.g. 30s, 10m, 2h")
    train.add_argument("--max-steps", type=int, help="number of optimizer steps")
    train.add_argument("--eval-interval", type=int, help="validate every N steps")
    train.add_argument("--seed", type=int, help="random seed (same seed, data and device: same losses)")
    train.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], help="training precision")
    train.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device(train)

    generate = commands.add_parser("generate", help="continue a prompt with a trained model")
    generate.add_argument("prompt", nargs="?", default="", help="text to continue (default: start a new text)")
    generate.add_argument("--checkpoint", required=True, help="a folder written by gpt train")
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    generate.add_argument("--top-k", type=int, help="sample from the K most likely tokens")
    generate.add_argument("--top-p", type=float, help="sample from the smallest set with probability P")
    generate.add_argument("--seed", type=int, help="same seed, same text")
    generate.add_argument("--num-samples", type=int, default=1)
    add_device(generate)

    evaluate = commands.add_parser("eval", help="score text: loss, perplexity, bits per character and byte")
    evaluate.add_argument("--checkpoint", required=True, help="a folder written by gpt train")
    evaluate.add_argument("--text", help="a text file or folder to score (default: the validation split)")
    evaluate.add_argument("--stride", type=int, help="sliding-window stride in tokens (default: context / 2)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    add_device(evaluate)
    return parser


def train_configs(args: argparse.Namespace):
    model_config, train_config = preset(args.preset or DEFAULT_PRESET)
    if args.config:
        apply_overrides(model_config, train_config, load_toml(args.config))
    if args.resume:  # the saved configuration wins; a different model is refused by train()
        from gpt.checkpoint import configs_from, read_config

        stored_model, train_config = configs_from(read_config(Path(args.out)), Path(args.out))
        if not (args.preset or args.config):
            model_config = stored_model
    if args.max_time is not None:
        train_config.max_time = parse_duration(args.max_time)
        train_config.max_steps = args.max_steps
    elif args.max_steps is not None:
        train_config.max_steps, train_config.max_time = args.max_steps, None
    for name in ("eval_interval", "seed", "dtype"):
        if getattr(args, name) is not None:
            setattr(train_config, name, getattr(args, name))
    train_config.device = args.device
    return model_config, train_config


def run_train(args: argparse.Namespace) -> int:
    args.out = args.out or f"runs/{args.preset or DEFAULT_PRESET}"
    model_config, train_config = train_configs(args)
    model_config.validate()
    train_config.validate()
    from gpt.train import train  # after the checks above: importing torch takes seconds

    result = train(model_config, train_config, args.out, data=args.data, resume=args.resume,
                   show_progress=not args.quiet)
    return {"SIGINT": 130, "SIGTERM": 143}.get(result.interrupted_by, 0)


def run_generate(args: argparse.Namespace) -> int:
    from gpt.checkpoint import load_checkpoint
    from gpt.retriever import Retriever
    from gpt.sampling import SamplingParams
    from gpt.train import choose_device

    SamplingParams(args.temperature, args.top_k, args.top_p).validate()
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    checkpoint = load_checkpoint(args.checkpoint, choose_device(args.device))
    retriever = Retriever(checkpoint.tokenizer, checkpoint.model)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    if args.num_samples == 1:
        print(args.prompt, end="", flush=True)
        for piece in retriever.stream(args.prompt, **sampling):
            print(piece, end="", flush=True)
        print()
        return 0
    for i, text in enumerate(retriever.generate_batch(args.prompt, args.num_samples, **sampling)):
        print(f"{'' if i == 0 else chr(10)}--- sample {i + 1} ---\n{text}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from gpt.checkpoint import load_checkpoint
    from gpt.corpus import load_documents
    from gpt.dataset import split_documents
    from gpt.evaluate import evaluate_documents
    from gpt.train import choose_device

    checkpoint = load_checkpoint(args.checkpoint, choose_device(args.device))
    if args.text:
        documents, what = load_documents(args.text), args.text
    else:
        source = checkpoint.info.get("data", "alice")
        documents = split_documents(load_documents(source), checkpoint.train_config.val_fraction)[1]
        what = f"validation split of {source}"
    score = evaluate_documents(checkpoint.model, checkpoint.tokenizer, documents, args.stride)
    if args.json:
        print(json.dumps(score.as_dict()))
    else:
        print(f"{what}: {score.tokens:,} tokens, {score.chars:,} characters\n"
              f"loss {score.loss:.4f} nats/token | perplexity {score.perplexity:.2f} | "
              f"{score.bits_per_char:.4f} bits/char | {score.bits_per_byte:.4f} bits/byte")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return {"train": run_train, "generate": run_generate, "eval": run_eval}[args.command](args)
    except UsageError as err:
        if debug:
            raise
        print(f"gpt: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except OSError as err:  # the disk or the system said no: still one line, the cause first
        if debug:
            raise
        where = f" ({err.filename})" if err.filename else ""
        hint = {errno.ENOSPC: "free some disk space", errno.EACCES: "check the permissions",
                errno.EROFS: "write somewhere else"}.get(err.errno, "check the path")
        print(f"gpt: error: {err.strerror or err}{where}; {hint} and try again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
