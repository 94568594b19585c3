"""Training-step speed: our GPT against transformers' OpenAI-GPT and GPT-2 classes, same shapes, same CPU.

    pip install -e '.[bench]'          # or: pip install transformers
    python benchmarks/bench_train.py [--sizes S,M] [--precisions fp32,bf16] [--rounds N] [--steps-per-round K]
                                     [--warmup W] [--no-compile] [--json OUT.json]

What it measures: for each size and precision, full training steps of three models built from configs (no
downloads): our `gpt.model.GPT` (arch "gpt1", the default exact GELU), `OpenAIGPTLMHeadModel` and
`GPT2LMHeadModel` (each with its tanh GELU, the only one OpenAIGPTLMHeadModel has), all with the
same vocabulary, context, layers, heads, width, 4x MLP, no dropout and layer-norm epsilon 1e-5. One step is:
forward on T tokens, cross-entropy on T next-token targets (logits cast to fp32), backward, gradient clipping
at 1.0, AdamW step, zero_grad. Ours uses `model.loss` and `gpt.optim.make_optimizer`; the transformers models
use `model(input_ids=x).logits` + `F.cross_entropy` (not `labels=`, which shifts and would score T-1 targets)
and a `torch.optim.AdamW` with the same learning rate, betas, eps, weight-decay split and fused flag.

A fourth contender (skip it with --no-compile) is our model as `gpt train --compile` runs it: the same weights
through `gpt.hardware.compile_step` (torch.compile; on one GPU with CUDA graphs), the loss taken as the trainer
takes it. Its first warm-up step waits for the compiler; that time is printed, not counted in tokens/s. The
transformers models run eager, as a plain transformers training script does.

bf16 runs the same fp32 models under `torch.autocast(device, dtype=torch.bfloat16)`. Without avx512_bf16 or
AMX the CPU emulates bf16 matmuls, so expect it to be slower than fp32 there; the numbers are printed as
measured.

The models are interleaved in one process (round-robin, a few steps each, several rounds, starting with a
different model each round) so background load hits all of them alike; warm-up steps are not timed. The
table gives the median tokens/s over the timed steps, our speed over each model's (the ratio of the two medians),
the same ratio paired by round (each round's median step of that model over ours', then the median over rounds:
a machine whose speed drifts during the run moves it less), and the FLOP utilisation:
`GPT.flops_per_token()` x tokens/s over an assumed fp32 peak of cores x FLOP/cycle x clock, for fp32 rows only
(the same FLOP count is used for all three models, whose matmul shapes are identical). Threads are left at
torch's default.

The report (machine, rows, table, summary) is in train_report.py beside this file.

`--device cuda` runs the same on a GPU (each step timed after `torch.cuda.synchronize()`; no MFU, no peak
assumed); the default is the CPU, which the targets in docs/benchmarks.md are about.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import ModelConfig, TrainConfig
from gpt.distributed import World
from gpt.hardware import compile_step
from gpt.model import GPT, lm_loss
from gpt.optim import make_optimizer

try:
    import transformers
except ImportError:  # pragma: no cover - depends on the environment
    raise SystemExit("bench_train.py needs HuggingFace transformers: pip install -e '.[bench]'") from None

from train_report import OURS, OURS_COMPILED, Row, header, machine_info, make_rows, size_lines, summary, table

PRECISIONS = ("fp32", "bf16")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Size:
    layers: int
    heads: int
    width: int
    block: int
    batch: int
    vocab: int
    rounds: int  # defaults for --rounds / --steps-per-round / --warmup, sized for a 2-core CPU
    steps: int
    warmup: int


SIZES = {
    "S": Size(layers=4, heads=4, width=128, block=64, batch=12, vocab=2048, rounds=20, steps=2, warmup=3),
    "M": Size(layers=6, heads=6, width=384, block=256, batch=8, vocab=4096, rounds=3, steps=3, warmup=1),
}


@dataclass
class Contender:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    attention: str


# ---------------------------------------------------------------- models


def build_ours(size: Size, device: str = "cpu") -> Contender:
    config = ModelConfig(vocab_size=size.vocab, sequence_len=size.block, num_layers=size.layers,
                         embed_dim=size.width, num_heads=size.heads, forward_expansion=4, dropout=0.0, arch="gpt1")
    model = GPT(config=config).to(device)
    return Contender(OURS, model, make_optimizer(model, TrainConfig()), model.loss, "F.scaled_dot_product_attention")


def hf_config(kind: str, size: Size) -> transformers.PretrainedConfig:
    common = dict(vocab_size=size.vocab, n_positions=size.block, n_embd=size.width, n_layer=size.layers,
                  n_head=size.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5)
    if kind == "gpt2":
        return transformers.GPT2Config(**common, n_inner=4 * size.width, activation_function="gelu_new",
                                       use_cache=False, bos_token_id=None, eos_token_id=None)
    return transformers.OpenAIGPTConfig(**common, afn="gelu")  # its MLP is always 4 x n_embd


def build_hf_model(kind: str, size: Size) -> tuple[nn.Module, str]:
    """Ask for sdpa attention; if the class refuses it, fall back to eager and say why."""
    cls = transformers.GPT2LMHeadModel if kind == "gpt2" else transformers.OpenAIGPTLMHeadModel
    try:  # a fresh config each try: a refused attempt can leave its choice written in the config
        model = cls._from_config(hf_config(kind, size), attn_implementation="sdpa")
        note = ""
    except (ValueError, ImportError) as err:
        model = cls._from_config(hf_config(kind, size), attn_implementation="eager")
        note = f" (sdpa refused: {str(err).split('. ')[0]})"
    return model, f"{model.config._attn_implementation}{note}"


def mirror_optimizer(model: nn.Module, reference: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with make_optimizer's settings: decay on >= 2-D tensors only; lr, betas, eps, fused as ours."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": others, "weight_decay": 0.0}]
    d = reference.defaults
    return torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], fused=d.get("fused"))


def logits_loss(model: nn.Module) -> LossFn:
    """T tokens in, T targets scored: the same work as our model.loss (labels= would shift to T-1 targets)."""

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    return loss


def build_compiled(ours: Contender, device: str) -> Contender:
    """Our model, a copy of the same weights, through the trainer's own compile_step and loss."""
    model = copy.deepcopy(ours.model)
    step_forward = compile_step(model, torch.device(device), World())

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return lm_loss(step_forward(x), y, model.pad_idx)

    return Contender(OURS_COMPILED, model, make_optimizer(model, TrainConfig()), loss, ours.attention)


