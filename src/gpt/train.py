"""The training loop: AdamW, warmup then cosine decay, clipping, periodic validation, checkpoints.

The schedule runs on progress = max(step / max_steps, elapsed / max_time), so a run limited by
time still warms up, decays to its floor and ends exactly when the budget is spent. The budget
is the whole run's: a resumed run continues from the saved step and elapsed time.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

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
from gpt.dataset import WindowSampler
from gpt.evaluate import Score, score_from_counts, total_nats, unigram_score
from gpt.hardware import autocast_dtype, choose_device, compiles, peak_flops
from gpt.logs import MetricsLog, Progress, plot_losses, run_banner
from gpt.memory import fits
from gpt.model import GPT, lm_loss
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
from gpt.tokenizer import EOT, special_id


@dataclass
class RunResult:
    step: int
    best_val_loss: float
    interrupted_by: str | None  # "SIGINT" / "SIGTERM" when stopped early


def compile_step(module: torch.nn.Module, device: torch.device, world: distributed.World) -> torch.nn.Module:
    """On one GPU, CUDA graphs ("reduce-overhead") replay the step's kernels without launching each from Python:
    the default preset's step ran 2.1-2.4x faster than with plain compile on an H200 (docs/benchmarks.md). Under
    torchrun the plain mode, since the graphs would hold the gradient all-reduce hooks of DDP/FSDP."""
    mode = "reduce-overhead" if device.type == "cuda" and not world.active else None
    return torch.compile(module, mode=mode)


def make_optimizer(model: GPT, config: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices (and embeddings) only; biases and LayerNorm gains are left alone."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": others, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    # fused: one kernel for all tensors instead of several per tensor (CPU support arrived in torch 2.4)
    torch_version = tuple(int(part) for part in torch.__version__.split(".")[:2])
    fused = device.type == "cuda" or (device.type == "cpu" and torch_version >= (2, 4))
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=fused)


def run_progress(step: int, elapsed: float, config: TrainConfig, reserve: float = 0.0) -> float:
    """How far the run is, 0 to 1; `reserve` seconds of max_time are kept for the memory built at the end."""
    by_steps = step / config.max_steps if config.max_steps else 0.0
    by_time = elapsed / (config.max_time - reserve) if config.max_time else 0.0
    return max(by_steps, by_time)


def learning_rate(step: int, progress: float, config: TrainConfig) -> float:
    warmup = min(1.0, (step + 1) / max(1, config.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return config.learning_rate * warmup * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def replaces_kept(val_loss: float | None, mixed_bits: float | None, kept_loss: float, kept_mixed: float) -> bool:
    """Whether a validation's weights replace the kept ones. Scored with a memory, they are judged by that
    score, the one `gpt eval` reports: with a memory the best weights come later than the network's best (round 19
    of docs/training.md). A validation without one is judged by the network's loss against the kept weights'."""
    if val_loss is None:
        return False
    return mixed_bits < kept_mixed if mixed_bits is not None else val_loss < kept_loss


def micro_seed(seed: int, step: int, micro_batch: int) -> int:
    """Dropout masks are a function of the data position, so the split into processes and micro-steps
    does not change the run, and a resumed run draws the same masks."""
    return int(np.random.SeedSequence([seed, step, micro_batch]).generate_state(1, np.uint64)[0] >> 1)


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
    failure = None
    if world.is_main:
        created = prepare_output(out)
        try:
            tokenizer, splits, state, data = prepare_data(model_config, train_config, out, data, resume,
                                                          initial.tokenizer if initial else None)
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
    eot = special_id(tokenizer, EOT)

    low_precision = autocast_dtype(device, train_config.dtype)
    torch.manual_seed(train_config.seed)
    model = GPT(config=model_config).to(device)
    wrapped = distributed.wrap(model, world, device)
    compiled = compiles(device, train_config.compile)
    step_forward = compile_step(wrapped, device, world) if compiled else wrapped  # validation runs the plain model
    optimizer = make_optimizer(model, train_config)
    step, elapsed, best_val, windows_seen = 0, 0.0, math.inf, 0
    best_mixed = math.inf  # the kept weights' val bits/char with a memory; inf: none scored them with one
    if state is not None:
        try:
            distributed.load_state(wrapped, model, optimizer, state["model"], state["optimizer"], world)
            torch.set_rng_state(state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise UsageError(f"{out / STATE_FILE} does not fit the model in {out / CONFIG_FILE} "
                             f"({first_line(err)}); train again without --resume") from None
        step, elapsed, best_val = state["step"], state["elapsed"], state["best_val_loss"]
        best_mixed = state.get("best_val_bits_with_memory", math.inf)
        windows_seen = state.get("windows_seen", step * train_config.batch_size)
    elif initial is not None:
        model.load_state_dict(initial.model.state_dict())
    average = start_average(model, train_config.weight_average, world.fsdp, state)

    micro, accum = train_config.batch_size, train_config.grad_accum
    global_batch = micro * accum * world.size
    say = print if show_progress else (lambda *a, **k: None)
    # no estimate for cores shared by several processes, nor for bf16 (the peak is fp32's)
    peak = peak_flops(device) if world.size == 1 and low_precision is None else None
    if world.is_main:
        unigram = unigram_score(splits.train, splits.val, splits.val_text, eot, model_config.vocab_size) \
            if splits.val_text else None
        say(run_banner(model.num_params(), len(splits.train), len(splits.val), splits.copies, train_config.bpe_dropout,
                       f"{device}{' bf16' if low_precision else ''}{' compiled' if compiled else ''}", unigram, peak,
                       estimate),
            file=sys.stderr)
    if world.size > 1 or accum > 1:
        say(f"global batch {global_batch} windows = {micro} per micro-step x {accum} micro-steps x "
            f"{world.size} processes{' (FSDP)' if world.fsdp else ''}", file=sys.stderr)
    remembering = world.is_main and fits(len(splits.plain_train), model_config)
    # under FSDP rank 0 cannot run its sharded model alone; the memory at the end loads the saved weights
    mid_run_memory = remembering and not world.fsdp and validates_with_memory(splits, model_config, train_config,
                                                                              global_batch)
    reserve, reserve_timed = 0.0, False  # seconds of max_time kept for the end; whether a validation timed it
    costs = EndCosts(len(splits.val), len(splits.plain_train))

    def progress() -> float:
        return run_progress(step, elapsed, train_config, reserve)

    if resume and progress() >= 1.0:
        raise UsageError(f"the run in {out} already reached its limit (step {step}, {elapsed:.0f}s); pass a larger "
                         "--max-steps or --max-time to train further")
    if resume:
        say(f"resuming at step {step} ({elapsed:.0f}s already trained)", file=sys.stderr)

    def validate(with_memory: bool) -> tuple[Score | None, Score | None, bool]:
        """(score on rank 0, the score with a memory of these weights or None, whether it worked): a failed
        validation (out of memory, say) never costs the run."""
        nonlocal reserve, reserve_timed
        started_at = time.perf_counter()
        try:
            with average.swapped_in() if average else contextlib.nullcontext():
                nats, count = total_nats(model, splits.val, eot, train_config.eval_stride,
                                         autocast_dtype=low_precision)
                network_seconds = time.perf_counter() - started_at
                mixed, keys, scoring = score_with_memory(model, splits, eot, train_config.eval_stride,
                                                         low_precision) if with_memory else (None, None, None)
        except Exception as err:
            if world.is_main:
                print(f"warning: validation failed at step {step} ({first_line(err)}); training goes on and the "
                      "checkpoint is still saved", file=sys.stderr)
            return None, None, False
        if remembering and train_config.max_time:
            costs.estimate(network_seconds / (2 * len(splits.val)))
            if with_memory:
                costs.time_memory(keys, scoring)
            reserve, reserve_timed = costs.reserve(train_config.max_time), True
        score = score_from_counts(nats, count, splits.val_chars, splits.val_bytes) if world.is_main else None
        return score, mixed, True

    def checkpoint(val_loss: float | None, mixed_bits: float | None, validation_failed: bool) -> None:
        nonlocal best_val, best_mixed, reserve
        started_at = time.perf_counter()
        broken = not all(bool(torch.isfinite(p).all()) for p in model.parameters())
        if distributed.agree([float(broken)], world)[0]:
            raise UsageError(diverged(f"the weights became NaN or infinite at step {step}", out))
        model_state, optimizer_state = distributed.full_state(wrapped, model, optimizer, world)
        weights = model_state
        if average is not None:  # validated and saved: the average; resumed from: the raw weights
            with average.swapped_in():
                weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        failure = None
        if world.is_main:
            try:
                if replaces_kept(val_loss, mixed_bits, best_val, best_mixed):
                    save_weights(out, weights, {"step": str(step), "val_loss": f"{val_loss:.6f}"})
                    best_val, best_mixed = val_loss, math.inf if mixed_bits is None else mixed_bits
                elif validation_failed and not (out / WEIGHTS_FILE).exists():  # keep the run usable
                    save_weights(out, weights, {"step": str(step), "val_loss": "unknown"})
                save_training_state(out, {
                    "model": model_state, "optimizer": optimizer_state, "step": step, "elapsed": elapsed,
                    "best_val_loss": best_val, "best_val_bits_with_memory": best_mixed, "windows_seen": windows_seen,
                    "rng": torch.get_rng_state(),
                    **({"average": average.state_dict()} if average else {}),
                })
            except (OSError, RuntimeError, SafetensorError) as err:
                failure = (f"could not save the checkpoint in {out} at step {step} ({first_line(err)}); the previous "
                           f"checkpoint is kept: free disk space (or fix the folder), then continue with gpt train "
                           f"--resume --out {out}")
        failure = distributed.share(failure, world)
        if failure:
            raise UsageError(failure)
        costs.save = time.perf_counter() - started_at
        reserve = costs.reserve(train_config.max_time) if remembering and train_config.max_time else reserve

    sampler = WindowSampler(splits.train, model_config.sequence_len, global_batch, train_config.seed)
    tokens_per_step = global_batch * model_config.sequence_len
    flops_per_token = model.flops_per_token()
    metrics = MetricsLog(out / "metrics.jsonl", resume_after_step=step if resume else None) if world.is_main else None
    bar = Progress(progress(), enabled=show_progress)
    sync_every = train_config.log_interval if world.active else 1  # ranks agree on time and signals this often
    model.train()
    started = time.perf_counter() - elapsed
    window_start, window_steps, val_loss, stopping = time.perf_counter(), 0, None, False
    with distributed.StopSignals() as stop, metrics or contextlib.nullcontext(), bar:
        finished = progress() >= 1.0
        while not finished and not stopping:
            lr = learning_rate(step, progress(), train_config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            starts = sampler.starts_at(windows_seen, global_batch)
            loss_sum = torch.zeros((), device=device)
            for j in range(accum):
                index = j * world.size + world.rank  # this rank's micro-batch within the global batch
                x, y = (t.to(device, non_blocking=True) for t in sampler.windows(starts[index * micro:][:micro]))
                torch.manual_seed(micro_seed(train_config.seed, step, index))
                with distributed.gradient_sync(wrapped, world, enabled=j == accum - 1):
                    with torch.autocast(device.type, dtype=low_precision, enabled=low_precision is not None):
                        loss = lm_loss(step_forward(x), y, model_config.pad_idx)
                    (loss / accum).backward()
                loss_sum += loss.detach()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if average is not None:
                average.update(step)
            window_steps += 1
            windows_seen += global_batch
            if step % sync_every == 0 or (train_config.max_steps and step >= train_config.max_steps):
                elapsed, signalled, reserve = distributed.agree(
                    [time.perf_counter() - started, float(bool(stop.received)), reserve], world)
                stopping = signalled > 0
            finished = progress() >= 1.0
            evaluating = step % train_config.eval_interval == 0 or finished or stopping
            logging = step % train_config.log_interval == 0 or evaluating
            saving = evaluating or step % train_config.checkpoint_interval == 0
            if not (logging or saving):
                continue
            train_loss = distributed.average(loss_sum / accum, world).item()  # waits for the step to finish
            speed = window_steps * tokens_per_step / max(time.perf_counter() - window_start, 1e-9)  # since last row
            if not math.isfinite(train_loss):
                raise UsageError(diverged(f"the training loss became {train_loss} at step {step}", out))
            if remembering and train_config.max_time:
                costs.step = tokens_per_step / speed
                if not reserve_timed:  # a step: ~3 forward passes
                    costs.estimate(1 / (3 * speed))
                reserve = costs.reserve(train_config.max_time)
            # a memory that would run into the time kept for the end is left out of this validation
            with_memory = mid_run_memory and not (finished or stopping) and not (train_config.max_time and run_progress(
                step, elapsed + costs.validation_with_memory(), train_config, reserve) >= 1)
            score, mixed, validated = validate(with_memory) \
                if evaluating and (world.is_main or world.fsdp) else (None, None, True)
            if logging:
                row = {"step": step, "train_loss": round(train_loss, 6), "lr": lr,
                       "tokens_seen": windows_seen * model_config.sequence_len, "elapsed": round(elapsed, 3),
                       "tokens_per_s": round(speed)}
                if peak:
                    row["mfu"] = round(flops_per_token * speed / peak.flops, 4)
                if score is not None:
                    val_loss = score.loss
                    row.update(val_loss=round(score.loss, 6), val_bits_per_char=round(score.bits_per_char, 6))
                if mixed is not None:  # the end's memory row has the final one
                    row["val_bits_per_char_with_memory"] = round(mixed.bits_per_char, 6)
                if world.is_main:
                    metrics.write(row)
                bar.update(progress(), step=step, loss=f"{train_loss:.3f}",
                           val="-" if val_loss is None else f"{val_loss:.3f}", tok_s=f"{speed:,.0f}",
                           **({"mfu": f"{100 * row['mfu']:.0f}%"} if peak else {}))
            if saving:
                checkpoint(score.loss if score else None, mixed.bits_per_char if mixed else None,
                           validation_failed=not validated)
            if evaluating and not finished and train_config.max_time:  # one that ran past the time is the last
                elapsed, reserve = distributed.agree([time.perf_counter() - started, reserve], world)
                finished = progress() >= 1.0
            window_start, window_steps = time.perf_counter(), 0
        if remembering and not stopping and (out / WEIGHTS_FILE).exists():
            remember_training_text(out, model_config, splits, eot, train_config.eval_stride, device, low_precision,
                                   metrics, say, step, reserve, time.perf_counter() - started)
    if world.is_main:
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    interrupted_by = (stop.received or "SIGTERM") if stopping else None
    if interrupted_by:
        say(f"stopped by {interrupted_by} at step {step}; checkpoint saved. Continue with: "
            f"gpt train --resume --out {out}", file=sys.stderr)
    else:
        say(f"done: step {step}, kept weights' val loss {best_val:.4f}; checkpoint in {out}", file=sys.stderr)
    return RunResult(step, best_val, interrupted_by)


def diverged(what: str, out: Path) -> str:
    return (f"{what}; training stopped and the last good checkpoint in {out} is kept: lower train.learning_rate "
            "(or raise train.warmup_steps) in a --config file and train again")
