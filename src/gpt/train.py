"""The training loop: AdamW on a schedule (gpt.optim), clipping, periodic validation, checkpoints.

The budget is the whole run's: a resumed run continues from the saved step and elapsed time.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from tokenizers import Tokenizer

from gpt import distributed
from gpt.averaging import start_average
from gpt.checkpoint import (
    CONFIG_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    load_training_state,
    save_config,
    save_training_state,
    save_weights,
)
from gpt.config import ModelConfig, TrainConfig, UsageError, first_line
from gpt.dataset import TokenSplits, WindowSampler
from gpt.evaluate import Score, score_from_counts, total_nats, unigram_score
from gpt.hardware import autocast_dtype, choose_device, compile_step, compiles, peak_flops
from gpt.logs import MetricsLog, Progress, plot_losses, run_banner
from gpt.memory import fits
from gpt.model import GPT, lm_loss
from gpt.optim import make_optimizer, micro_seed, replaces_kept, run_progress
from gpt.preflight import check_training
from gpt.runfolder import (
    EndCosts,
    load_initial,
    prepare_data,
    prepare_output,
    read_prepared,
    remember_training_text,
    remove_empty,
    score_with_memory,
    validates_with_memory,
)
from gpt.soup import Soup
from gpt.tokenizer import EOT, special_id


@dataclass
class RunResult:
    step: int
    best_val_loss: float
    interrupted_by: str | None  # "SIGINT" / "SIGTERM" when stopped early


def train(
    model_config: ModelConfig, train_config: TrainConfig, out: str | Path, data: str | None = None,
    resume: bool = False, show_progress: bool = True, init_from: str | Path | None = None, overwrite: bool = False,
) -> RunResult:
    """Train from scratch (or resume the run in `out`) and keep its checkpoint in `out`.

    A new run refuses an `out` that already holds a trained model unless `overwrite` is set: starting
    over in the wrong folder would silently replace hours of training.

    `init_from` fine-tunes: the weights, model config and tokenizer of that checkpoint, trained on `data`
    with a fresh optimizer and schedule. Under torchrun, every process calls this; rank 0 prepares the
    data, logs and saves.
    """
    out = Path(out)
    train_config.validate()
    model_config.validate()
    if train_config.eval_stride is not None and train_config.eval_stride > model_config.sequence_len:
        raise UsageError(f"train.eval_stride ({train_config.eval_stride}) must not exceed model.sequence_len "
                         f"({model_config.sequence_len})")
    if resume and overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it; pass only one of them")
    if not resume and not overwrite and (out / WEIGHTS_FILE).exists():
        raise UsageError(f"--out {out} already holds a trained model; continue it with --resume, train into a new "
                         "--out folder, or pass --overwrite to replace it")
    vocab = model_config.vocab_size if resume or init_from is not None else train_config.tokenizer_vocab_size
    device = choose_device(train_config.device)
    estimate = check_training(model_config, train_config, vocab, device)
    initial = None if init_from is None else load_initial(init_from, model_config, out, resume)
    if initial is not None:
        train_config.tokenizer_vocab_size = initial.tokenizer.get_vocab_size()
    world, device = distributed.start(device, train_config.fsdp)
    try:
        return _train(model_config, train_config, out, data, resume, show_progress and world.is_main, world, device,
                      initial, init_from, estimate)
    finally:
        distributed.stop(world)


def _train(model_config: ModelConfig, train_config: TrainConfig, out: Path, data: str | None, resume: bool,
           show_progress: bool, world: distributed.World, device: torch.device,
           initial: Checkpoint | None, init_from: str | Path | None, estimate: int) -> RunResult:
    tokenizer, splits, state, estimate = _prepare(model_config, train_config, out, data, resume, world, device,
                                                  initial, init_from, estimate)
    run = Run(model_config, train_config, out, world, device, splits, special_id(tokenizer, EOT), show_progress)
    run.restore(state, initial)
    if resume and run.progress() >= 1.0:
        raise UsageError(f"the run in {out} already reached its limit (step {run.step}, {run.elapsed:.0f}s); pass a "
                         "larger --max-steps or --max-time to train further")
    run.announce(estimate, resume)
    return run.train(resume)


def _prepare(model_config: ModelConfig, train_config: TrainConfig, out: Path, data: str | None, resume: bool,
             world: distributed.World, device: torch.device, initial: Checkpoint | None,
             init_from: str | Path | None, estimate: int) -> tuple[Tokenizer, TokenSplits, dict | None, int]:
    """Rank 0 tokenizes the text (or reads the prepared data) and writes the run's config; the others then read it.
    Returns rank 0's memory estimate with the memory of the training text, the others' `estimate` as it was."""
    failure = None
    if world.is_main:
        created = prepare_output(out)
        try:
            tokenizer, splits, state, data, estimate = prepare_data(
                model_config, train_config, out, data, resume, device, initial.tokenizer if initial else None)
            if not resume:  # before the barrier: the other ranks read the tokenizer from it
                source = {"init_from": str(Path(init_from).resolve())} if init_from is not None else None
                save_config(out, model_config, train_config, tokenizer, str(Path(data).resolve()) if data else "alice",
                            extra=source)
        except UsageError as err:
            remove_empty(created)
            failure = str(err)
    failure = distributed.share(failure, world)  # also the barrier: the data is ready when this returns
    if failure:
        raise UsageError(failure)
    if not world.is_main:
        tokenizer, splits = read_prepared(out, data, model_config)
        state = load_training_state(out) if resume else None
    return tokenizer, splits, state, estimate


class Run:
    """What the phases of a run share: set-up (here and `restore`), one optimizer step, validation, saving and
    the end. `train` is the loop over them; under torchrun every process holds one."""

    def __init__(self, model_config: ModelConfig, config: TrainConfig, out: Path, world: distributed.World,
                 device: torch.device, splits: TokenSplits, eot: int, show_progress: bool):
        self.model_config, self.config, self.out, self.world, self.device = model_config, config, out, world, device
        self.splits, self.eot, self.show_progress = splits, eot, show_progress
        self.say = print if show_progress else (lambda *a, **k: None)
        self.low_precision = autocast_dtype(device, config.dtype)
        torch.manual_seed(config.seed)
        self.model = GPT(config=model_config).to(device)
        self.wrapped = distributed.wrap(self.model, world, device)
        self.compiled = compiles(device, config.compile)
        # validation runs the plain model
        self.step_forward = compile_step(self.wrapped, device, world) if self.compiled else self.wrapped
        self.optimizer = make_optimizer(self.model, config)
        self.step, self.elapsed, self.windows_seen, self.lr = 0, 0.0, 0, config.learning_rate
        # the kept weights' val loss and val bits/char with a memory (inf: none scored them with one)
        self.best_val, self.best_mixed, self.val_loss = math.inf, math.inf, None
        self.global_batch = config.batch_size * config.grad_accum * world.size
        self.tokens_per_step = self.global_batch * model_config.sequence_len
        self.remembering = world.is_main and fits(len(splits.plain_train), model_config)
        # under FSDP rank 0 cannot run its sharded model alone; the memory at the end loads the saved weights
        self.mid_run_memory = self.remembering and not world.fsdp and validates_with_memory(
            splits, model_config, config, self.global_batch)
        self.reserve, self.reserve_timed = 0.0, False  # seconds of max_time kept for the end; whether timed
        self.costs = EndCosts(len(splits.val), len(splits.plain_train))
        # no estimate for cores shared by several processes, nor for bf16 (the peak is fp32's)
        self.peak = peak_flops(device) if world.size == 1 and self.low_precision is None else None
        self.flops_per_token = self.model.flops_per_token()
        self.average, self.metrics, self.started = None, None, 0.0
        self.soup = Soup(config, world.fsdp)

    def restore(self, state: dict | None, initial: Checkpoint | None) -> None:
        """Continue from a saved training state, or start from another checkpoint's weights (`--init-from`)."""
        if state is not None:
            try:
                distributed.load_state(self.wrapped, self.model, self.optimizer, state["model"], state["optimizer"],
                                       self.world)
                torch.set_rng_state(state["rng"])
            except (RuntimeError, ValueError, KeyError, TypeError) as err:
                raise UsageError(f"{self.out / STATE_FILE} does not fit the model in {self.out / CONFIG_FILE} "
                                 f"({first_line(err)}); train again without --resume") from None
            self.step, self.elapsed, self.best_val = state["step"], state["elapsed"], state["best_val_loss"]
            self.best_mixed = state.get("best_val_bits_with_memory", math.inf)
            self.windows_seen = state.get("windows_seen", self.step * self.config.batch_size)
            self.soup.load_state_dict(state.get("soup", {}))
        elif initial is not None:
            self.model.load_state_dict(initial.model.state_dict())
        self.average = start_average(self.model, self.config.weight_average, self.world.fsdp, state)

    def announce(self, estimate: int, resume: bool) -> None:
        splits, config, world = self.splits, self.config, self.world
        if world.is_main:
            unigram = unigram_score(splits.train, splits.val, splits.val_text, self.eot, self.model_config.vocab_size) \
                if splits.val_text else None
            where = f"{self.device}{' bf16' if self.low_precision else ''}{' compiled' if self.compiled else ''}"
            self.say(run_banner(self.model.num_params(), len(splits.train), len(splits.val), splits.copies,
                                config.bpe_dropout, where, unigram, self.peak, estimate), file=sys.stderr)
        if world.size > 1 or config.grad_accum > 1:
            self.say(f"global batch {self.global_batch} windows = {config.batch_size} per micro-step x "
                     f"{config.grad_accum} micro-steps x {world.size} processes{' (FSDP)' if world.fsdp else ''}",
                     file=sys.stderr)
        if resume:
            self.say(f"resuming at step {self.step} ({self.elapsed:.0f}s already trained)", file=sys.stderr)

    def progress(self) -> float:
        return run_progress(self.step, self.elapsed, self.config, self.reserve)

    def train(self, resume: bool) -> RunResult:
        config, world = self.config, self.world
        sampler = WindowSampler(self.splits.train, self.model_config.sequence_len, self.global_batch, config.seed)
        if world.is_main:
            self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_after_step=self.step if resume else None)
        bar = Progress(self.progress(), enabled=self.show_progress)
        sync_every = config.log_interval if world.active else 1  # ranks agree on time and signals this often
        self.model.train()
        self.started = time.perf_counter() - self.elapsed
        window_start, window_steps, stopping = time.perf_counter(), 0, False
        with distributed.StopSignals() as stop, self.metrics or contextlib.nullcontext(), bar:
            finished = self.progress() >= 1.0
            while not finished and not stopping:
                loss = self.optimizer_step(sampler)
                window_steps += 1
                if self.step % sync_every == 0 or (config.max_steps and self.step >= config.max_steps):
                    self.elapsed, signalled, self.reserve = distributed.agree(
                        [time.perf_counter() - self.started, float(bool(stop.received)), self.reserve], world)
                    stopping = signalled > 0
                self.note(self.soup.after_step(self.model, self.optimizer, self.step, self.progress()))
                finished = self.progress() >= 1.0
                evaluating = self.step % config.eval_interval == 0 or finished or stopping
                logging = self.step % config.log_interval == 0 or evaluating
                saving = evaluating or self.step % config.checkpoint_interval == 0
                if not (logging or saving):
                    continue
                speed = window_steps * self.tokens_per_step / max(time.perf_counter() - window_start, 1e-9)
                self.report(loss, speed, evaluating, logging, saving, finished or stopping, bar)
                if evaluating and not finished and config.max_time:  # one that ran past the time is the last
                    self.elapsed, self.reserve = distributed.agree(
                        [time.perf_counter() - self.started, self.reserve], world)
                    finished = self.progress() >= 1.0 and not self.soup.pending  # else one step more: the average
                window_start, window_steps = time.perf_counter(), 0
            if self.remembering and not stopping and (self.out / WEIGHTS_FILE).exists():
                remember_training_text(self.out, self.model_config, self.splits, self.eot, config.eval_stride,
                                       self.device, self.low_precision, self.metrics, self.say, self.step,
                                       self.reserve, time.perf_counter() - self.started, config.tune_memory_temperature)
        return self.end((stop.received or "SIGTERM") if stopping else None)

    def optimizer_step(self, sampler: WindowSampler) -> torch.Tensor:
        """One AdamW step on the global batch: this process's micro-batches, gradients synced on the last one.
        Returns the mean loss as a tensor, so that the step is not waited for unless it is logged."""
        config, world = self.config, self.world
        self.lr = self.soup.learning_rate(self.step, self.progress())
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        micro, accum = config.batch_size, config.grad_accum
        starts = sampler.starts_at(self.windows_seen, self.global_batch)
        loss_sum = torch.zeros((), device=self.device)
        for j in range(accum):
            index = j * world.size + world.rank  # this rank's micro-batch within the global batch
            x, y = (t.to(self.device, non_blocking=True) for t in sampler.windows(starts[index * micro:][:micro]))
            torch.manual_seed(micro_seed(config.seed, self.step, index))
            with distributed.gradient_sync(self.wrapped, world, enabled=j == accum - 1):
                with torch.autocast(self.device.type, dtype=self.low_precision, enabled=self.low_precision is not None):
                    loss = lm_loss(self.step_forward(x), y, self.model_config.pad_idx)
                (loss / accum).backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.windows_seen += self.global_batch
        if self.average is not None:
            self.average.update(self.step)
        return loss_sum / accum

    def report(self, loss: torch.Tensor, speed: float, evaluating: bool, logging: bool, saving: bool, last: bool,
               bar: Progress) -> None:
        """After a step that logs, validates or saves: the train loss (waiting for the step), the time kept for the
        end, the validation (with a memory when there is time for one), the metrics row and the checkpoint."""
        config = self.config
        train_loss = distributed.average(loss, self.world).item()  # waits for the step to finish
        if not math.isfinite(train_loss):
            raise UsageError(diverged(f"the training loss became {train_loss} at step {self.step}", self.out))
        if self.remembering and config.max_time:
            self.costs.step = self.tokens_per_step / speed
            if not self.reserve_timed:  # a step: ~3 forward passes
                self.costs.estimate(1 / (3 * speed))
            self.reserve = self.costs.reserve(config.max_time)
        # a memory that would run into the time kept for the end is left out of this validation
        with_memory = self.mid_run_memory and not last and not (config.max_time and run_progress(
            self.step, self.elapsed + self.costs.validation_with_memory(), config, self.reserve) >= 1)
        score, mixed, validated = self.validate(with_memory) \
            if evaluating and (self.world.is_main or self.world.fsdp) else (None, None, True)
        if logging:
            self.log(train_loss, speed, score, mixed, bar)
        if saving:
            self.checkpoint(score.loss if score else None, mixed.bits_per_char if mixed else None,
                            validation_failed=not validated)

    def note(self, event: str | None) -> None:
        if event and self.world.is_main:
            self.metrics.write({"step": self.step, "soup": event})
            self.say(event, file=sys.stderr)

    def log(self, train_loss: float, speed: float, score: Score | None, mixed: Score | None, bar: Progress) -> None:
        row = {"step": self.step, "train_loss": round(train_loss, 6), "lr": self.lr,
               "tokens_seen": self.windows_seen * self.model_config.sequence_len, "elapsed": round(self.elapsed, 3),
               "tokens_per_s": round(speed)}
        if self.peak:
            row["mfu"] = round(self.flops_per_token * speed / self.peak.flops, 4)
        if score is not None:
            self.val_loss = score.loss
            row.update(val_loss=round(score.loss, 6), val_bits_per_char=round(score.bits_per_char, 6))
        if mixed is not None:  # the end's memory row has the final one
            row["val_bits_per_char_with_memory"] = round(mixed.bits_per_char, 6)
        if self.world.is_main:
            self.metrics.write(row)
        bar.update(self.progress(), step=self.step, loss=f"{train_loss:.3f}",
                   val="-" if self.val_loss is None else f"{self.val_loss:.3f}", tok_s=f"{speed:,.0f}",
                   **({"mfu": f"{100 * row['mfu']:.0f}%"} if self.peak else {}))

    def validate(self, with_memory: bool) -> tuple[Score | None, Score | None, bool]:
        """(score on rank 0, the score with a memory of these weights or None, whether it worked): a failed
        validation (out of memory, say) never costs the run."""
        started_at = time.perf_counter()
        try:
            with self.average.swapped_in() if self.average else contextlib.nullcontext():
                nats, count = total_nats(self.model, self.splits.val, self.eot, self.config.eval_stride,
                                         autocast_dtype=self.low_precision)
                network_seconds = time.perf_counter() - started_at
                mixed, keys, scoring = score_with_memory(self.model, self.splits, self.eot, self.config.eval_stride,
                                                         self.low_precision, self.config.tune_memory_temperature
                                                         ) if with_memory else (None, None, None)
        except Exception as err:
            if self.world.is_main:
                print(f"warning: validation failed at step {self.step} ({first_line(err)}); training goes on and "
                      "the checkpoint is still saved", file=sys.stderr)
            return None, None, False
        if self.remembering and self.config.max_time:
            self.costs.estimate(network_seconds / (2 * len(self.splits.val)))
            if with_memory:
                self.costs.time_memory(keys, scoring)
            self.reserve, self.reserve_timed = self.costs.reserve(self.config.max_time), True
        splits = self.splits
        score = score_from_counts(nats, count, splits.val_chars, splits.val_bytes) if self.world.is_main else None
        return score, mixed, True

    def checkpoint(self, val_loss: float | None, mixed_bits: float | None, validation_failed: bool) -> None:
        """Save the training state, and the weights where this validation beats the kept ones' (atomically)."""
        started_at, out, model = time.perf_counter(), self.out, self.model
        broken = not all(bool(torch.isfinite(p).all()) for p in model.parameters())
        if distributed.agree([float(broken)], self.world)[0]:
            raise UsageError(diverged(f"the weights became NaN or infinite at step {self.step}", out))
        model_state, optimizer_state = distributed.full_state(self.wrapped, model, self.optimizer, self.world)
        weights = model_state
        if self.average is not None:  # validated and saved: the average; resumed from: the raw weights
            with self.average.swapped_in():
                weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        failure = None
        if self.world.is_main:
            try:
                if replaces_kept(val_loss, mixed_bits, self.best_val, self.best_mixed):
                    save_weights(out, weights, {"step": str(self.step), "val_loss": f"{val_loss:.6f}"})
                    self.best_val, self.best_mixed = val_loss, math.inf if mixed_bits is None else mixed_bits
                elif validation_failed and not (out / WEIGHTS_FILE).exists():  # keep the run usable
                    save_weights(out, weights, {"step": str(self.step), "val_loss": "unknown"})
                save_training_state(out, {
                    "model": model_state, "optimizer": optimizer_state, "step": self.step, "elapsed": self.elapsed,
                    "best_val_loss": self.best_val, "best_val_bits_with_memory": self.best_mixed,
                    "windows_seen": self.windows_seen, "rng": torch.get_rng_state(),
                    **({"average": self.average.state_dict()} if self.average else {}), "soup": self.soup.state_dict(),
                })
            except (OSError, RuntimeError, SafetensorError) as err:
                failure = (f"could not save the checkpoint in {out} at step {self.step} ({first_line(err)}); the "
                           f"previous checkpoint is kept: free disk space (or fix the folder), then continue with "
                           f"gpt train --resume --out {out}")
        failure = distributed.share(failure, self.world)
        if failure:
            raise UsageError(failure)
        self.costs.save = time.perf_counter() - started_at
        if self.remembering and self.config.max_time:
            self.reserve = self.costs.reserve(self.config.max_time)

    def end(self, interrupted_by: str | None) -> RunResult:
        if self.world.is_main:
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
        if interrupted_by:
            self.say(f"stopped by {interrupted_by} at step {self.step}; checkpoint saved. Continue with: "
                     f"gpt train --resume --out {self.out}", file=sys.stderr)
        else:
            self.say(f"done: step {self.step}, kept weights' val loss {self.best_val:.4f}; checkpoint in {self.out}",
                     file=sys.stderr)
        return RunResult(self.step, self.best_val, interrupted_by)


def diverged(what: str, out: Path) -> str:
    return (f"{what}; training stopped and the last good checkpoint in {out} is kept: lower train.learning_rate "
            "(or raise train.warmup_steps) in a --config file and train again")
