"""The run folder a training run starts from: checks on --out, the tokenizer and token splits, and the
checkpoint a fine-tuning run (--init-from) or a resumed run brings along; and the memory a run ends with."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from gpt.checkpoint import (
    CONFIG_FILE,
    MEMORY_FILE,
    STATE_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    configs_from,
    load_checkpoint,
    load_training_state,
    load_weights,
    read_config,
    remove_stale_temporaries,
    save_memory,
    weights_step,
    write_text,
)
from gpt.config import ModelConfig, TrainConfig, UsageError
from gpt.corpus import load_documents, split_documents
from gpt.dataset import TokenSplits, check_lengths, prepare_splits, token_dtype, write_tokens
from gpt.evaluate import Score, score_from_counts, total_nats
from gpt.logs import MetricsLog
from gpt.memory import build_memory, fits, tune_temperature
from gpt.model import GPT
from gpt.predictor import Predictor
from gpt.preflight import check_disk, check_training, run_files, what_to_lower
from gpt.prepare import is_prepared, load_prepared
from gpt.tokenizer import PAD, load_tokenizer, train_tokenizer


def prepare_output(out: Path) -> list[Path]:
    """Make sure `out` is a writable folder; returns the folders it had to create (removed again on bad input)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder path")
    created = [folder for folder in (out, *out.parents) if not folder.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write to {out} ({err.strerror}); pass a writable --out folder") from None
    remove_stale_temporaries(out)
    return created


def remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


def load_initial(init_from: str | Path, model_config: ModelConfig, out: Path, resume: bool) -> Checkpoint:
    """The checkpoint a fine-tuning run starts from; its model shape must be the one asked for.

    Only dropout may differ: it changes training, not the shape of the weights.
    """
    if resume:
        raise UsageError("--init-from starts a new run and --resume continues one; pass only one of them")
    if out.resolve() == Path(init_from).resolve():
        raise UsageError(f"--out {out} is the --init-from checkpoint; train into a new --out folder")
    initial = load_checkpoint(init_from)
    stored = initial.model_config
    model_config.vocab_size, model_config.pad_idx = stored.vocab_size, stored.pad_idx  # the tokenizer's
    differs = [f"{name} {getattr(model_config, name)} vs {getattr(stored, name)}" for name in
               ("sequence_len", "num_layers", "embed_dim", "num_heads", "forward_expansion", "arch")
               if getattr(model_config, name) != getattr(stored, name)]
    if differs:
        raise UsageError(f"the model shape differs from the --init-from checkpoint's ({', '.join(differs)}); "
                         "drop --preset/--config model changes to fine-tune it as it is")
    return initial


def prepare_data(
    model_config: ModelConfig, train_config: TrainConfig, out: Path, data: str | None, resume: bool,
    device: torch.device, tokenizer: Tokenizer | None = None,
) -> tuple[Tokenizer, TokenSplits, dict | None, str | None, int]:
    """Tokenizer (trained, the run's own when resuming, or the given one), token splits, saved state, source and
    the run's memory estimate, now with the memory of the training text (checked before anything is written).

    Fills in the model's vocabulary size and padding id, which the tokenizer decides.
    """
    state = None
    if resume:
        info = read_config(out)
        stored_model, _ = configs_from(info, out)
        state = load_training_state(out)
        tokenizer = load_tokenizer(out / TOKENIZER_FILE)
        model_config.vocab_size, model_config.pad_idx = stored_model.vocab_size, stored_model.pad_idx
        if model_config != stored_model:
            raise UsageError(f"the model config differs from the checkpoint's in {out}; resume without changes "
                             "to the model, or train into a new --out folder")
        data = data or info["data"]
    if is_prepared(data):  # shards from gpt prepare: their tokenizer, read in place
        prepared_tokenizer, splits, _ = load_prepared(data)
        if tokenizer is not None and prepared_tokenizer.to_str() != tokenizer.to_str():
            owner = f"the run in {out}" if resume else "the --init-from checkpoint"
            raise UsageError(f"{data} was tokenized with another tokenizer than {owner}; prepare the data with "
                             "gpt prepare --tokenizer CHECKPOINT/tokenizer.json")
        tokenizer = prepared_tokenizer
    else:
        documents = load_documents(data)
        if tokenizer is None:
            train_docs = split_documents(documents, train_config.val_fraction)[0]
            tokenizer = train_tokenizer(train_docs, train_config.tokenizer_vocab_size)
        splits = prepare_splits(documents, tokenizer, train_config.val_fraction, bpe_dropout=train_config.bpe_dropout,
                                copies=train_config.bpe_copies, seed=train_config.seed,
                                retyped=train_config.retyped_copies)
    if not resume:
        model_config.vocab_size, model_config.pad_idx = tokenizer.get_vocab_size(), tokenizer.token_to_id(PAD)
    check_lengths(splits, model_config.sequence_len)
    remembered = len(splits.plain_train) if fits(len(splits.plain_train), model_config) else 0
    estimate = check_training(model_config, train_config, model_config.vocab_size, device, remembered)
    check_run_disk(out, model_config, train_config, splits, writes_tokens=not is_prepared(data))
    if not is_prepared(data):  # written only now: bad input leaves the folder as it was
        splits.train = write_tokens(out / "data" / "train.bin", splits.train)
        splits.val = write_tokens(out / "data" / "val.bin", splits.val)
    return tokenizer, splits, state, data, estimate


def check_run_disk(out: Path, model_config: ModelConfig, train_config: TrainConfig, splits: TokenSplits,
                   writes_tokens: bool) -> int:
    """Refuse a run whose files cannot fit on the disk of `out`, before the first of them is written."""
    token_bytes = (len(splits.train) + len(splits.val)) * splits.train.dtype.itemsize if writes_tokens else 0
    plain = len(splits.plain_train)
    files = run_files(model_config, train_config, plain, token_bytes)
    replaced = sum(path.stat().st_size for path in (out / WEIGHTS_FILE, out / STATE_FILE, out / MEMORY_FILE,
                                                    out / "data" / "train.bin", out / "data" / "val.bin")
                   if path.is_file())
    model_fix = what_to_lower("", model_config, train_config, model_config.vocab_size)
    fixes = {"the training state": model_fix, "the weights": model_fix,
             "the token data": f"lower train.bpe_copies ({train_config.bpe_copies})",
             "the memory of the training text": "set model.memory_weight = 0 (no memory)"}
    needed = sum(files.values()) + max(files.values()) - replaced  # the largest twice: the atomic replace
    return check_disk(out, files, needed, "this run", fixes)


def set_memory_temperature(out: Path, model_config: ModelConfig, temperature: float) -> None:
    """The memory's temperature for the network a run ends with (a soup's: gpt.soup), in config.json too."""
    model_config.memory_temperature = temperature
    info = read_config(out)
    info["model"]["memory_temperature"] = temperature
    write_text(out / CONFIG_FILE, json.dumps(info, indent=2) + "\n")


def read_prepared(out: Path, data: str | None, model_config: ModelConfig) -> tuple[Tokenizer, TokenSplits]:
    """What rank 0 prepared, as the other ranks of a torchrun job read it (the token files, not the text)."""
    tokenizer = load_tokenizer(out / TOKENIZER_FILE)
    model_config.vocab_size, model_config.pad_idx = tokenizer.get_vocab_size(), tokenizer.token_to_id(PAD)
    data = data or read_config(out)["data"]
    if is_prepared(data):
        return tokenizer, load_prepared(data)[1]
    dtype = token_dtype(model_config.vocab_size)
    train_ids, val_ids = (np.memmap(out / "data" / f"{part}.bin", dtype=dtype, mode="r") for part in ("train", "val"))
    return tokenizer, TokenSplits(train_ids, val_ids, [])


def validation_score(model: GPT | Predictor, splits: TokenSplits, eot: int, stride: int | None,
                     low_precision: torch.dtype | None) -> Score:
    """The validation split scored by `model` (a Predictor with its memory, or a bare network), on rank 0: the
    other torchrun ranks have no character counts (the trainer's own validation, which every FSDP rank runs, sums
    nats first)."""
    return score_from_counts(*total_nats(model, splits.val, eot, stride, autocast_dtype=low_precision),
                             splits.val_chars, splits.val_bytes)


def remember_training_text(
    out: Path, model_config: ModelConfig, splits: TokenSplits, eot: int, stride: int | None, device: torch.device,
    low_precision: torch.dtype | None, metrics: MetricsLog, say, step: int, reserved: float, run_seconds: float,
    tune: bool = False,
) -> None:
    """Build the memory (gpt.memory) of the saved weights over the plain training tokens, save it, and log
    the validation score with and without it, its time against the `reserved` estimate, and the run's time at
    its end (`run_seconds` before this): what --max-time bounds. With `tune` the validation split picks the
    memory's temperature (gpt.memory.tune_temperature), which config.json then records."""
    started = time.perf_counter()
    model = GPT(config=model_config).to(device)
    load_weights(model, out / WEIGHTS_FILE)
    alone = validation_score(model, splits, eot, stride, low_precision)
    memory = build_memory(model, splits.plain_train, eot, stride, low_precision)
    if tune:
        set_memory_temperature(out, model_config, tune_temperature(memory, model, splits.val, eot, stride,
                                                                   low_precision))
    save_memory(out, memory, weights_step(out / WEIGHTS_FILE))
    mixed = validation_score(Predictor(model, memory), splits, eot, stride, low_precision)
    seconds = time.perf_counter() - started
    metrics.write({"step": step, "memory_positions": len(memory), "memory_seconds": round(seconds, 3),
                   "memory_seconds_reserved": round(reserved, 3), "run_seconds": round(run_seconds + seconds, 3),
                   "val_bits_per_char_network": round(alone.bits_per_char, 6),
                   "val_bits_per_char_with_memory": round(mixed.bits_per_char, 6)})
    say(f"memory of the training text: {len(memory):,} positions in {seconds:.0f}s | val bits/char "
        f"{mixed.bits_per_char:.4f} with it, {alone.bits_per_char:.4f} for the network alone", file=sys.stderr)


@dataclass
class EndCosts:
    """Seconds what follows a timed run's last step takes: its validation and checkpoint, then the memory (the
    network scored alone, keys from every plain training token read twice, windows overlapping by half, and
    validation scored with them). Validations and checkpoints time the parts; until they have, the forward
    speed estimates them. The memory's parts are timed only at the validations that build one, so the latest
    validation's speed, which follows this machine's speed now, keeps a floor under them. max_time keeps `reserve`
    seconds for them: a tenth more than timed, since the same work ran up to ~10% slower at a run's end than when
    timed, and one step more, since the loop stops only after the step that crosses the line."""

    val_tokens: int
    train_tokens: int
    network: float = 0.0  # one validation
    keys: float = 0.0  # a memory's keys from windows that do not overlap: every training token read once
    scoring: float = 0.0  # validation scored with a memory
    save: float = 0.0  # one checkpoint
    step: float = 0.0  # one training step
    timed_keys: float = 0.0  # as the last validation with a memory took them
    timed_scoring: float = 0.0

    def estimate(self, per_token: float) -> None:
        """Validation reads its windows about twice; scoring with a memory is about three validations' work."""
        self.network = 2 * self.val_tokens * per_token
        self.keys = max(self.timed_keys, self.train_tokens * per_token)
        self.scoring = max(self.timed_scoring, 3 * self.network)

    def time_memory(self, keys: float, scoring: float) -> None:
        self.keys, self.scoring = self.timed_keys, self.timed_scoring = keys, scoring

    def reserve(self, max_time: float) -> float:
        end = 2 * self.network + self.save + 2 * self.keys + self.scoring
        return min(0.25 * max_time, 1.1 * end + self.step)

    def validation_with_memory(self) -> float:
        """A mid-run validation that also scores with a memory, and the checkpoint after it."""
        return self.network + self.keys + self.scoring + self.save


def validates_with_memory(splits: TokenSplits, model_config: ModelConfig, train_config: TrainConfig,
                          global_batch: int) -> bool:
    """Whether the validations during a run also score with a memory of the weights they validate: when the
    training text is at most a quarter of the tokens trained between two validations, reading it once costs
    about a twelfth of that training (a step is ~3 forward passes), and the log shows what the model scores."""
    trained = train_config.eval_interval * global_batch * model_config.sequence_len
    return fits(len(splits.plain_train), model_config) and 4 * len(splits.plain_train) <= trained


def score_with_memory(model: GPT, splits: TokenSplits, eot: int, stride: int | None,
                      low_precision: torch.dtype | None, tune: bool = False) -> tuple[Score, float, float]:
    """Validation with a memory of the model's current weights, as a run stopped here would score, and the
    seconds its keys and its scoring took (they time the memory built at the end). Its keys come from windows
    that do not overlap: half the work of the saved memory's (0.001 bits/char apart on Alice, docs/training.md).
    With `tune` the validation split picks the memory's temperature first, as at the end (timed with the scoring)."""
    started = time.perf_counter()
    memory = build_memory(model, splits.plain_train, eot, model.config.sequence_len, low_precision)
    built = time.perf_counter()
    if tune:
        tune_temperature(memory, model, splits.val, eot, stride, low_precision)
    score = validation_score(Predictor(model, memory), splits, eot, stride, low_precision)
    return score, built - started, time.perf_counter() - built