def build_contenders(size: Size, device: str = "cpu", compiled: bool = True) -> list[Contender]:
    torch.manual_seed(0)
    ours = build_ours(size, device)
    contenders = [ours, build_compiled(ours, device)] if compiled else [ours]
    for kind, name in (("openai", "transformers OpenAIGPTLMHeadModel"), ("gpt2", "transformers GPT2LMHeadModel")):
        model, attention = build_hf_model(kind, size)
        model.to(device)
        optimizer = mirror_optimizer(model, ours.optimizer, TrainConfig())
        contenders.append(Contender(name, model, optimizer, logits_loss(model), attention))
    for c in contenders:
        c.model.train()
    return contenders


# ---------------------------------------------------------------- timing


def make_batches(size: Size, count: int, seed: int = 0, device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, size.vocab, (size.batch, size.block + 1), generator=generator).to(device)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return batches


def precision_context(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(c: Contender, x: torch.Tensor, y: torch.Tensor, precision: str) -> float:
    """One full training step; returns its wall-clock seconds (on a GPU, until its kernels have finished)."""
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with precision_context(precision, x.device.type):
        loss = c.loss_fn(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(c.model.parameters(), 1.0)
    c.optimizer.step()
    c.optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def round_robin(contenders: list[Contender], rounds: int) -> Iterator[list[Contender]]:
    """Each round starts with the next model, so none is always first after another's turn."""
    for r in range(rounds):
        shift = r % len(contenders)
        yield contenders[shift:] + contenders[:shift]


def time_precision(contenders: list[Contender], batches: list, precision: str,
                   rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    for c in contenders:
        for i in range(max(warmup, c.name == OURS_COMPILED)):  # the compiler's wait is never timed
            seconds = train_step(c, *batches[i % len(batches)], precision)
            if i == 0 and c.name == OURS_COMPILED:
                print(f"  {precision}: {c.name}'s first warm-up step (compiling) took {seconds:.1f} s", flush=True)
    seconds: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r, order in enumerate(round_robin(contenders, rounds)):
        for c in order:
            for s in range(steps):
                seconds[c.name].append(train_step(c, *batches[(r * steps + s) % len(batches)], precision))
    return seconds


@torch.no_grad()
def initial_losses(contenders: list[Contender], x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Loss of the freshly initialised models: all should be close to ln(vocab). The compiled copy of ours is
    left out: under no_grad it would compile a second graph for nothing."""
    return {c.name: float(c.loss_fn(x, y)) for c in contenders if c.name != OURS_COMPILED}


# ---------------------------------------------------------------- main


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in allowed]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"{what} must be a comma list of {', '.join(allowed)}, got {text!r}")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="S,M", type=lambda t: parse_list(t, tuple(SIZES), "--sizes"))
    parser.add_argument("--precisions", default="fp32,bf16", type=lambda t: parse_list(t, PRECISIONS, "--precisions"))
    parser.add_argument("--rounds", type=int, default=None, help="round-robin rounds (default: S 20, M 3)")
    parser.add_argument("--steps-per-round", type=int, default=None, help="timed steps per model per round "
                        "(default: S 2, M 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per model before each precision "
                        "(default: S 3, M 1)")
    parser.add_argument("--flops-per-cycle", type=int, default=None,
                        help="per core, for the peak (default: from the CPU's flags; AVX2 fp32: 32)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time ours through torch.compile, as gpt train --compile runs it (default: yes)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    for name in ("rounds", "steps_per_round"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be zero or more")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here")
    return args


def bench_size(size_name: str, args: argparse.Namespace, peak: float | None) -> tuple[list[Row], list[str]]:
    size = SIZES[size_name]
    rounds, steps = args.rounds or size.rounds, args.steps_per_round or size.steps
    warmup = size.warmup if args.warmup is None else args.warmup
    contenders = build_contenders(size, args.device, args.compile)
    batches = make_batches(size, count=max(4, warmup), device=args.device)
    flops_per_token = contenders[0].model.flops_per_token()
    lines = size_lines(size_name, size, contenders, initial_losses(contenders, *batches[0]), flops_per_token)
    lines.append(f"  {rounds} rounds x {steps} steps per model, {warmup} warm-up steps per model untimed")
    print("\n".join(lines), flush=True)
    rows: list[Row] = []
    for precision in args.precisions:
        seconds = time_precision(contenders, batches, precision, rounds, steps, warmup)
        rows += make_rows(size_name, precision, contenders, seconds, size.batch * size.block, flops_per_token, peak,
                          steps)
        print(f"  {precision} done", flush=True)
    return rows, lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine_info(args.flops_per_cycle, args.device)
    print("\n".join(header(info)), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after minutes of timing
    rows: list[Row] = []
    notes: list[str] = []
    for size_name in args.sizes:
        size_rows, size_notes = bench_size(size_name, args, info["peak_fp32_flops"])
        rows += size_rows
        notes += size_notes
    print()
    print("\n".join(header(info) + [""] + table(rows) + [""] + summary(rows)))
    print("loss: ours model.loss; transformers model(input_ids=x).logits + F.cross_entropy on T targets. "
          "MFU uses gpt.GPT.flops_per_token() for all three (identical matmul shapes).")
    if args.json is not None:
        payload = {"machine": info, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "notes": notes, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
