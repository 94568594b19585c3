"""The training loop: AdamW, warmup then cosine decay, clipping, periodic validation, checkpoints.

The schedule runs on progress = max(step / max_steps, elapsed / max_time), so a run limited by
time still warms up, decays to its floor and ends exactly when the budget is spent. The budget
is the whole run's: a resumed run continues from the saved step and elapsed time.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from tokenizers import Tokenizer

from gpt.checkpoint import (
    CONFIG_FILE,
    STATE_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    configs_from,
    load_training_state,
    read_config,
    remove_stale_temporaries,
    save_config,
    save_training_state,
    save_weights,
)
from gpt.config import ModelConfig, TrainConfig, UsageError
from gpt.corpus import load_documents
from gpt.dataset import TokenSplits, WindowSampler, check_lengths, prepare_splits, split_documents, write_tokens
from gpt.evaluate import Score, make_score, total_nats, unigram_score
from gpt.logs import MetricsLog, Progress, plot_losses
from gpt.model import GPT
from gpt.tokenizer import EOT, PAD, load_tokenizer, special_id, train_tokenizer


@dataclass
class RunResult:
    step: int
    best_val_loss: float
    interrupted_by: str | None  # "SIGINT" / "SIGTERM" when stopped early


def choose_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {name} was asked for but no CUDA GPU is available; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device mps was asked for but this PyTorch has no Apple GPU support here; use --device cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device, name: str) -> torch.dtype | None:
    """The low precision to train in, or None for plain float32."""
    if name == "bfloat16":
        return torch.bfloat16
    if name == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def make_optimizer(model: GPT, config: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices (and embeddings) only; biases and LayerNorm gains are left alone."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": others, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    # fused: one kernel for all tensors instead of several per tensor (CPU support arrived in torch 2.4)
    fused = device.type == "cuda" or (device.type == "cpu" and torch_version() >= (2, 4))
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=fused)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def run_progress(step: int, elapsed: float, config: TrainConfig) -> float:
    by_steps = step / config.max_steps if config.max_steps else 0.0
    by_time = elapsed / config.max_time if config.max_time else 0.0
    return max(by_steps, by_time)


def learning_rate(step: int, progress: float, config: TrainConfig) -> float:
    warmup = min(1.0, (step + 1) / max(1, config.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return config.learning_rate * warmup * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


class StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the current step; a second one stops at once."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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


def prepare_data(
    model_config: ModelConfig, train_config: TrainConfig, out: Path, data: str | None, resume: bool
) -> tuple[Tokenizer, TokenSplits, dict | None, str | None]:
    """Tokenizer (trained, or the run's own when resuming), token splits, saved state and data source.

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
    documents = load_documents(data)
    if not resume:
        train_docs = split_documents(documents, train_config.val_fraction)[0]
        tokenizer = train_tokenizer(train_docs, train_config.tokenizer_vocab_size)
        model_config.vocab_size, model_config.pad_idx = tokenizer.get_vocab_size(), special_id(tokenizer, PAD)
    splits = prepare_splits(documents, tokenizer, train_config.val_fraction)
    check_lengths(splits, model_config.sequence_len)
    splits.train = write_tokens(out / "data" / "train.bin", splits.train)
    splits.val = write_tokens(out / "data" / "val.bin", splits.val)
    return tokenizer, splits, state, data


def train(
    model_config: ModelConfig, train_config: TrainConfig, out: str | Path, data: str | None = None,
    resume: bool = False, show_progress: bool = True,
) -> RunResult:
    """Train from scratch (or resume the run in `out`) and keep its checkpoint in `out`."""
    out = Path(out)
    train_config.validate()
    model_config.validate()
    if train_config.eval_stride is not None and train_config.eval_stride > model_config.sequence_len:
        raise UsageError(f"train.eval_stride ({train_config.eval_stride}) must not exceed model.sequence_len "
                         f"({model_config.sequence_len})")
    device = choose_device(train_config.device)
    created = prepare_output(out)
    try:
        tokenizer, splits, state, data = prepare_data(model_config, train_config, out, data, resume)
    except UsageError:
        remove_empty(created)
        raise
    eot = special_id(tokenizer, EOT)

    low_precision = autocast_dtype(device, train_config.dtype)
    torch.manual_seed(train_config.seed)
    model = GPT(config=model_config).to(device)
    optimizer = make_optimizer(model, train_config)
    step, elapsed, best_val = 0, 0.0, math.inf
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise UsageError(f"{out / STATE_FILE} does not fit the model in {out / CONFIG_FILE} "
                             f"({first_line(err)}); train again without --resume") from None
        step, elapsed, best_val = state["step"], state["elapsed"], state["best_val_loss"]
    else:
        save_config(out, model_config, train_config, tokenizer, str(Path(data).resolve()) if data else "alice")

    say = print if show_progress else (lambda *a, **k: None)
    unigram = unigram_score(splits.train, splits.val, splits.val_text, eot, model_config.vocab_size)
    say(f"{model.num_params() / 1e6:.2f}M parameters | {len(splits.train):,} training tokens, "
        f"{len(splits.val):,} validation tokens | device {device}"
        f"{' bf16' if low_precision else ''} | a unigram model scores val loss {unigram.loss:.3f} "
        f"({unigram.bits_per_char:.3f} bits/char)", file=sys.stderr)
    if resume and run_progress(step, elapsed, train_config) >= 1.0:
        raise UsageError(f"the run in {out} already reached its limit (step {step}, {elapsed:.0f}s); pass a larger "
                         "--max-steps or --max-time to train further")
    if resume:
        say(f"resuming at step {step} ({elapsed:.0f}s already trained)", file=sys.stderr)

    def validate() -> Score | None:
        """A failed validation (out of memory, say) costs one score, never the run."""
        try:
            nats, count = total_nats(model, splits.val, eot, train_config.eval_stride, autocast_dtype=low_precision)
        except Exception as err:
            print(f"warning: validation failed at step {step} ({first_line(err)}); training goes on and the "
                  "checkpoint is still saved", file=sys.stderr)
            return None
        return make_score(nats, count, splits.val_text)

    def checkpoint(val_loss: float | None, validation_failed: bool) -> None:
        nonlocal best_val
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise UsageError(diverged(f"the weights became NaN or infinite at step {step}", out))
        try:
            if val_loss is not None and val_loss < best_val:
                save_weights(out, model, {"step": str(step), "val_loss": f"{val_loss:.6f}"})
                best_val = val_loss
            elif validation_failed and not (out / WEIGHTS_FILE).exists():  # keep the run usable
                save_weights(out, model, {"step": str(step), "val_loss": "unknown"})
            save_training_state(out, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "elapsed": elapsed, "best_val_loss": best_val, "rng": torch.get_rng_state(),
            })
        except (OSError, RuntimeError, SafetensorError) as err:
            raise UsageError(f"could not save the checkpoint in {out} at step {step} ({first_line(err)}); the "
                             "previous checkpoint is kept: free disk space (or fix the folder), then continue "
                             f"with gpt train --resume --out {out}") from None

    sampler = WindowSampler(splits.train, model_config.sequence_len, train_config.batch_size, train_config.seed)
    tokens_per_step = train_config.batch_size * model_config.sequence_len
    metrics = MetricsLog(out / "metrics.jsonl", resume_after_step=step if resume else None)
    bar = Progress(run_progress(step, elapsed, train_config), enabled=show_progress)
    model.train()
    started = time.perf_counter() - elapsed
    window_start, window_steps, val_loss = time.perf_counter(), 0, None
    with StopSignals() as stop, metrics, bar:
        finished = run_progress(step, elapsed, train_config) >= 1.0
        while not finished and not stop.received:
            progress = run_progress(step, elapsed, train_config)
            lr = learning_rate(step, progress, train_config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = (t.to(device, non_blocking=True) for t in sampler.batch(step))
            with torch.autocast(device.type, dtype=low_precision, enabled=low_precision is not None):
                loss = model.loss(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1
            elapsed = time.perf_counter() - started
            finished = run_progress(step, elapsed, train_config) >= 1.0
            evaluating = step % train_config.eval_interval == 0 or finished or stop.received is not None
            logging = step % train_config.log_interval == 0 or evaluating
            saving = evaluating or step % train_config.checkpoint_interval == 0
            if not (logging or saving):
                continue
            train_loss = loss.item()
            if not math.isfinite(train_loss):
                raise UsageError(diverged(f"the training loss became {train_loss} at step {step}", out))
            score = validate() if evaluating else None
            if logging:
                speed = window_steps * tokens_per_step / max(time.perf_counter() - window_start, 1e-9)
                row = {"step": step, "train_loss": round(train_loss, 6), "lr": lr,
                       "tokens_seen": step * tokens_per_step, "elapsed": round(elapsed, 3),
                       "tokens_per_s": round(speed)}
                if score is not None:
                    val_loss = score.loss
                    row.update(val_loss=round(score.loss, 6), val_bits_per_char=round(score.bits_per_char, 6))
                metrics.write(row)
                bar.update(run_progress(step, elapsed, train_config), step=step, loss=f"{train_loss:.3f}",
                           val="-" if val_loss is None else f"{val_loss:.3f}", tok_s=f"{speed:,.0f}")
            if saving:
                checkpoint(score.loss if score else None, validation_failed=evaluating and score is None)
                window_start, window_steps = time.perf_counter(), 0
    plot_losses(out / "metrics.jsonl", out / "loss.png")
    if stop.received:
        say(f"stopped by {stop.received} at step {step}; checkpoint saved. Continue with: "
            f"gpt train --resume --out {out}", file=sys.stderr)
    else:
        say(f"done: step {step}, best val loss {best_val:.4f}; checkpoint in {out}", file=sys.stderr)
    return RunResult(step, best_val, stop.received)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def diverged(what: str, out: Path) -> str:
    return (f"{what}; training stopped and the last good checkpoint in {out} is kept: lower train.learning_rate "
            "(or raise train.warmup_steps) in a --config file and train again")
