"""bench_train.py's report: the machine it ran on, the table of tokens/s and ratios, and the summary lines.

Kept apart from the timing so each file reads as one idea: bench_train.py builds the models and times their
steps; this turns the step times into rows (median tokens/s, ratio of medians, ratio paired by round, MFU)
and prints them.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import re
import statistics
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import transformers

from gpt.hardware import cpu_flags, cpu_peak, read_cpuinfo

if TYPE_CHECKING:
    from bench_train import Contender, Size

OURS = "ours: gpt.GPT (gpt1)"
OURS_COMPILED = "ours, compiled (gpt train --compile)"


@dataclass
class Row:
    size: str
    precision: str
    model: str
    attention: str
    tokens_per_step: int
    steps_per_round: int
    step_seconds: list[float]
    tokens_per_s: float
    ratio: float  # ours / this model (1.0 for ours)
    paired_ratio: float  # the median over rounds of (this model's round median / ours')
    mfu: float | None


# ---------------------------------------------------------------- machine


def lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model(cpuinfo: str, lscpu_text: str) -> str:
    for text, key in ((cpuinfo, "model name"), (lscpu_text, "Model name")):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def machine_info(flops_per_cycle: int | None, device: str) -> dict:
    """The peak is gpt.hardware's estimate, the one `gpt train` logs MFU against (CPU only)."""
    cpuinfo = read_cpuinfo()
    flags = cpu_flags(cpuinfo)
    peak = cpu_peak(cpuinfo) if device == "cpu" else None
    if peak is not None and flops_per_cycle is not None:
        peak.flops_per_cycle = flops_per_cycle
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_model(cpuinfo, lscpu()),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "peak": str(peak) if peak else None,
        "peak_fp32_flops": peak.flops if peak else None,
        "flags": {f: f in flags for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")},
    }


# ---------------------------------------------------------------- report


def paired_ratio(ours: list[float], other: list[float], steps: int) -> float:
    """Median over rounds of other's median step / ours' in the same round: both ran within seconds of each other."""
    rounds = range(0, len(ours), steps)
    return statistics.median(statistics.median(other[i:i + steps]) / statistics.median(ours[i:i + steps])
                             for i in rounds)


def make_rows(size_name: str, precision: str, contenders: list[Contender], seconds: dict[str, list[float]],
              tokens: int, flops_per_token: float, peak: float | None, steps: int) -> list[Row]:
    speed = {name: tokens / statistics.median(s) for name, s in seconds.items()}
    rows = []
    for c in contenders:
        mfu = flops_per_token * speed[c.name] / peak if peak and precision == "fp32" else None  # an fp32 peak
        rows.append(Row(size_name, precision, c.name, c.attention, tokens, steps, seconds[c.name], speed[c.name],
                        speed[OURS] / speed[c.name], paired_ratio(seconds[OURS], seconds[c.name], steps), mfu))
    return rows


def header(info: dict) -> list[str]:
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["flags"].items())
    return [
        f"torch {info['torch']}, transformers {info['transformers']}, {info['date']}, CPU {info['cpu']}, "
        f"torch threads {info['torch_threads']} (default, not set), device {info['device']}",
        f"CPU flags: {flags}",
        f"peak fp32 assumed (gpt.hardware; FLOP/cycle = 2 FMA units x floats per vector x 2): "
        f"{info['peak'] or ('unknown (no clock in /proc/cpuinfo)' if info['device'] == 'cpu' else 'none (GPU)')}",
    ]


def size_lines(size_name: str, size: Size, contenders: list[Contender], losses: dict[str, float],
               flops_per_token: float) -> list[str]:
    lines = [f"size {size_name}: {size.layers} layers, {size.heads} heads, {size.width} wide, block {size.block}, "
             f"batch {size.batch}, vocab {size.vocab}; {flops_per_token / 1e6:.2f} MFLOP per token (training)"]
    for c in contenders:
        loss = f"initial loss {losses[c.name]:.3f}" if c.name in losses else "ours' initial weights, compiled"
        lines.append(f"  {c.name}: attention {c.attention}; {loss} (ln vocab = {math.log(size.vocab):.3f})")
    return lines


def table(rows: list[Row]) -> list[str]:
    lines = ["| size | precision | model | tokens/s (median) | step s (min-max) | ours ÷ this | paired | MFU |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        span = f"{min(r.step_seconds):.3f}-{max(r.step_seconds):.3f}"
        lines.append(f"| {r.size} | {r.precision} | {r.model} | {r.tokens_per_s:,.0f} | {span} | {r.ratio:.2f} "
                     f"| {r.paired_ratio:.2f} | {mfu} |")
    return lines


def summary(rows: list[Row]) -> list[str]:
    lines = []
    for key in dict.fromkeys((r.size, r.precision) for r in rows):
        group = [r for r in rows if (r.size, r.precision) == key]
        ours = next(r for r in group if r.model == OURS)
        best = max((r for r in group if r.model not in (OURS, OURS_COMPILED)), key=lambda r: r.tokens_per_s)
        lines.append(f"{key[0]} {key[1]}: ours {ours.tokens_per_s:,.0f} tok/s = {best.ratio:.2f}x the faster "
                     f"transformers class ({best.model}, {best.tokens_per_s:,.0f} tok/s); paired by round: "
                     f"{best.paired_ratio:.2f}x")
        compiled = next((r for r in group if r.model == OURS_COMPILED), None)
        if compiled:
            paired = paired_ratio(compiled.step_seconds, best.step_seconds, compiled.steps_per_round)
            lines.append(f"{key[0]} {key[1]}: ours compiled {compiled.tokens_per_s:,.0f} tok/s = "
                         f"{compiled.tokens_per_s / best.tokens_per_s:.2f}x the faster transformers class; paired by "
                         f"round: {paired:.2f}x")
        if key[1] == "bf16":  # the trainer's default on bf16 hardware, against the peers' plain fp32
            fp32 = [r for r in rows if (r.size, r.precision) == (key[0], "fp32")
                    and r.model not in (OURS, OURS_COMPILED)]
            if fp32:
                peer = max(fp32, key=lambda r: r.tokens_per_s)
                lines.append(f"{key[0]} ours bf16 / the faster transformers class in fp32 ({peer.model}): "
                             f"{ours.tokens_per_s / peer.tokens_per_s:.2f}x")
    return lines
