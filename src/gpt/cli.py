"""The `gpt` command: a thin layer over the library. Bad input ends in one line on stderr."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from gpt.config import DEFAULT_PRESET, PRESETS, UsageError, apply_overrides, load_toml, parse_duration, preset

ADAPT_LR = 0.01  # gpt eval --adapt's default: the best of those tried on Alice's validation split (docs/training.md)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_no_memory(command: argparse.ArgumentParser, verb: str) -> None:
    command.add_argument("--no-memory", action="store_true",
                         help=f"{verb} the network alone, without the memory of the training text")


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda or mps")


def train_arguments(train: ArgumentParser) -> None:
    train.add_argument("--data", help="a UTF-8 text file or a folder of .txt files (default: Alice)")
    train.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    train.add_argument("--config", help="a TOML file with [model] and [train] sections overriding the preset")
    train.add_argument("--out", help="checkpoint folder (default runs/PRESET)")
    train.add_argument("--max-time", help="training time budget, e.g. 30s, 10m, 2h")
    train.add_argument("--max-steps", type=int, help="number of optimizer steps")
    train.add_argument("--eval-interval", type=int, help="validate every N steps")
    train.add_argument("--seed", type=int, help="random seed (same seed, data and device: same losses)")
    train.add_argument("--dtype", choices=["auto", "float32", "bfloat16"],
                       help="training precision (default auto: bf16 where the hardware has it natively)")
    train.add_argument("--compile", action=argparse.BooleanOptionalAction,
                       help="torch.compile the training step (default: on CUDA only)")
    train.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    train.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one")
    train.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (gradient accumulation)")
    train.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters and optimizer state")
    train.add_argument("--init-from", help="fine-tune: start from this checkpoint's weights, model and tokenizer")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device(train)


def generate_arguments(generate: ArgumentParser) -> None:
    generate.add_argument("prompt", nargs="?", default="", help="text to continue (default: start a new text)")
    generate.add_argument("--checkpoint", required=True, help="a folder written by gpt train")
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    generate.add_argument("--top-k", type=int, help="sample from the K most likely tokens")
    generate.add_argument("--top-p", type=float, help="sample from the smallest set with probability P")
    generate.add_argument("--min-p", type=float, help="drop tokens less than P times as likely as the best one")
    generate.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeating context tokens")
    generate.add_argument("--stop", action="append", default=[], help="stop before this text (repeatable)")
    generate.add_argument("--seed", type=int, help="same seed, same text")
    generate.add_argument("--num-samples", type=int, default=1, help="N samples, generated as one batch")
    generate.add_argument("--interactive", action="store_true", help="read prompts in a loop (Ctrl-D exits)")
    add_no_memory(generate, "sample from")
    add_device(generate)


def prepare_arguments(prepare: ArgumentParser) -> None:
    prepare.add_argument("--data", required=True, help="a UTF-8 text file or a folder of .txt files")
    prepare.add_argument("--out", required=True, help="folder for the shards, tokenizer.json and manifest.json")
    prepare.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary to train (default 2048)")
    prepare.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    prepare.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of characters to validate")
    prepare.add_argument("--workers", type=int, help="encoding processes (default: one per CPU core)")


def eval_arguments(evaluate: ArgumentParser) -> None:
    evaluate.add_argument("--checkpoint", required=True, help="a folder written by gpt train")
    evaluate.add_argument("--text", help="a text file or folder to score (default: the validation split)")
    evaluate.add_argument("--stride", type=int, help="sliding-window stride in tokens (default: context / 2)")
    evaluate.add_argument("--adapt", nargs="?", type=float, const=ADAPT_LR, metavar="LR",
                          help="dynamic evaluation: the model learns from each window after scoring it (SGD, "
                               f"learning rate LR, default {ADAPT_LR}), as adaptive compressors do")
    add_no_memory(evaluate, "score with")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    add_device(evaluate)


def export_arguments(export: ArgumentParser) -> None:
    export.add_argument("--checkpoint", required=True, help="a folder written by gpt train or gpt import")
    export.add_argument("--out", required=True, help="the transformers folder to write")


def import_arguments(imports: ArgumentParser) -> None:
    imports.add_argument("--from", dest="source", required=True, help="a transformers model folder")
    imports.add_argument("--out", required=True, help="the checkpoint folder to write")


def serve_arguments(serve: ArgumentParser) -> None:
    serve.add_argument("--checkpoint", required=True, help="a folder written by gpt train")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (0 picks a free one; default 8000)")
    serve.add_argument("--api-key", default=os.environ.get("GPT_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $GPT_API_KEY; none: no key needed)")
    serve.add_argument("--model-name", help="the model id clients send (default: the checkpoint folder's name)")
    serve.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    serve.add_argument("--max-prompt-tokens", type=int, default=4096, help="longest prompt accepted, in tokens")
    serve.add_argument("--max-batch", type=int, default=16,
                       help="requests decoded at once, one row each (default 16); more wait for a free row")
    serve.add_argument("--threads", type=int, help="CPU threads for the model (default: torch's choice; 1 is often "
                                                   "fastest for tiny models on a busy machine)")
    add_device(serve)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="gpt", description="Train a small GPT on a book, sample from it, score it.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for name, summary, arguments in (
        ("train", "train a model (Alice by default)", train_arguments),
        ("generate", "continue a prompt with a trained model", generate_arguments),
        ("prepare", "tokenize a large corpus once into token shards for gpt train", prepare_arguments),
        ("eval", "score text: loss, perplexity, bits per character and byte", eval_arguments),
        ("export", "write a transformers folder (weights, config, tokenizer, card)", export_arguments),
        ("import", "turn a transformers GPT-2, OpenAI-GPT or post-LN OPT folder into a checkpoint", import_arguments),
        ("serve", "serve a model over OpenAI's completions API, with a playground page", serve_arguments),
    ):
        arguments(commands.add_parser(name, help=summary))
    return parser


def train_configs(args: argparse.Namespace):
    if args.resume and args.init_from:
        raise UsageError("--init-from starts a new run and --resume continues one; pass only one of them")
    model_config, train_config = preset(args.preset or DEFAULT_PRESET)
    if args.init_from or args.resume:  # gpt.checkpoint imports torch (seconds): only when a folder is read
        from gpt.checkpoint import configs_from, read_config
    if args.init_from and not args.preset:  # fine-tune the model as it is; a different shape is refused by train()
        model_config = configs_from(read_config(Path(args.init_from)), Path(args.init_from))[0]
    if args.config:
        apply_overrides(model_config, train_config, load_toml(args.config))
    if args.resume:  # the saved configuration wins; a different model is refused by train()
        stored_model, train_config = configs_from(read_config(Path(args.out)), Path(args.out))
        if not (args.preset or args.config):
            model_config = stored_model
    if args.max_time is not None:
        train_config.max_time = parse_duration(args.max_time)
        train_config.max_steps = args.max_steps
    elif args.max_steps is not None:
        train_config.max_steps, train_config.max_time = args.max_steps, None
    train_config.fsdp = args.fsdp
    for name in ("eval_interval", "seed", "dtype", "grad_accum", "compile"):
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
                   show_progress=not args.quiet, init_from=args.init_from, overwrite=args.overwrite)
    return {"SIGINT": 130, "SIGTERM": 143}.get(result.interrupted_by, 0)


def run_generate(args: argparse.Namespace) -> int:
    from gpt.checkpoint import load_checkpoint
    from gpt.hardware import choose_device
    from gpt.retriever import Retriever
    from gpt.sampling import SamplingParams

    SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty).validate()
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    checkpoint = load_checkpoint(args.checkpoint, choose_device(args.device), memory=not args.no_memory)
    retriever = Retriever(checkpoint.tokenizer, checkpoint.predictor)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty, stop=args.stop)
    if args.interactive:
        return interact(retriever, sampling)
    if args.num_samples == 1:
        stream = retriever.stream(args.prompt, **sampling)  # refuses a bad prompt before anything is printed
        print(args.prompt, end="", flush=True)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        return 0
    for i, text in enumerate(retriever.generate_batch(args.prompt, args.num_samples, **sampling)):
        print(f"{'' if i == 0 else chr(10)}--- sample {i + 1} ---\n{text}")
    return 0


def interact(retriever, sampling: dict) -> int:
    """A prompt loop: Ctrl-C stops the current continuation (or clears the line), Ctrl-D exits."""
    try:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    except ImportError:  # Windows
        pass
    print("Type a prompt and press Enter. Ctrl-C stops a continuation, Ctrl-D exits.", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        except UnicodeDecodeError:
            print("gpt: error: that line is not valid UTF-8; type UTF-8 text", file=sys.stderr)
            continue
        try:
            stream = retriever.stream(prompt, **sampling)
        except UsageError as err:
            print(f"gpt: error: {err}", file=sys.stderr)
            continue
        print(prompt, end="", flush=True)
        try:
            for piece in stream:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            stream.close()
            print(" [stopped]", end="")
        print()


def run_prepare(args: argparse.Namespace) -> int:
    from gpt.config import TrainConfig
    from gpt.prepare import prepare

    TrainConfig(tokenizer_vocab_size=args.vocab_size, val_fraction=args.val_fraction).validate()
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    manifest = prepare(args.data, args.out, args.vocab_size, args.val_fraction, args.tokenizer, args.workers)
    tokens = {part: sum(s["tokens"] for s in manifest["shards"] if s["split"] == part) for part in ("train", "val")}
    print(f"{manifest['files']} files -> {tokens['train']:,} training and {tokens['val']:,} validation tokens "
          f"({manifest['dtype']}) in {args.out}; train with: gpt train --data {args.out}", file=sys.stderr)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from gpt.checkpoint import load_checkpoint
    from gpt.corpus import load_documents, split_documents
    from gpt.evaluate import evaluate_documents, score_from_counts, total_nats
    from gpt.hardware import choose_device
    from gpt.prepare import is_prepared, load_prepared
    from gpt.tokenizer import EOT, special_id

    checkpoint = load_checkpoint(args.checkpoint, choose_device(args.device), memory=not args.no_memory)
    source, predictor = checkpoint.info.get("data", "alice"), checkpoint.predictor
    if args.text:
        what = args.text
        score = evaluate_documents(predictor, checkpoint.tokenizer, load_documents(args.text), args.stride,
                                   adapt_lr=args.adapt)
    elif is_prepared(source):
        what, splits = f"validation shards of {source}", load_prepared(source)[1]
        nats, tokens = total_nats(predictor, splits.val, special_id(checkpoint.tokenizer, EOT), args.stride,
                                  adapt_lr=args.adapt)
        score = score_from_counts(nats, tokens, splits.val_chars, splits.val_bytes)
    else:
        what = f"validation split of {source}"
        documents = split_documents(load_documents(source), checkpoint.train_config.val_fraction)[1]
        score = evaluate_documents(predictor, checkpoint.tokenizer, documents, args.stride, adapt_lr=args.adapt)
    memory, config = checkpoint.memory, checkpoint.model_config
    if args.json:
        print(json.dumps(score.as_dict() | ({"adapt_lr": args.adapt} if args.adapt else {})
                         | {"memory_positions": len(memory) if memory and not args.adapt else 0}))
    else:
        how = f", scored adaptively (dynamic evaluation, SGD learning rate {args.adapt:g})" if args.adapt else ""
        if memory is not None and not args.adapt:
            counts = (f", {config.memory_ngram_order}-gram counts {config.memory_ngram_weight:g}"
                      if memory.ngram else "")
            how = (f", with the memory of the training text ({len(memory):,} positions, weight "
                   f"{config.memory_weight:g}{counts}; --no-memory for the network alone)")
        elif config.memory_weight > 0 and not args.no_memory and not args.adapt:
            how = ", by the network alone (this checkpoint has no memory: it is built when a training run ends)"
        print(f"{what}: {score.tokens:,} tokens, {score.chars:,} characters{how}\n"
              f"loss {score.loss:.4f} nats/token | perplexity {score.perplexity:.2f} | "
              f"{score.bits_per_char:.4f} bits/char | {score.bits_per_byte:.4f} bits/byte")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from gpt.checkpoint import MEMORY_FILE
    from gpt.hf import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {out}: load it with transformers' AutoModelForCausalLM.from_pretrained({str(out)!r})")
    if (Path(args.checkpoint) / MEMORY_FILE).is_file():
        print("the memory of the training text is not exported (transformers has no place for it): the export "
              "scores and samples like `gpt eval --no-memory`", file=sys.stderr)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from gpt.hf import import_checkpoint

    out = import_checkpoint(args.source, args.out)
    print(f"wrote {out}: try gpt generate --checkpoint {out}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import torch

    from gpt.hardware import choose_device

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as err:
        raise UsageError(f"gpt serve needs FastAPI and uvicorn ({err.name} is missing); install them with "
                         f"pip install 'wonderland-gpt[serve]'") from None
    from gpt.serve import serve
    from gpt.serve_schema import Limits

    if args.max_tokens < 1 or args.max_prompt_tokens < 1 or args.max_batch < 1:
        raise UsageError("--max-tokens, --max-prompt-tokens and --max-batch must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    limits = Limits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens)
    serve(args.checkpoint, host=args.host, port=args.port, api_key=args.api_key or None,
          model_name=args.model_name, limits=limits, device=choose_device(args.device), max_batch=args.max_batch)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        commands = {"train": run_train, "generate": run_generate, "eval": run_eval, "prepare": run_prepare,
                    "export": run_export, "import": run_import, "serve": run_serve}
        return commands[args.command](args)
    except UsageError as err:
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one process reports
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
